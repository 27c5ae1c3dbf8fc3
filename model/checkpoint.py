"""Reads pretrained checkpoints (Hugging Face folders, llama.cpp GGUF files) into a GPTConfig and our state dict.

Every source-to-ours name mapping is written out below and every tensor's shape is checked as it is taken;
all weights come out float32.
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError

from gptserve.model.config import GPTConfig, RopeScaling
from gptserve.model.gpt import GPT
from gptserve.model.tokenizer import TokenizerError, read_gguf_metadata

StateDict = dict[str, torch.Tensor]
Shape = tuple[int, ...]

HF_FAMILIES = {  # model_type -> architecture
    "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM",
}
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3")
_Q = gguf.GGMLQuantizationType
# Types gguf.quants can dequantize that llama-family files commonly use.
GGUF_TENSOR_TYPES = (_Q.F32, _Q.F16, _Q.BF16, _Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1, _Q.Q8_0,
                     _Q.Q2_K, _Q.Q3_K, _Q.Q4_K, _Q.Q5_K, _Q.Q6_K)


class CheckpointError(ValueError):
    """A checkpoint we cannot read: wrong format, unsupported architecture, missing or misshapen tensors."""


class _Source:
    """One checkpoint's tensors, taken by name with their shape checked; any left untaken is an error."""

    def __init__(self, name: str, shapes: dict[str, Shape], load: Callable[[str], torch.Tensor]) -> None:
        self.name, self.shapes, self.load = name, dict(shapes), load

    def __contains__(self, tensor_name: str) -> bool:
        return tensor_name in self.shapes

    def take(self, tensor_name: str, shape: Shape) -> torch.Tensor:
        if tensor_name not in self.shapes:
            raise CheckpointError(f"{self.name}: missing tensor {tensor_name!r} (expected shape {list(shape)})")
        actual = self.shapes.pop(tensor_name)
        if actual != tuple(shape):
            raise CheckpointError(
                f"{self.name}: tensor {tensor_name!r} has shape {list(actual)}, expected {list(shape)}")
        return self.load(tensor_name).to(torch.float32).contiguous()

    def take_head(self, tensor_name: str, config: GPTConfig, state: StateDict) -> None:
        """The LM head: its own weight when untied; when tied, a stored copy must equal the embedding."""
        shape = (config.vocab_size, config.n_embd)
        if not config.tie_embeddings:
            state["lm_head.weight"] = self.take(tensor_name, shape)
        elif tensor_name in self and not torch.equal(self.take(tensor_name, shape), state["wte.weight"]):
            raise CheckpointError(f"{self.name}: embeddings are tied but {tensor_name!r} differs from them")

    def check_all_taken(self) -> None:
        if self.shapes:
            names = sorted(self.shapes)
            more = f" and {len(names) - 8} more" if len(names) > 8 else ""
            raise CheckpointError(f"{self.name}: unexpected tensors {names[:8]}{more}")


def _field(values: dict, key: str, source: str):
    if key not in values:
        raise CheckpointError(f"{source}: missing {key!r}")
    return values[key]


def _make_config(source: str, **fields) -> GPTConfig:
    try:
        return GPTConfig(**fields)
    except ValueError as error:
        raise CheckpointError(f"{source}: {error}") from error


def load_gpt(config: GPTConfig, state_dict: StateDict) -> GPT:
    """A GPT in eval mode holding exactly these weights (no parameter missing, none left over)."""
    model = GPT(config)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"state dict does not fit the model: {error}") from error
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face folders: config.json plus safetensors or pytorch_model.bin weights (single or sharded).


def read_hf_folder(path: str | Path) -> tuple[GPTConfig, StateDict]:
    """The config and float32 state dict of a Hugging Face folder of one of HF_FAMILIES, in our names."""
    folder = Path(path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no config.json; expected a Hugging Face model folder")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_path}: not valid JSON ({error})") from error
    supported = ", ".join(f"{kind} ({architecture})" for kind, architecture in HF_FAMILIES.items())
    model_type = hf.get("model_type")
    if model_type not in HF_FAMILIES:
        raise CheckpointError(f"{config_path}: unsupported model_type {model_type!r}; supported: {supported}")
    architectures = hf.get("architectures") or [HF_FAMILIES[model_type]]
    if architectures != [HF_FAMILIES[model_type]]:
        raise CheckpointError(f"{config_path}: unsupported architectures {architectures}; supported: {supported}")

    if model_type == "gpt2":
        config = _gpt2_config(hf, str(config_path))
        tensors = {
            # GPT2LMHeadModel prefixes the body with "transformer."; a bare GPT2Model checkpoint does not.
            name.removeprefix("transformer."): tensor for name, tensor in _read_hf_weights(folder).items()
            # Old GPT-2 checkpoints saved their causal-mask buffers next to the weights.
            if not name.endswith((".attn.bias", ".attn.masked_bias"))
        }
        convert = _gpt2_state_dict
    else:
        config = _decoder_config(hf, model_type, str(config_path))
        tensors = {
            name: tensor for name, tensor in _read_hf_weights(folder).items()
            # Old Llama checkpoints saved their rotary frequencies; ours come from rope_theta.
            if not name.endswith("rotary_emb.inv_freq")
        }
        convert = _llama_hf_state_dict
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    source = _Source(str(folder), shapes, tensors.__getitem__)
    state = convert(config, source)
    source.check_all_taken()
    return config, state


def _read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in HF_WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            weight_map = _field(json.loads(path.read_text()), "weight_map", str(path))
            files = [folder / shard for shard in sorted(set(weight_map.values()))]
        else:
            files = [path]
        tensors = {}
        for file in files:
            tensors.update(_read_weights_file(file))
        return tensors
    raise CheckpointError(f"{folder}: no weights file; expected one of {', '.join(HF_WEIGHT_FILES)}")


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return safetensors.torch.load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as error:
        raise CheckpointError(f"{path}: unreadable weights file ({error})") from error


def _gpt2_config(hf: dict, source: str) -> GPTConfig:
    # Our MLP uses the tanh-approximated GELU, which is what GPT-2's "gelu_new" is.
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"{source}: activation_function {activation!r}; expected gelu_new")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise CheckpointError(f"{source}: only the standard 1/sqrt(head size) attention scaling is supported")
    n_embd = _field(hf, "n_embd", source)
    return _make_config(
        source,
        vocab_size=_field(hf, "vocab_size", source),
        n_layer=_field(hf, "n_layer", source),
        n_head=_field(hf, "n_head", source),
        n_embd=n_embd,
        context_length=_field(hf, "n_positions", source),
        intermediate_size=hf.get("n_inner") or 4 * n_embd,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        architecture="gpt2",
    )


def _gpt2_state_dict(config: GPTConfig, source: _Source) -> StateDict:
    C, I = config.n_embd, config.intermediate_size  # noqa: E741 (I: the MLP width, as the shape comments name it)

    def take_conv1d(name: str, in_features: int, out_features: int) -> torch.Tensor:
        # GPT-2's Conv1D stores its weight as (in, out); nn.Linear wants (out, in).
        return source.take(name, (in_features, out_features)).t().contiguous()

    state = {
        "wte.weight": source.take("wte.weight", (config.vocab_size, C)),
        "wpe.weight": source.take("wpe.weight", (config.context_length, C)),
    }
    for i in range(config.n_layer):
        theirs, ours = f"h.{i}.", f"blocks.{i}."
        for their_norm, our_norm in (("ln_1", "norm_1"), ("ln_2", "norm_2")):
            for part in ("weight", "bias"):
                state[f"{ours}{our_norm}.{part}"] = source.take(f"{theirs}{their_norm}.{part}", (C,))
        # c_attn is q, k and v side by side along the output dimension.
        qkv_weight = take_conv1d(theirs + "attn.c_attn.weight", C, 3 * C)  # (3C, C)
        qkv_bias = source.take(theirs + "attn.c_attn.bias", (3 * C,))
        for name, weight, bias in zip("qkv", qkv_weight.split(C), qkv_bias.split(C)):
            state[f"{ours}attn.{name}_proj.weight"] = weight.contiguous()
            state[f"{ours}attn.{name}_proj.bias"] = bias.contiguous()
        state[ours + "attn.o_proj.weight"] = take_conv1d(theirs + "attn.c_proj.weight", C, C)
        state[ours + "attn.o_proj.bias"] = source.take(theirs + "attn.c_proj.bias", (C,))
        state[ours + "mlp.up.weight"] = take_conv1d(theirs + "mlp.c_fc.weight", C, I)
        state[ours + "mlp.up.bias"] = source.take(theirs + "mlp.c_fc.bias", (I,))
        state[ours + "mlp.down.weight"] = take_conv1d(theirs + "mlp.c_proj.weight", I, C)
        state[ours + "mlp.down.bias"] = source.take(theirs + "mlp.c_proj.bias", (C,))
    state["norm_f.weight"] = source.take("ln_f.weight", (C,))
    state["norm_f.bias"] = source.take("ln_f.bias", (C,))
    source.take_head("lm_head.weight", config, state)
    return state


# How each family differs from Llama in its Hugging Face config: the per-family facts, as data.
_QKV_BIAS = {"qwen2"}  # biases on q_proj, k_proj and v_proj only
_QK_NORM = {"qwen3"}  # q_norm and k_norm: RMSNorm over each head, before the rotary
_FUSED = {"phi3"}  # qkv_proj (q, k, v stacked) and gate_up_proj (gate, up stacked)
_SLIDING_SWITCHED = {"qwen2", "qwen3"}  # sliding_window counts only where use_sliding_window is set


def _rope(hf: dict, context_length: int, source: str) -> tuple[float, RopeScaling | None]:
    """rope_theta and the scaling, from transformers 5's rope_parameters or older rope_theta and rope_scaling."""
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise CheckpointError(f"{source}: partial_rotary_factor {partial} is not supported; expected 1.0 "
                              "(rotary positions over the whole head)")
    kind = rope.get("rope_type", rope.get("type", "default"))
    original = int(rope.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings") or 0)
    if kind in ("default", "dynamic"):
        # Dynamic NTK scaling changes the frequencies only past max_position_embeddings, our context length:
        # within it, it is the plain rotary.
        return theta, None
    if kind == "linear":
        return theta, RopeScaling("linear", factor=float(_field(rope, "factor", source + " rope_parameters")))
    if kind == "llama3":
        where = source + " rope_parameters"
        return theta, _rope_scaling(
            source, kind="llama3", factor=float(_field(rope, "factor", where)), original_context=original,
            low_freq_factor=float(_field(rope, "low_freq_factor", where)),
            high_freq_factor=float(_field(rope, "high_freq_factor", where)))
    if kind == "yarn":
        if not original:
            raise CheckpointError(f"{source}: yarn rope scaling needs original_max_position_embeddings")
        factor = float(rope.get("factor") or context_length / original)
        attention_factor = rope.get("attention_factor")
        if attention_factor is None:  # the paper's mscale: 0.1 ln(factor) + 1, or a ratio of two such
            mscale = lambda scale, m=1.0: 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
            if rope.get("mscale") and rope.get("mscale_all_dim"):
                attention_factor = mscale(factor, rope["mscale"]) / mscale(factor, rope["mscale_all_dim"])
            else:
                attention_factor = mscale(factor)
        return theta, _rope_scaling(
            source, kind="yarn", factor=factor, original_context=original,
            beta_fast=float(rope.get("beta_fast") or 32.0), beta_slow=float(rope.get("beta_slow") or 1.0),
            truncate=bool(rope.get("truncate", True)), attention_factor=float(attention_factor))
    if kind == "longrope":
        raise CheckpointError(f"{source}: rope scaling 'longrope' (rope_parameters.rope_type; Phi-3's 128k-context "
                              "models) is not supported; the 4k-context models use none")
    raise CheckpointError(f"{source}: rope scaling {kind!r} (rope_parameters.rope_type) is not supported; "
                          "supported: default, linear, dynamic, llama3, yarn")


def _rope_scaling(source: str, **fields) -> RopeScaling:
    try:
        return RopeScaling(**fields)
    except ValueError as error:
        raise CheckpointError(f"{source}: {error}") from error


def _sliding_window(hf: dict, model_type: str, context_length: int, source: str) -> int | None:
    """The attention window, or None where every query sees its whole past within the context length."""
    window = hf.get("sliding_window")
    if model_type in _SLIDING_SWITCHED and not hf.get("use_sliding_window", False):
        window = None
    layer_types = set(hf.get("layer_types") or [])
    if window is not None and layer_types - {"sliding_attention"}:
        raise CheckpointError(f"{source}: a sliding window on some layers only (layer_types {sorted(layer_types)}) "
                              "is not supported; expected it on every layer or on none")
    # A window at least as long as the context never hides a position.
    return window if window is not None and window < context_length else None


def _decoder_config(hf: dict, model_type: str, source: str) -> GPTConfig:
    """Llama and the families that differ from it in a few fields: Qwen2, Qwen3, Mistral, Phi-3."""
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {hf['hidden_act']!r}; expected silu")
    attention_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    if model_type in _QKV_BIAS:
        bias, qkv_bias = False, True
    elif attention_bias != mlp_bias:
        # Llama's attention_bias covers the output projection too: our `bias` is every projection or none.
        raise CheckpointError(f"{source}: attention_bias {attention_bias} with mlp_bias {mlp_bias}; "
                              "expected both true or both false")
    else:
        bias, qkv_bias = attention_bias, False
    n_embd, n_head = _field(hf, "hidden_size", source), _field(hf, "num_attention_heads", source)
    head_dim = hf.get("head_dim") or n_embd // n_head
    context_length = _field(hf, "max_position_embeddings", source)
    rope_theta, rope_scaling = _rope(hf, context_length, source)
    return _make_config(
        source,
        vocab_size=_field(hf, "vocab_size", source),
        n_layer=_field(hf, "num_hidden_layers", source),
        n_head=n_head,
        n_kv_heads=hf.get("num_key_value_heads") or n_head,
        n_embd=n_embd,
        context_length=context_length,
        intermediate_size=_field(hf, "intermediate_size", source),
        positions="rope",
        rope_theta=rope_theta,
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="swiglu",
        bias=bias,
        tie_embeddings=hf.get("tie_word_embeddings", False),
        architecture=model_type,
        # Written only where it differs, so a Llama-shaped config stays what it was.
        head_size=head_dim if head_dim != n_embd // n_head or n_embd % n_head else None,
        qkv_bias=qkv_bias,
        qk_norm=model_type in _QK_NORM,
        sliding_window=_sliding_window(hf, model_type, context_length, source),
        rope_scaling=rope_scaling,
    )


def _llama_layer(config: GPTConfig) -> list[tuple[str, str, str, Shape]]:
    """Per block: our name, the Hugging Face name, the GGUF name, and the shape (nn.Linear's (out, in))."""
    C, I, D = config.n_embd, config.intermediate_size, config.head_dim  # noqa: E741 (the MLP width)
    H, KV = config.n_head, config.kv_heads
    layer = [
        ("norm_1.weight", "input_layernorm.weight", "attn_norm.weight", (C,)),
        ("attn.q_proj.weight", "self_attn.q_proj.weight", "attn_q.weight", (H * D, C)),
        ("attn.k_proj.weight", "self_attn.k_proj.weight", "attn_k.weight", (KV * D, C)),
        ("attn.v_proj.weight", "self_attn.v_proj.weight", "attn_v.weight", (KV * D, C)),
        ("attn.o_proj.weight", "self_attn.o_proj.weight", "attn_output.weight", (C, H * D)),
        ("norm_2.weight", "post_attention_layernorm.weight", "ffn_norm.weight", (C,)),
        ("mlp.gate.weight", "mlp.gate_proj.weight", "ffn_gate.weight", (I, C)),
        ("mlp.up.weight", "mlp.up_proj.weight", "ffn_up.weight", (I, C)),
        ("mlp.down.weight", "mlp.down_proj.weight", "ffn_down.weight", (C, I)),
    ]
    if config.bias:  # every projection has a bias as long as its output
        layer += [(ours.replace(".weight", ".bias"), theirs.replace(".weight", ".bias"),
                   gguf_name.replace(".weight", ".bias"), shape[:1])
                  for ours, theirs, gguf_name, shape in layer if "norm" not in ours]
    elif config.qkv_bias:
        layer += [(f"attn.{x}_proj.bias", f"self_attn.{x}_proj.bias", f"attn_{x}.bias", (n * D,))
                  for x, n in (("q", H), ("k", KV), ("v", KV))]
    if config.qk_norm:
        layer += [("attn.q_norm.weight", "self_attn.q_norm.weight", "attn_q_norm.weight", (D,)),
                  ("attn.k_norm.weight", "self_attn.k_norm.weight", "attn_k_norm.weight", (D,))]
    return layer


_FUSED_PARTS = ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "mlp.gate.weight", "mlp.up.weight")


def _unfused_layer(config: GPTConfig) -> list[tuple[str, str, str, Shape]]:
    """_llama_layer without the weights Phi-3 stores fused (taken by _take_fused instead)."""
    layer = _llama_layer(config)
    return [entry for entry in layer if entry[0] not in _FUSED_PARTS] if config.architecture in _FUSED else layer


def _take_fused(config: GPTConfig, source: _Source, qkv_name: str, gate_up_name: str, ours: str,
                state: StateDict) -> None:
    """Phi-3's fused weights split: q, k and v stacked along the output rows, the MLP's gate above its up."""
    H, KV, D, C, I = (config.n_head, config.kv_heads, config.head_dim, config.n_embd,  # noqa: E741
                      config.intermediate_size)
    qkv = source.take(qkv_name, ((H + 2 * KV) * D, C))  # ((H+2KV)D, C)
    for name, weight in zip("qkv", qkv.split([H * D, KV * D, KV * D])):
        state[f"{ours}attn.{name}_proj.weight"] = weight.contiguous()
    gate, up = source.take(gate_up_name, (2 * I, C)).split(I)  # each (I, C)
    state[ours + "mlp.gate.weight"], state[ours + "mlp.up.weight"] = gate.contiguous(), up.contiguous()


def _llama_hf_state_dict(config: GPTConfig, source: _Source) -> StateDict:
    state = {"wte.weight": source.take("model.embed_tokens.weight", (config.vocab_size, config.n_embd))}
    for i in range(config.n_layer):
        theirs, ours = f"model.layers.{i}.", f"blocks.{i}."
        for our_name, their_name, _, shape in _unfused_layer(config):
            state[ours + our_name] = source.take(theirs + their_name, shape)
        if config.architecture in _FUSED:
            _take_fused(config, source, theirs + "self_attn.qkv_proj.weight", theirs + "mlp.gate_up_proj.weight",
                        ours, state)
    state["norm_f.weight"] = source.take("model.norm.weight", (config.n_embd,))
    source.take_head("lm_head.weight", config, state)
    return state


# ---------------------------------------------------------------------------------------------------------------
# GGUF files (llama.cpp): llama (Mistral too), qwen2 and qwen3 architectures, dequantized to float32.


def read_gguf(path: str | Path) -> tuple[GPTConfig, StateDict]:
    """The config and float32 (dequantized) state dict of a llama, qwen2, qwen3 or phi3 GGUF file, in our names."""
    path = Path(path)
    reader = _open_gguf(path)
    try:
        metadata = read_gguf_metadata(path)  # the project's one GGUF header reader; the tensors are gguf's
    except TokenizerError as error:
        raise CheckpointError(str(error)) from error
    architecture = metadata.get("general.architecture")
    if architecture not in GGUF_ARCHITECTURES:
        raise CheckpointError(f"{path}: GGUF architecture {architecture!r} is not supported; "
                              f"supported: {', '.join(GGUF_ARCHITECTURES)}")
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    # GGUF lists dimensions fastest-varying first (ggml's ne); torch's order is the reverse.
    shapes = {name: tuple(int(n) for n in reversed(tensor.shape)) for name, tensor in tensors.items()}

    def load(name: str) -> torch.Tensor:
        tensor = tensors[name]
        if tensor.tensor_type not in GGUF_TENSOR_TYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has type {tensor.tensor_type.name}; supported: "
                                  f"{', '.join(kind.name for kind in GGUF_TENSOR_TYPES)}")
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        # A copy: the reader's arrays are views into the memory-mapped file.
        return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shapes[name])

    source = _Source(str(path), shapes, load)
    config = _gguf_config(architecture, metadata, source)
    # llama.cpp rotates adjacent pairs for llama (its converter reorders q and k rows to suit) and each head's
    # halves, as Hugging Face does, for qwen2, qwen3 and phi3 (stored as they are).
    permuted = architecture == "llama"
    state = {"wte.weight": source.take("token_embd.weight", (config.vocab_size, config.n_embd))}
    for i in range(config.n_layer):
        for ours, _, theirs, shape in _unfused_layer(config):
            weight = source.take(f"blk.{i}.{theirs}", shape)
            if permuted and theirs in ("attn_q.weight", "attn_k.weight"):
                weight = _unpermute_rotary_rows(weight, config.n_head if theirs == "attn_q.weight" else config.kv_heads)
            state[f"blocks.{i}.{ours}"] = weight
        if architecture in _FUSED:  # llama.cpp keeps Phi-3's fusion: attn_qkv, and ffn_up holding gate and up
            _take_fused(config, source, f"blk.{i}.attn_qkv.weight", f"blk.{i}.ffn_up.weight", f"blocks.{i}.", state)
    state["norm_f.weight"] = source.take("output_norm.weight", (config.n_embd,))
    source.take_head("output.weight", config, state)
    source.check_all_taken()
    return config, state


def _open_gguf(path: Path) -> gguf.GGUFReader:
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as error:
        raise CheckpointError(f"cannot read GGUF file {path}: {error}") from error
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError) as error:
        # The reader fails deep in numpy (a short view, a bad reshape): say what that means.
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file ({error})") from error


def _gguf_config(architecture: str, metadata: dict, source: _Source) -> GPTConfig:
    where = source.name
    key = lambda name: f"{architecture}.{name}"  # metadata keys are prefixed with the architecture
    n_embd = _field(metadata, key("embedding_length"), where)
    n_head = _field(metadata, key("attention.head_count"), where)
    head_dim = metadata.get(key("attention.key_length"), n_embd // n_head)
    if metadata.get(key("expert_count"), 0):
        raise CheckpointError(f"{where}: mixture-of-experts {architecture} is not supported; expected a dense model")
    for name in ("rope.dimension_count", "attention.value_length"):
        if metadata.get(key(name), head_dim) != head_dim:
            raise CheckpointError(f"{where}: {key(name)} {metadata[key(name)]}; expected the head size {head_dim}")
    rope_scaling = None
    scaling = metadata.get(key("rope.scaling.type"), "none")
    if scaling == "linear":
        rope_scaling = RopeScaling("linear", factor=float(_field(metadata, key("rope.scaling.factor"), where)))
    elif scaling != "none":
        raise CheckpointError(f"{where}: rope scaling {scaling!r} ({key('rope.scaling.type')}) is not supported; "
                              "supported: none, linear, and per-frequency factors (rope_freqs.weight)")
    if "rope_factors_long.weight" in source or "rope_factors_short.weight" in source:
        raise CheckpointError(f"{where}: longrope scaling (rope_factors_long.weight, rope_factors_short.weight; "
                              "Phi-3's 128k-context models) is not supported")
    if "rope_freqs.weight" in source:
        # Llama 3.1's scaling, as llama.cpp's converter writes it: each frequency's divisor, (D/2,).
        divisors = source.take("rope_freqs.weight", (head_dim // 2,))
        rope_scaling = RopeScaling("factors", frequency_divisors=tuple(divisors.tolist()))
    vocab_size = metadata.get(key("vocab_size")) or source.shapes.get("token_embd.weight", (0,))[0]
    context_length = _field(metadata, key("context_length"), where)
    window = metadata.get(key("attention.sliding_window"))  # Phi-3's; a window as long as the context is none
    return _make_config(
        where,
        vocab_size=vocab_size,
        n_layer=_field(metadata, key("block_count"), where),
        n_head=n_head,
        n_kv_heads=metadata.get(key("attention.head_count_kv"), n_head),
        n_embd=n_embd,
        context_length=context_length,
        intermediate_size=_field(metadata, key("feed_forward_length"), where),
        positions="rope",
        rope_theta=float(metadata.get(key("rope.freq_base"), 10000.0)),
        norm="rmsnorm",
        norm_eps=float(_field(metadata, key("attention.layer_norm_rms_epsilon"), where)),
        mlp="swiglu",
        bias=False,
        # llama.cpp's converter leaves output.weight out when the head shares the embedding.
        tie_embeddings="output.weight" not in source,
        architecture=architecture,
        head_size=head_dim if head_dim != n_embd // n_head or n_embd % n_head else None,
        qkv_bias=architecture == "qwen2",
        qk_norm=architecture == "qwen3",
        sliding_window=window if window and window < context_length else None,
        rope_scaling=rope_scaling,
    )


def _unpermute_rotary_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of attn_q / attn_k rows, back to Hugging Face's order.

    Hugging Face rotates each head's two halves together (x[j] with x[j + D/2]); ggml rotates adjacent pairs
    (x[2j] with x[2j + 1]). The converter therefore interleaves the halves of every head's rows, [a0 .. a(D/2-1),
    b0 .. b(D/2-1)] -> [a0, b0, a1, b1, ...]; our rotate_half RoPE needs them back in halves.
    """
    out_features, in_features = weight.shape
    D = out_features // n_heads
    pairs = weight.view(n_heads, D // 2, 2, in_features)  # (heads, D/2, pair, in): as stored
    return pairs.transpose(1, 2).reshape(out_features, in_features)  # (heads, half, D/2, in) flattened
