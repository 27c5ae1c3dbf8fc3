"""Multi-head causal attention against the textbook: a loop of single-head attentions, and torch's SDPA."""

import math

import pytest
import torch
import torch.nn.functional as F

from gptserve.model.config import preset
from gptserve.model.gpt import GPT, CausalSelfAttention, rope_cos_sin


def single_head_attention(q, k, v):
    """One head, causal, written out: q, k, v are (T, D)."""
    T, D = q.shape
    scores = q @ k.T / math.sqrt(D)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.fixture(params=["tiny-gpt2", "tiny-llama"])
def attention(request):
    torch.manual_seed(0)
    config = preset(request.param)
    module = CausalSelfAttention(config).eval()
    for parameter in module.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    return config, module


def run(config, module, x):
    B, T, _ = x.shape
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    empty = torch.zeros(B, config.kv_heads, 0, config.head_dim)
    rope = None
    if config.positions == "rope":
        rope = rope_cos_sin(torch.arange(T)[None].expand(B, T), config)
    return module(x, allowed, rope, empty, empty), rope


def split_heads(projection, x, heads, head_dim):
    B, T, _ = x.shape
    return projection(x).view(B, T, heads, head_dim).transpose(1, 2)  # (B, heads, T, D)


def rotated(t, rope):
    if rope is None:
        return t
    cos, sin = rope
    half = t.shape[-1] // 2
    return t * cos + torch.cat((-t[..., half:], t[..., :half]), dim=-1) * sin


def test_equals_loop_of_single_head_attentions(attention):
    config, module = attention
    x = torch.randn(2, 7, config.n_embd)
    (output, _), rope = run(config, module, x)
    H, KV, D = config.n_head, config.kv_heads, config.head_dim
    q = rotated(split_heads(module.q_proj, x, H, D), rope)
    k = rotated(split_heads(module.k_proj, x, KV, D), rope)
    v = split_heads(module.v_proj, x, KV, D)
    expected = torch.stack([
        torch.cat([single_head_attention(q[b, h], k[b, h * KV // H], v[b, h * KV // H]) for h in range(H)], dim=-1)
        for b in range(x.shape[0])
    ])  # heads concatenated: (B, T, H*D)
    torch.testing.assert_close(output, module.o_proj(expected), atol=1e-5, rtol=1e-5)


def test_equals_scaled_dot_product_attention(attention):
    config, module = attention
    x = torch.randn(3, 9, config.n_embd)
    (output, (key, value)), rope = run(config, module, x)
    H, D = config.n_head, config.head_dim
    q = rotated(split_heads(module.q_proj, x, H, D), rope)
    y = F.scaled_dot_product_attention(q, key, value, is_causal=True, enable_gqa=True)  # (B, H, T, D)
    torch.testing.assert_close(output, module.o_proj(y.transpose(1, 2).reshape(3, 9, H * D)), atol=1e-5, rtol=1e-5)


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    config = preset("tiny-gpt2").replace(dropout=0.5)
    model = GPT(config)
    ids = torch.randint(0, config.vocab_size, (1, 8))
    mask = torch.ones_like(ids)
    model.train()
    first, second = model(ids, mask)[0], model(ids, mask)[0]
    assert not torch.allclose(first, second)
    model.eval()
    torch.testing.assert_close(model(ids, mask)[0], model(ids, mask)[0], atol=0, rtol=0)


def test_left_padding_changes_nothing():
    torch.manual_seed(0)
    model = GPT(preset("tiny-llama")).eval()
    ids = torch.randint(0, 256, (1, 6))
    alone = model(ids, torch.ones_like(ids))[0]
    padded_ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    padded_mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    padded = model(padded_ids, padded_mask)[0][:, 3:]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
