"""Llama 3, Qwen2, Qwen3 and Phi-3 as llama.cpp's converter writes them to GGUF: the tiny family models written
here with the `gguf` library (its tensor names, Llama's permuted q/k rows, Llama 3.1's rope_freqs, Phi-3's fused
weights, the tokenizer in the metadata with the family's pre-tokenizer) load back to transformers' logits; and each
family's pre-tokenizer, from tokenizer.json and from GGUF metadata, gives transformers' ids."""

from __future__ import annotations

import json
import math

import gguf
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

from gptserve.model.checkpoint import CheckpointError, read_gguf
from gptserve.model.spec import load_pretrained
from gptserve.model.tokenizer import Tokenizer, read_gguf_metadata
from tests.model.test_checkpoint import greedy_decode, llama_cpp_permute, max_diff
from tests.tiny_models import TINY_VOCAB

PROMPT_LENGTH, DECODE_STEPS = 24, 16
ARCHITECTURES = {"llama3": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3"}
PRE_TOKENIZERS = {"llama3": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2", "phi3": "default"}  # as llama.cpp names
TENSOR_NAMES = [  # transformers name fragment -> llama.cpp's
    ("model.embed_tokens.", "token_embd."), ("model.norm.", "output_norm."), ("lm_head.", "output."),
    ("model.layers.", "blk."), ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"), ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"), ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down"),
    ("self_attn.qkv_proj", "attn_qkv"), ("mlp.gate_up_proj", "ffn_up"),  # Phi-3's fused weights stay fused
]


def llama3_rope_freqs(config: transformers.PretrainedConfig) -> np.ndarray:
    """The rope_freqs.weight llama.cpp's converter writes for rope_type llama3: each frequency's divisor."""
    rope = config.rope_parameters
    head_dim = config.head_dim
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    original = rope["original_max_position_embeddings"]
    divisors = []
    for frequency in 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim):
        wavelength = 2 * math.pi / frequency
        if wavelength < original / high:
            divisors.append(1.0)
        elif wavelength > original / low:
            divisors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, dtype=np.float32)


def write_family_gguf(path, kind: str, model: transformers.PreTrainedModel, tokenizer_metadata: dict,
                      extra_tensors: dict[str, np.ndarray] | None = None) -> None:
    config, architecture = model.config, ARCHITECTURES[kind]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    for name, value in tokenizer_metadata.items():
        writer.add_key_value(name, value, gguf.GGUFValueType.get_type(value))
    writer.add_tokenizer_pre(PRE_TOKENIZERS[kind])
    if config.rope_parameters.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_freqs(config))
    for name, values in (extra_tensors or {}).items():
        writer.add_tensor(name, values)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # the converter leaves a tied head out
        values = tensor.numpy()
        if architecture == "llama" and "q_proj.weight" in name:
            values = llama_cpp_permute(values, config.num_attention_heads)
        elif architecture == "llama" and "k_proj.weight" in name:
            values = llama_cpp_permute(values, config.num_key_value_heads)
        for theirs, ours in TENSOR_NAMES:
            name = name.replace(theirs, ours)
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def default_tokenizer_metadata(default_gguf) -> dict:
    """The default model's tokenizer, as GGUF metadata (its vocabulary is the tiny models' vocabulary)."""
    metadata = read_gguf_metadata(default_gguf)
    return {name: value for name, value in metadata.items()
            if name.startswith("tokenizer.ggml.") and name != "tokenizer.ggml.pre"}


@pytest.mark.parametrize("kind", list(ARCHITECTURES))
@torch.no_grad()
def test_family_gguf_matches_transformers(kind, tmp_path, family_folders, default_tokenizer_metadata):
    reference = transformers.AutoModelForCausalLM.from_pretrained(family_folders[kind], dtype=torch.float32).eval()
    path = tmp_path / f"{kind}.gguf"
    write_family_gguf(path, kind, reference, default_tokenizer_metadata)
    pretrained = load_pretrained(str(path))  # weights, config and the tokenizer from the metadata
    config = pretrained.config
    # The folder's config, but for what GGUF stores otherwise: the norm epsilon as float32, and Llama 3.1's rope
    # scaling as per-frequency divisors.
    assert config == load_pretrained(str(family_folders[kind])).config.replace(
        norm_eps=config.norm_eps, rope_scaling=config.rope_scaling)
    assert config.norm_eps == pytest.approx(reference.config.rms_norm_eps, rel=1e-6)
    ours = pretrained.build()
    prompt = torch.randint(3, TINY_VOCAB, (1, PROMPT_LENGTH), generator=torch.Generator().manual_seed(6))
    prefill_logits, tokens, decode_logits = greedy_decode(ours, prompt, torch.ones_like(prompt), DECODE_STEPS)
    sequence = torch.cat((prompt, tokens), dim=1)
    assert max_diff(torch.cat((prefill_logits, decode_logits), dim=1), reference(sequence).logits) <= 1e-5
    assert len(tokens.unique()) > 1


def test_llama3_gguf_reads_rope_freqs_as_divisors(tmp_path, family_folders, default_tokenizer_metadata):
    reference = transformers.AutoModelForCausalLM.from_pretrained(family_folders["llama3"])
    write_family_gguf(tmp_path / "llama3.gguf", "llama3", reference, default_tokenizer_metadata)
    config, _ = read_gguf(tmp_path / "llama3.gguf")
    assert config.rope_scaling is not None and config.rope_scaling.kind == "factors"
    # head size 16: the highest frequency kept, one blended, the rest divided by the factor 8.
    divisors = config.rope_scaling.frequency_divisors
    assert divisors[0] == 1.0 and 1.0 < divisors[1] < 8.0 and set(divisors[2:]) == {8.0}


def test_phi3_longrope_gguf_is_refused(tmp_path, family_folders, default_tokenizer_metadata):
    reference = transformers.AutoModelForCausalLM.from_pretrained(family_folders["phi3"])
    factors = np.ones(8, dtype=np.float32)  # (D/2,)
    write_family_gguf(tmp_path / "phi3.gguf", "phi3", reference, default_tokenizer_metadata,
                      {"rope_factors_long.weight": factors, "rope_factors_short.weight": factors})
    with pytest.raises(CheckpointError, match=r"longrope scaling \(rope_factors_long.weight.*is not supported"):
        read_gguf(tmp_path / "phi3.gguf")


# Tokenizers: each family's pre-tokenizer as its tokenizer.json spells it (Llama 3: digits in runs of up to
# three; Qwen2: one digit at a time, NFC first), on a small byte-level BPE trained here.

FAMILY_SPLITS = {
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
              r"\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
             r"\s+(?!\S)|\s+",
}
MULTILINGUAL = (
    "Hello, world! It's 2025; we'll ship 1234567 units.\n\n\n   Indented\t\ttabs   and trailing   \r\n"
    "机器学习是人工智能的一个分支。 Café naïve, ça va? Ελληνικά, русский 😀🎉 👩‍👩‍👧 🇫🇷 x=3.14159 a\n\n1"
)
TRAINING = [MULTILINGUAL, "It's 2024 and they've said 42 times: don't stop!\n  def main():\n\treturn 0\n"] * 20


def family_tokenizer_folder(folder, kind: str) -> Backend:
    """A tokenizer.json laid out as the family's own (Split + ByteLevel, Qwen2's NFC), as transformers reads it."""
    backend = Backend(models.BPE())
    if kind == "qwen2":
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(FAMILY_SPLITS[kind]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
                                  show_progress=False)
    backend.train_from_iterator(TRAINING, trainer)
    backend.decoder = decoders.ByteLevel()
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    return backend


@pytest.mark.parametrize("kind", list(FAMILY_SPLITS))
def test_family_tokenizers_from_tokenizer_json_and_gguf_match_transformers(kind, tmp_path):
    backend = family_tokenizer_folder(tmp_path / "folder", kind)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path / "folder")
    expected = reference(MULTILINGUAL, add_special_tokens=False)["input_ids"]
    assert len(expected) < len(MULTILINGUAL.encode()) / 2  # the BPE merged; the ids say something

    from_folder = Tokenizer.from_hf_folder(tmp_path / "folder")
    assert from_folder.encode(MULTILINGUAL, add_special_tokens=False) == expected
    assert from_folder.eos_token_ids == [2, 1]

    # The same vocabulary as llama.cpp's converter writes it: tokens by id, merges, types, the pre-tokenizer's name.
    model = json.loads(backend.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    writer = gguf.GGUFWriter(tmp_path / "tokenizer.gguf", "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZERS[kind])
    writer.add_token_list(tokens)
    writer.add_token_merges([" ".join(merge) for merge in model["merges"]])
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    from_gguf = Tokenizer.from_gguf(tmp_path / "tokenizer.gguf")
    assert from_gguf.encode(MULTILINGUAL, add_special_tokens=False) == expected
    assert from_gguf.decode(expected) == reference.decode(expected) == MULTILINGUAL
