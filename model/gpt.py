"""The GPT module: embeddings, pre-norm blocks of causal self-attention and an MLP, an LM head.

The KV cache is explicit data passed in and returned, so one forward serves prefill and cached decode. This is
the reference: eager generation runs it, and the export (export/fused.py) traces the same weights arranged for
ONNX Runtime's fused kernels, certified against it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gptserve.model.config import GPTConfig

PastKeyValues = tuple[tuple[torch.Tensor, torch.Tensor], ...]


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight; F.rms_norm exports as one ONNX RMSNormalization op (opset 23)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(config: GPTConfig) -> RMSNorm | nn.LayerNorm:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rope_inverse_frequencies(config: GPTConfig) -> torch.Tensor:
    """Each rotary pair's angle per position, (D/2,) float32: theta^(-2i/D), stretched by the rope scaling."""
    D = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))  # (D/2,)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":  # positions / factor, which is frequencies / factor
        return inv_freq / scaling.factor
    if scaling.kind == "factors":
        return inv_freq / torch.tensor(scaling.frequency_divisors, dtype=torch.float32)
    if scaling.kind == "llama3":
        # Wavelengths shorter than original_context / high_freq_factor are kept, longer than
        # original_context / low_freq_factor divided by factor, and those between blended smoothly.
        wavelength = 2 * math.pi / inv_freq
        smooth = ((scaling.original_context / wavelength - scaling.low_freq_factor)
                  / (scaling.high_freq_factor - scaling.low_freq_factor))
        blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        long = wavelength > scaling.original_context / scaling.low_freq_factor
        short = wavelength < scaling.original_context / scaling.high_freq_factor
        return torch.where(long, inv_freq / scaling.factor, torch.where(short, inv_freq, blended))
    assert scaling.kind == "yarn", scaling.kind
    # yarn: dimensions that turn fewer than beta_slow times over the original context are interpolated (divided
    # by factor), those turning more than beta_fast times are kept, with a linear ramp between.
    def dimension_turning(rotations: float) -> float:
        return D * math.log(scaling.original_context / (rotations * 2 * math.pi)) / (2 * math.log(config.rope_theta))

    low, high = dimension_turning(scaling.beta_fast), dimension_turning(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, D - 1)
    ramp = ((torch.arange(D // 2, dtype=torch.float32) - low) / max(high - low, 0.001)).clamp(0, 1)  # (D/2,)
    return inv_freq / scaling.factor * ramp + inv_freq * (1 - ramp)


def rope_angles(position_ids: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    """Rotary angles of each position, (..., D/2): position * inverse frequency."""
    return position_ids.to(torch.float32)[..., None] * rope_inverse_frequencies(config)


def rope_attention_factor(config: GPTConfig) -> float:
    """cos and sin are scaled by this (yarn's mscale), which scales the rotated queries and keys alike."""
    return config.rope_scaling.attention_factor if config.rope_scaling is not None else 1.0


def rope_cos_sin(position_ids: torch.Tensor, config: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (B, 1, T, D), halves repeated."""
    freqs = rope_angles(position_ids, config)  # (B, T, D/2)
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
    factor = rope_attention_factor(config)
    if factor == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * factor, angles.sin() * factor


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_heads, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        qkv_bias = config.bias or config.qkv_bias
        self.q_proj = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.n_embd, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.n_embd, self.n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=config.bias)
        if config.qk_norm:  # one (D,) weight shared by every head
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.qk_norm = config.qk_norm
        self.attn_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        allowed: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, T, _ = x.shape
        H, KV, D = self.n_head, self.n_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, KV, D).transpose(1, 2)  # (B, KV, T, D)
        v = self.v_proj(x).view(B, T, KV, D).transpose(1, 2)  # (B, KV, T, D)
        if self.qk_norm:  # each head's query and key vectors RMS-normalized over D, before they are rotated
            q, k = self.q_norm(q), self.k_norm(k)  # (B, H, T, D), (B, KV, T, D)
        if rope is not None:
            cos, sin = rope
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        k = torch.cat((past_key, k), dim=2)  # (B, KV, P+T, D)
        v = torch.cat((past_value, v), dim=2)  # (B, KV, P+T, D)
        # Grouped-query attention: query head h reads key/value head h // (H / KV).
        k_heads = k.repeat_interleave(H // KV, dim=1)  # (B, H, P+T, D)
        v_heads = v.repeat_interleave(H // KV, dim=1)  # (B, H, P+T, D)
        att = (q @ k_heads.transpose(-2, -1)) * (1.0 / math.sqrt(D))  # (B, H, T, P+T)
        # finfo.min rather than -inf: a fully masked row (a padding query) stays finite, never NaN.
        att = att.masked_fill(~allowed, torch.finfo(att.dtype).min)
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v_heads  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # heads concatenated
        return self.o_proj(y), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.kind = config.mlp
        self.up = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        if self.kind == "swiglu":
            self.gate = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.down = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, allowed, rope, past_key, past_value):
        attended, present = self.attn(self.norm_1(x), allowed, rope, past_key, past_value)
        x = x + attended
        x = x + self.mlp(self.norm_2(x))
        return x, present


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.positions == "learned":
            self.wpe = nn.Embedding(config.context_length, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def empty_past(self, batch_size: int) -> PastKeyValues:
        shape = (batch_size, self.config.kv_heads, 0, self.config.head_dim)
        return tuple((self.wte.weight.new_zeros(shape), self.wte.weight.new_zeros(shape)) for _ in self.blocks)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T) int64
        attention_mask: torch.Tensor,  # (B, P+T) int64, 1 = token, 0 = padding
        past_key_values: PastKeyValues | None = None,  # per layer (key, value), each (B, KV, P, D)
    ) -> tuple[torch.Tensor, PastKeyValues]:
        B, T = input_ids.shape
        if past_key_values is None:
            past_key_values = self.empty_past(B)
        total = attention_mask.shape[1]  # P+T
        # Positions count real tokens only, so left-padded rows of different lengths line up.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, total - T:]  # (B, T)
        key_index = torch.arange(total, device=input_ids.device)  # (P+T,)
        query_index = torch.arange(total - T, total, device=input_ids.device)  # (T,) positions of the new tokens
        causal = key_index[None, :] <= query_index[:, None]  # (T, P+T)
        # A padding position may see itself, so no row is fully masked (which would turn softmax into NaN
        # under fused kernels and fp16); real rows never see padding.
        itself = key_index[None, :] == query_index[:, None]  # (T, P+T)
        if self.config.sliding_window is not None:
            # Rows are left-padded, so a row's tokens are consecutive slots: slot distance is position distance.
            causal = causal & (query_index[:, None] - key_index[None, :] < self.config.sliding_window)  # (T, P+T)
        allowed = causal[None, None] & (attention_mask.bool()[:, None, None, :] | itself)  # (B, 1, T, P+T)

        x = self.wte(input_ids)  # (B, T, C)
        rope = None
        if self.config.positions == "learned":
            x = x + self.wpe(position_ids)
        else:
            rope = rope_cos_sin(position_ids, self.config)
        presents = []
        for block, (past_key, past_value) in zip(self.blocks, past_key_values):
            x, present = block(x, allowed, rope, past_key, past_value)
            presents.append(present)
        x = self.norm_f(x)
        head = self.wte.weight if self.config.tie_embeddings else self.lm_head.weight
        logits = F.linear(x, head)  # (B, T, V)
        return logits, tuple(presents)
