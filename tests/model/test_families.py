"""Llama 3, Qwen2, Qwen3, Mistral and Phi-3 in the one GPT class: tiny random transformers models of each family,
read from their Hugging Face folders, compute transformers' logits; what we cannot serve is refused by name."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from gptserve.model.checkpoint import CheckpointError, load_gpt, read_hf_folder
from gptserve.model.spec import load_pretrained
from tests.model.test_checkpoint import greedy_decode, max_diff, random_ids, randomize, tiny_llama
from tests.tiny_models import FAMILIES, TINY_VOCAB

# Long enough that the prompt and decode steps cross Mistral's 48-position window.
PROMPT_LENGTH, DECODE_STEPS = 60, 16

# What sets each family apart, as our config must read it.
EXPECTED = {
    "llama3": dict(architecture="llama", head_dim=16, qkv_bias=False, qk_norm=False, sliding_window=None,
                   rope="llama3", tie_embeddings=True),
    "qwen2": dict(architecture="qwen2", head_dim=16, qkv_bias=True, qk_norm=False, sliding_window=None, rope=None,
                  tie_embeddings=True),
    "qwen3": dict(architecture="qwen3", head_dim=32, qkv_bias=False, qk_norm=True, sliding_window=None, rope=None,
                  tie_embeddings=True),
    "mistral": dict(architecture="mistral", head_dim=32, qkv_bias=False, qk_norm=False, sliding_window=48, rope=None,
                    tie_embeddings=False),
    "phi3": dict(architecture="phi3", head_dim=16, qkv_bias=False, qk_norm=False, sliding_window=None, rope=None,
                 tie_embeddings=False),
}


@pytest.fixture(params=list(FAMILIES))
def family(request, family_folders):
    """(kind, transformers model, our model), both read from the family's saved folder."""
    folder = family_folders[request.param]
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return request.param, reference, load_gpt(*read_hf_folder(folder))


def test_config_reads_what_sets_the_family_apart(family):
    kind, _, ours = family
    config, expected = ours.config, EXPECTED[kind]
    assert config.bias is False and config.n_kv_heads == 2
    assert (config.architecture, config.head_dim, config.qkv_bias, config.qk_norm, config.sliding_window,
            config.rope_scaling and config.rope_scaling.kind, config.tie_embeddings) == tuple(expected.values())


@torch.no_grad()
def test_prefill_and_cached_decode_match_transformers(family):
    _, reference, ours = family
    prompt = torch.randint(3, TINY_VOCAB, (1, PROMPT_LENGTH), generator=torch.Generator().manual_seed(4))
    prefill_logits, tokens, decode_logits = greedy_decode(ours, prompt, torch.ones_like(prompt), DECODE_STEPS)
    # transformers' own loop on its own cache, token for token.
    output = reference(prompt, use_cache=True)
    assert max_diff(prefill_logits, output.logits) <= 1e-5
    reference_tokens, reference_logits = [], []
    for _ in range(DECODE_STEPS):
        token = output.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        output = reference(token, past_key_values=output.past_key_values, use_cache=True)
        reference_tokens.append(token)
        reference_logits.append(output.logits)
    assert torch.equal(tokens, torch.cat(reference_tokens, dim=1))
    assert max_diff(decode_logits, torch.cat(reference_logits, dim=1)) <= 1e-5
    assert len(tokens.unique()) > 1


def test_llama3_stops_on_either_end_of_sequence_id(family_folders):
    generation = json.loads((family_folders["llama3"] / "generation_config.json").read_text())
    assert len(generation["eos_token_id"]) == 2
    assert load_pretrained(str(family_folders["llama3"])).tokenizer.eos_token_ids == generation["eos_token_id"]


def test_phi3_fused_weights_are_split(family_folders):
    reference = transformers.AutoModelForCausalLM.from_pretrained(family_folders["phi3"])
    _, state = read_hf_folder(family_folders["phi3"])
    qkv = reference.model.layers[1].self_attn.qkv_proj.weight  # (H*D + 2*KV*D, C) = (64 + 32 + 32, 64)
    assert torch.equal(torch.cat([state[f"blocks.1.attn.{x}_proj.weight"] for x in "qkv"]), qkv)
    gate_up = reference.model.layers[1].mlp.gate_up_proj.weight  # (2I, C), gate first
    assert torch.equal(torch.cat([state["blocks.1.mlp.gate.weight"], state["blocks.1.mlp.up.weight"]]), gate_up)


# Rotary scalings beyond Llama 3's: each a tiny Llama with that rope_parameters, against transformers.
ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},  # changes nothing within max_position_embeddings
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn-mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 0.8,
                    "mscale_all_dim": 0.5, "beta_fast": 16.0, "truncate": False},
}


@pytest.mark.parametrize("name", list(ROPE_SCALINGS))
@torch.no_grad()
def test_rope_scalings_match_transformers(tmp_path, name):
    reference = tiny_llama(tie=False)
    reference.config.rope_parameters = {"rope_theta": 5000.0, **ROPE_SCALINGS[name]}
    reference.save_pretrained(tmp_path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    config, state = read_hf_folder(tmp_path)
    assert (config.rope_scaling and config.rope_scaling.kind) == {"dynamic": None}.get(name, name.split("-")[0])
    ours = load_gpt(config, state)
    sequence = random_ids(1, 48, seed=5)
    logits, _ = ours(sequence, torch.ones_like(sequence))
    assert max_diff(logits, reference(sequence).logits) <= 1e-5


def _saved_config(tmp_path, model: transformers.PreTrainedModel, **changes) -> None:
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize("kind, changes, message", [
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                                  "long_factor": [2.0] * 8, "original_max_position_embeddings": 64}},
     r"rope scaling 'longrope' \(rope_parameters.rope_type; Phi-3's 128k-context models\) is not supported"),
    ("llama3", {"rope_parameters": {"rope_type": "proportional", "rope_theta": 10000.0}},
     r"rope scaling 'proportional' \(rope_parameters.rope_type\) is not supported; supported: default, linear"),
    ("phi3", {"partial_rotary_factor": 0.5, "rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
     r"partial_rotary_factor 0.5 is not supported"),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1,
               "layer_types": ["full_attention", "sliding_attention"]},
     r"a sliding window on some layers only \(layer_types \['full_attention', 'sliding_attention'\]\)"),
    ("llama3", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                    "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                                    "original_max_position_embeddings": 64}},
     r"high_freq_factor 1.0 must exceed low_freq_factor 4.0"),
], ids=["longrope", "unknown-rope", "partial-rotary", "some-layers-sliding", "llama3-bands"])
def test_what_we_cannot_serve_is_refused_by_name(tmp_path, kind, changes, message):
    _saved_config(tmp_path, FAMILIES[kind](), **changes)
    with pytest.raises(CheckpointError, match=message):
        read_hf_folder(tmp_path)


def test_a_window_as_long_as_the_context_is_no_window(tmp_path):
    _saved_config(tmp_path, FAMILIES["mistral"](), sliding_window=256)
    assert read_hf_folder(tmp_path)[0].sliding_window is None


@torch.no_grad()
def test_untied_qwen2_matches_transformers(tmp_path):
    """Qwen2.5's larger models keep their own LM head (the tiny fixture ties it, as Qwen2.5-0.5B does)."""
    reference = FAMILIES["qwen2"]()
    reference.config.tie_word_embeddings = False
    reference = randomize(transformers.Qwen2ForCausalLM(reference.config), std=0.1)
    reference.save_pretrained(tmp_path)
    config, state = read_hf_folder(tmp_path)
    assert not config.tie_embeddings and not torch.equal(state["lm_head.weight"], state["wte.weight"])
    sequence = random_ids(1, 24, seed=7)
    logits, _ = load_gpt(config, state)(sequence, torch.ones_like(sequence))
    assert max_diff(logits, reference(sequence).logits) <= 1e-5
