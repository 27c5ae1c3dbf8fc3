"""Checkpoint readers against transformers: tiny random GPT-2 and Llama folders, GGUF files written here, and the
default model's real GGUF; then the ways a checkpoint can be wrong."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from gptserve.model.checkpoint import CheckpointError, load_gpt, read_gguf, read_hf_folder
from gptserve.model.tokenizer import read_gguf_metadata

VOCAB = 128
PROMPT_LENGTH, DECODE_STEPS = 8, 16
Q = gguf.GGMLQuantizationType


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.15) -> torch.nn.Module:
    # transformers' default init (std 0.02) gives near-uniform logits, so greedy tokens hardly vary. Much wider
    # (0.5) saturates attention and blows float32 rounding (a 1-row decode matmul sums in another order than the
    # full-sequence one) up to ~1e-4 in the logits; 0.15 keeps tokens varied and that noise near 5e-6.
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name and "ln_" not in name:
                parameter.normal_(0.0, std)
    return model.eval()


def tiny_gpt2(tie: bool = True) -> transformers.GPT2LMHeadModel:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                     tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0)
    return randomize(transformers.GPT2LMHeadModel(config))


def tiny_llama(tie: bool, bias: bool = False) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=5000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias, bos_token_id=1, eos_token_id=2,
    )
    return randomize(transformers.LlamaForCausalLM(config))


def save_bin(model: transformers.PreTrainedModel, folder, strip_prefix: str = "") -> None:
    # transformers 5 always writes safetensors, so the pytorch_model.bin layout is written by hand.
    model.config.save_pretrained(folder)
    state = {name.removeprefix(strip_prefix): tensor for name, tensor in model.state_dict().items()}
    torch.save(state, folder / "pytorch_model.bin")


def random_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def greedy_decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, steps: int):
    """Prefill, then `steps` one-token forwards on our KV cache: (prefill logits, tokens fed, their logits)."""
    logits, past = model(input_ids, attention_mask)
    prefill_logits, tokens, decode_logits = logits, [], []
    for _ in range(steps):
        token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        attention_mask = torch.cat((attention_mask, torch.ones_like(token)), dim=1)
        logits, past = model(token, attention_mask, past)  # (B, 1, V)
        tokens.append(token)
        decode_logits.append(logits)
    return prefill_logits, torch.cat(tokens, dim=1), torch.cat(decode_logits, dim=1)


def left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (B, longest prompt): rows right-aligned, padding (id 0) on the left."""
    width = max(map(len, prompts))
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = prompt
        attention_mask[row, width - len(prompt):] = 1
    return input_ids, attention_mask


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face folders: every way of saving we read, each checked against transformers.


def _gpt2_safetensors(folder):
    model = tiny_gpt2(tie=True)
    model.save_pretrained(folder)
    return model


def _gpt2_bin_bare_untied(folder):
    # A GPT2Model-style checkpoint: no "transformer." prefix, pickled, with its own LM head.
    model = tiny_gpt2(tie=False)
    save_bin(model, folder, strip_prefix="transformer.")
    return model


def _llama_tied_sharded(folder):
    model = tiny_llama(tie=True)
    model.save_pretrained(folder, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").exists()
    return model


def _llama_untied_bias_bin(folder):
    model = tiny_llama(tie=False, bias=True)
    save_bin(model, folder)
    return model


HF_CASES = {
    "gpt2-safetensors": _gpt2_safetensors,
    "gpt2-bin-bare-untied": _gpt2_bin_bare_untied,
    "llama-tied-sharded": _llama_tied_sharded,
    "llama-untied-bias-bin": _llama_untied_bias_bin,
}


@pytest.fixture(scope="module", params=list(HF_CASES))
def hf_pair(request, tmp_path_factory):
    """(transformers model, our model read back from the folder it was saved to)."""
    folder = tmp_path_factory.mktemp(request.param)
    reference = HF_CASES[request.param](folder)
    config, state = read_hf_folder(folder)
    assert config.tie_embeddings == reference.config.tie_word_embeddings
    return reference, load_gpt(config, state)


@torch.no_grad()
def test_prefill_matches_transformers(hf_pair):
    reference, ours = hf_pair
    input_ids = random_ids(2, PROMPT_LENGTH, seed=1)
    logits, _ = ours(input_ids, torch.ones_like(input_ids))
    assert max_diff(logits, reference(input_ids).logits) <= 1e-5


@torch.no_grad()
def test_cached_decode_matches_transformers_and_recompute(hf_pair):
    reference, ours = hf_pair
    prompt = random_ids(1, PROMPT_LENGTH, seed=2)
    prefill_logits, tokens, decode_logits = greedy_decode(ours, prompt, torch.ones_like(prompt), DECODE_STEPS)
    sequence = torch.cat((prompt, tokens), dim=1)  # (1, T + steps)
    cached = torch.cat((prefill_logits, decode_logits), dim=1)  # logits at every position of the sequence

    assert max_diff(cached, reference(sequence).logits) <= 1e-5
    recomputed, _ = ours(sequence, torch.ones_like(sequence))
    assert max_diff(cached, recomputed) <= 1e-5
    assert torch.equal(recomputed[:, PROMPT_LENGTH - 1:-1].argmax(-1), tokens)
    assert len(tokens.unique()) > 1


@torch.no_grad()
def test_left_padded_batch_matches_rows_alone(hf_pair):
    _, ours = hf_pair
    prompts = [random_ids(1, length, seed=10 + length)[0] for length in (PROMPT_LENGTH, 5, 2)]
    input_ids, attention_mask = left_pad(prompts)
    batch_prefill, batch_tokens, batch_decode = greedy_decode(ours, input_ids, attention_mask, DECODE_STEPS)

    for row, prompt in enumerate(prompts):
        alone = prompt[None]
        prefill, tokens, decode = greedy_decode(ours, alone, torch.ones_like(alone), DECODE_STEPS)
        assert max_diff(batch_prefill[row, PROMPT_LENGTH - len(prompt):], prefill[0]) <= 1e-5
        assert max_diff(batch_decode[row], decode[0]) <= 1e-5
        assert torch.equal(batch_tokens[row], tokens[0])
    assert len(batch_tokens.unique()) > 1


# ---------------------------------------------------------------------------------------------------------------
# GGUF files written here the way llama.cpp's converter writes them.

GGUF_NAMES = [  # transformers name fragment -> llama.cpp name fragment
    ("model.embed_tokens.", "token_embd."), ("model.norm.", "output_norm."), ("lm_head.", "output."),
    ("model.layers.", "blk."), ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"), ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
]


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows: each head's two rotary halves interleaved pairwise."""
    out_features, in_features = weight.shape
    return (weight.reshape(n_heads, 2, out_features // n_heads // 2, in_features)
            .swapaxes(1, 2).reshape(out_features, in_features))


def write_llama_gguf(path, model: transformers.LlamaForCausalLM, tensor_type: Q = Q.F32,
                     leave_out: str | None = None) -> None:
    """A GGUF of a transformers Llama; its matrices stored as tensor_type, norms float32 as llama.cpp does."""
    config = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    for name, tensor in model.state_dict().items():
        if name == leave_out or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue  # llama.cpp leaves the tied head out
        values = tensor.numpy()
        if "q_proj" in name:
            values = llama_cpp_permute(values, config.num_attention_heads)
        elif "k_proj" in name:
            values = llama_cpp_permute(values, config.num_key_value_heads)
        for theirs, ours in GGUF_NAMES:
            name = name.replace(theirs, ours)
        if values.ndim == 2 and tensor_type != Q.F32:
            writer.add_tensor(name, gguf.quants.quantize(values, tensor_type), raw_dtype=tensor_type)
        else:
            writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@torch.no_grad()
def test_float32_gguf_matches_transformers(tmp_path, tie):
    reference = tiny_llama(tie=tie)
    write_llama_gguf(tmp_path / "tiny.gguf", reference)
    config, state = read_gguf(tmp_path / "tiny.gguf")
    assert config.tie_embeddings == tie and config.kv_heads == 2 and config.rope_theta == 5000.0
    ours = load_gpt(config, state)

    prompt = random_ids(1, PROMPT_LENGTH, seed=3)
    prefill_logits, tokens, decode_logits = greedy_decode(ours, prompt, torch.ones_like(prompt), DECODE_STEPS)
    sequence = torch.cat((prompt, tokens), dim=1)
    cached = torch.cat((prefill_logits, decode_logits), dim=1)
    assert max_diff(cached, reference(sequence).logits) <= 1e-5
    assert len(tokens.unique()) > 1


# Worst-case rounding error of each type relative to the tensor's largest magnitude; a wrong row order or block
# layout would err by up to twice that largest magnitude.
QUANTIZED_TOLERANCE = {Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1 / 60, Q.Q5_0: 1 / 15, Q.Q5_1: 1 / 15,
                       Q.Q4_0: 1 / 7, Q.Q4_1: 1 / 7}


HF_TO_OURS = [("model.embed_tokens.", "wte."), ("model.layers.", "blocks."), ("self_attn.", "attn."),
              ("mlp.gate_proj", "mlp.gate"), ("mlp.up_proj", "mlp.up"), ("mlp.down_proj", "mlp.down")]


@pytest.mark.parametrize("tensor_type", list(QUANTIZED_TOLERANCE), ids=lambda kind: kind.name)
def test_quantized_gguf_dequantizes_close_to_the_original(tmp_path, tensor_type):
    reference = tiny_llama(tie=False)
    write_llama_gguf(tmp_path / "tiny.gguf", reference, tensor_type)
    _, state = read_gguf(tmp_path / "tiny.gguf")
    for name, original in reference.state_dict().items():
        if original.ndim != 2:
            continue  # norms stay float32, as in llama.cpp's files
        for theirs, ours in HF_TO_OURS:
            name = name.replace(theirs, ours)
        assert state[name].dtype == torch.float32
        assert max_diff(state[name], original) <= QUANTIZED_TOLERANCE[tensor_type] * original.abs().max(), name


def test_unsupported_tensor_type_is_named(tmp_path):
    write_llama_gguf(tmp_path / "tiny.gguf", tiny_llama(tie=True), Q.MXFP4)
    with pytest.raises(CheckpointError, match=r"type MXFP4; supported: F32, F16, BF16, Q4_0, Q4_1"):
        read_gguf(tmp_path / "tiny.gguf")


# ---------------------------------------------------------------------------------------------------------------
# The default model (SmolLM2-135M-Instruct, Q4_1/Q8_0 GGUF) against transformers' own GGUF loading.

DEFAULT_STEPS = 32
DEFAULT_PROMPTS = {  # prompt -> a word its greedy continuation must hold, so both sides are right, not just equal
    "The capital of France is": "Paris",
    "def fibonacci(n):\n    ": "return",
    "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n": "Red",
}


def test_the_one_gguf_header_reader_agrees_with_the_gguf_library(default_gguf):
    """Checkpoints, tokenizers and the exporter all read GGUF metadata through read_gguf_metadata."""
    library = {key: field.contents() for key, field in gguf.GGUFReader(default_gguf).fields.items()
               if not key.startswith("GGUF.")}  # the reader's own header fields, not metadata
    assert read_gguf_metadata(default_gguf) == library


@pytest.fixture(scope="module")
def default_models(default_gguf):
    """(our model, transformers' model, transformers' tokenizer), all from the default GGUF file."""
    folder, name = default_gguf.parent, default_gguf.name
    ours = load_gpt(*read_gguf(default_gguf))
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return ours, reference.eval(), tokenizer


@torch.no_grad()
def test_default_gguf_matches_transformers(default_models):
    ours, reference, tokenizer = default_models
    assert ours.config.n_layer == 30 and ours.config.kv_heads == 3 and ours.config.tie_embeddings
    for text, expected in DEFAULT_PROMPTS.items():
        prompt = torch.tensor([tokenizer(text)["input_ids"]])  # (1, T)
        prefill_logits, tokens, decode_logits = greedy_decode(ours, prompt, torch.ones_like(prompt), DEFAULT_STEPS)
        output = reference(prompt, use_cache=True)  # transformers' own greedy loop on its own KV cache
        assert max_diff(prefill_logits, output.logits) <= 1e-4, text
        reference_tokens, reference_decode_logits = [], []
        for _ in range(DEFAULT_STEPS):
            token = output.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
            output = reference(token, past_key_values=output.past_key_values, use_cache=True)
            reference_tokens.append(token)
            reference_decode_logits.append(output.logits)
        assert torch.equal(tokens, torch.cat(reference_tokens, dim=1)), text
        assert max_diff(decode_logits, torch.cat(reference_decode_logits, dim=1)) <= 1e-4, text
        assert expected in tokenizer.decode(tokens[0]), text


# ---------------------------------------------------------------------------------------------------------------
# Bad input: each is a CheckpointError that says what was expected.


def test_truncated_gguf(tmp_path):
    write_llama_gguf(tmp_path / "whole.gguf", tiny_llama(tie=True))
    whole = (tmp_path / "whole.gguf").read_bytes()
    for size in (4, 30, 300, len(whole) // 2, len(whole) - 1):  # the last one cuts into the last tensor
        (tmp_path / "cut.gguf").write_bytes(whole[:size])
        with pytest.raises(CheckpointError, match="truncated or corrupt GGUF file"):
            read_gguf(tmp_path / "cut.gguf")


def test_not_a_gguf_file(tmp_path):
    safetensors.torch.save_file({"weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"not a GGUF file .*expected b'GGUF'"):
        read_gguf(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="cannot read GGUF file"):
        read_gguf(tmp_path / "absent.gguf")


def test_gguf_of_another_architecture(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "bert.gguf", "bert")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="GGUF architecture 'bert' is not supported; supported: llama"):
        read_gguf(tmp_path / "bert.gguf")


def test_gguf_missing_tensor(tmp_path):
    write_llama_gguf(tmp_path / "tiny.gguf", tiny_llama(tie=True), leave_out="model.layers.1.mlp.down_proj.weight")
    message = r"missing tensor 'blk.1.ffn_down.weight' \(expected shape \[64, 128\]\)"
    with pytest.raises(CheckpointError, match=message):
        read_gguf(tmp_path / "tiny.gguf")


def test_hf_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(CheckpointError, match=r"model_type 'bert'; supported: gpt2 \(GPT2LMHeadModel\), llama"):
        read_hf_folder(tmp_path)


def test_hf_unsupported_head(tmp_path):
    tiny_gpt2().config.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2ForTokenClassification"]}))
    with pytest.raises(CheckpointError, match=r"architectures \['GPT2ForTokenClassification'\]; supported"):
        read_hf_folder(tmp_path)


def test_hf_missing_config_or_weights(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        read_hf_folder(tmp_path)
    tiny_gpt2().config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no weights file; expected one of model.safetensors"):
        read_hf_folder(tmp_path)


@pytest.mark.parametrize("change, message", [
    (lambda state: state.pop("transformer.h.1.mlp.c_fc.bias"), r"missing tensor 'h.1.mlp.c_fc.bias'"),
    (lambda state: state.update(extra=torch.zeros(1)), r"unexpected tensors \['extra'\]"),
    (lambda state: state.update({"transformer.wpe.weight": torch.zeros(32, 64)}),
     r"tensor 'wpe.weight' has shape \[32, 64\], expected \[64, 64\]"),
    (lambda state: state.update({"lm_head.weight": torch.ones(VOCAB, 64)}),
     r"embeddings are tied but 'lm_head.weight' differs from them"),
], ids=["missing", "unexpected", "misshapen", "tied-head-differs"])
def test_hf_tensors_must_match_the_config(tmp_path, change, message):
    model = tiny_gpt2()
    model.config.save_pretrained(tmp_path)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items() if name != "lm_head.weight"}
    change(state)
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        read_hf_folder(tmp_path)


def test_load_gpt_is_strict(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    config, state = read_hf_folder(tmp_path)
    assert not load_gpt(config, state).training
    del state["blocks.0.mlp.up.bias"]
    with pytest.raises(CheckpointError, match="blocks.0.mlp.up.bias"):
        load_gpt(config, state)
