"""Tiny random GPT-2 and Llama models built with transformers (the reference), saved as Hugging Face folders
with the default model's real tokenizer, so every layer of the stack runs on them quickly."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_VOCAB = 49152  # the default model's tokenizer, so prompts are real text


def build_reference(kind: str, seed: int = 0, std: float = 0.1):
    """A transformers model with weights drawn wide enough that greedy tokens vary (with this vocabulary,
    std 0.1 gives ~100 distinct argmax tokens over 128 positions) yet narrow enough that fp32 rounding stays
    near 3e-6 (at std 0.5 logits grow to ~20 and fp32 itself is 3e-4 from the float64 result)."""
    import transformers

    torch.manual_seed(seed)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=TINY_VOCAB, n_positions=256, n_embd=64, n_layer=2, n_head=4,
                                         bos_token_id=1, eos_token_id=2)
        model = transformers.GPT2LMHeadModel(config)
    elif kind == "llama":
        config = transformers.LlamaConfig(
            vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
            rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name and "ln_" not in name:
                parameter.normal_(0.0, std)
    return model.eval()


def save_tiny_folder(kind: str, folder: Path, tokenizer_source: Path, seed: int = 0):
    """Writes the model and the default model's tokenizer into a Hugging Face folder; returns the model."""
    from gptserve.model.tokenizer import Tokenizer

    model = build_reference(kind, seed)
    model.save_pretrained(folder)
    Tokenizer.from_gguf(tokenizer_source).save(folder)
    return model
