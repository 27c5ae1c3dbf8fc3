"""Tiny random GPT-2, Llama and the other families' models built with transformers (the reference), saved as
Hugging Face folders with the default model's real tokenizer, so every layer of the stack runs on them quickly."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_VOCAB = 49152  # the default model's tokenizer, so prompts are real text


def _family(config_class: str, model_class: str, **fields):
    """A tiny model of one family: 2 layers, 4 query heads over 2 KV heads, 256 positions."""
    def build():
        import transformers

        shape = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                     eos_token_id=2)
        config = getattr(transformers, config_class)(**{**shape, **fields})
        return getattr(transformers, model_class)(config)
    return build


# Each family with what sets it apart from Llama 2, at sizes ONNX Runtime's rotary kernel takes (head sizes that
# are multiples of 16).
FAMILIES = {
    # Llama 3.x: llama3 rope scaling (an original context short enough that all three frequency bands occur at
    # head size 16), an explicit head_dim, and two end-of-sequence ids (<|im_end|> and <|endoftext|> here).
    "llama3": _family("LlamaConfig", "LlamaForCausalLM", head_dim=16, tie_word_embeddings=True, eos_token_id=[2, 0],
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64}),
    # Qwen2.5: biases on q, k and v only; tied head.
    "qwen2": _family("Qwen2Config", "Qwen2ForCausalLM", tie_word_embeddings=True, rope_theta=1000000.0),
    # Qwen3: per-head q/k RMSNorm before the rotary; head_dim 32 with hidden size 64 over 4 heads.
    "qwen3": _family("Qwen3Config", "Qwen3ForCausalLM", head_dim=32, tie_word_embeddings=True),
    # Mistral: an explicit head_dim and a sliding window shorter than the context and the canary prompts.
    "mistral": _family("MistralConfig", "MistralForCausalLM", head_dim=32, sliding_window=48,
                       tie_word_embeddings=False),
    # Phi-3 mini (4k): q, k and v in one fused qkv_proj, gate and up in one gate_up_proj.
    "phi3": _family("Phi3Config", "Phi3ForCausalLM", pad_token_id=0, tie_word_embeddings=False),
}


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
    elif kind in FAMILIES:
        model = FAMILIES[kind]()
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


FAMILY_PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
FAMILY_NEW_TOKENS = 16


def save_family_folder(kind: str, folder: Path, tokenizer_source: Path):
    """A tiny model of `kind` (one of FAMILIES) and the default model's tokenizer in a Hugging Face folder; returns
    the transformers model. The Llama 3 model's second end-of-sequence id is a token its greedy continuation of
    FAMILY_PROMPT reaches, so every layer that should stop on it (transformers, the engine, the server,
    onnxruntime-genai) visibly does."""
    from gptserve.model.tokenizer import Tokenizer

    model = build_reference(kind)
    tokenizer = Tokenizer.from_gguf(tokenizer_source)
    if kind == "llama3":
        prompt = torch.tensor([tokenizer.encode(FAMILY_PROMPT)])  # (1, T)
        with torch.no_grad():
            output = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=FAMILY_NEW_TOKENS,
                                    do_sample=False, eos_token_id=[2])
        tokens = output[0, prompt.shape[1]:].tolist()
        stop = next(token for index, token in enumerate(tokens) if index >= 6 and token not in tokens[:index])
        model.config.eos_token_id = model.generation_config.eos_token_id = [2, stop]
    model.save_pretrained(folder)
    tokenizer.save(folder)
    return model


# A chat template that offers tools in the form Qwen2.5, Qwen3 and Hermes models are taught (<tools> in the system
# turn, <tool_call> blocks in the reply, <tool_response> turns), written for these tests.
TOOL_TEMPLATE = """\
{%- set system = messages[0].content if messages[0].role == 'system' else '' %}
{%- if tools %}<|im_start|>system
{% if system %}{{ system }}

{% endif %}You may call functions. Their signatures:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Write each call inside <tool_call></tool_call> as {"name": <name>, "arguments": <object>}.<|im_end|>
{% elif system %}<|im_start|>system
{{ system }}<|im_end|>
{% endif %}
{%- for message in messages if message.role != 'system' %}
{%- if message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}{% for call in message.tool_calls or [] %}<tool_call>
{"name": {{ call.function.name | tojson }}, "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def save_tool_folder(folder: Path, tokenizer_source: Path):
    """The tiny Llama with TOOL_TEMPLATE as its chat template, and room for the tools' prompt (rotary positions are
    computed, not stored, so the context stretches); returns the model."""
    from gptserve.model.tokenizer import Tokenizer

    model = build_reference("llama")
    model.config.max_position_embeddings = 1024
    model.save_pretrained(folder)
    tokenizer = Tokenizer.from_gguf(tokenizer_source)
    tokenizer.chat_template = TOOL_TEMPLATE
    tokenizer.save(folder)
    return model
