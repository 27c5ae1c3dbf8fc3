"""The graph contract of an exported model: tensor names, KV layout, and how to feed it. Torch-free: the
exporter, the certification, the engine and the tests all read it from here (and from the manifest)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Rows are ragged: row b's tokens (the new ones included) are the first sum(attention_mask[b]) positions, padding
# after them. A past may be longer than that: the graph treats it as a buffer with room and, when the same
# buffer is bound as the present, appends the new positions in place (see export/fused.py); the mask is then as
# wide as the longest row plus the new tokens, and the present as long as the buffer. A step with a past and more
# than one new token must be a batch of one (GroupQueryAttention's rule).
KV_LAYOUT = "[batch, kv_heads, sequence, head_dim]"
LOGITS = "logits"


def past_names(n_layer: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]


def present_names(n_layer: int) -> list[str]:
    return [f"present.{i}.{kind}" for i in range(n_layer) for kind in ("key", "value")]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy's name: int64, float32, float16
    shape: tuple[int | str, ...]  # symbolic dimensions are strings


@dataclass(frozen=True)
class OptionalInput:
    """An input with a default (an ONNX initializer of the same name): callers may leave it out."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    default: int


@dataclass(frozen=True)
class GraphContract:
    """The exported graph's file, inputs and outputs, as written in the manifest."""

    file: str
    opset: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    optional_inputs: tuple[OptionalInput, ...]
    kv_layout: str
    rows: str
    n_layer: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int

    @property
    def past_names(self) -> list[str]:
        return past_names(self.n_layer)

    @property
    def present_names(self) -> list[str]:
        return present_names(self.n_layer)

    def spec(self, name: str) -> TensorSpec:
        """The input or output of that name (not its position: nothing depends on the order of the lists)."""
        for spec in (*self.inputs, *self.outputs):
            if spec.name == name:
                return spec
        raise KeyError(f"the graph contract has no tensor {name!r}")

    @property
    def kv_dtype(self) -> np.dtype:
        return np.dtype(self.spec(self.past_names[0]).dtype)


def graph_contract(n_layer: int, n_kv_heads: int, head_dim: int, vocab_size: int, kv_dtype: str = "float32", *,
                   file: str, opset: int) -> GraphContract:
    kv_in = ("batch", n_kv_heads, "past_sequence", head_dim)
    kv_out = ("batch", n_kv_heads, "past_sequence + sequence", head_dim)
    return GraphContract(
        file=file,
        opset=opset,
        inputs=(
            TensorSpec("input_ids", "int64", ("batch", "sequence")),
            TensorSpec("attention_mask", "int64", ("batch", "past_sequence + sequence")),
            *(TensorSpec(name, kv_dtype, kv_in) for name in past_names(n_layer)),
        ),
        outputs=(
            TensorSpec(LOGITS, "float32", ("batch", "sequence", vocab_size)),
            *(TensorSpec(name, kv_dtype, kv_out) for name in present_names(n_layer)),
        ),
        # Without it the graph returns every position's logits (onnxruntime-genai feeds none).
        optional_inputs=(OptionalInput("logits_to_keep", "int64", (), 0),),
        kv_layout=KV_LAYOUT,
        rows="ragged: each row's tokens first, padding after",
        n_layer=n_layer,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        vocab_size=vocab_size,
    )


def ragged_mask(lengths: np.ndarray) -> np.ndarray:
    """(B, longest) attention mask of ragged rows: 1 on each row's first lengths[b] positions."""
    return (np.arange(lengths.max()) < lengths[:, None]).astype(np.int64)


def empty_past(graph: GraphContract, batch_size: int) -> list[np.ndarray]:
    shape = (batch_size, graph.n_kv_heads, 0, graph.head_dim)
    return [np.zeros(shape, dtype=graph.kv_dtype) for _ in range(2 * graph.n_layer)]


def feed(graph: GraphContract, input_ids: np.ndarray, attention_mask: np.ndarray, past: list,
         logits_to_keep: int | None = None) -> dict:
    """The session inputs: past is the flat list [layer 0 key, layer 0 value, layer 1 key, ...];
    logits_to_keep N asks for the last N positions' logits only (None: every position's)."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **dict(zip(graph.past_names, past))}
    if logits_to_keep is not None:
        inputs["logits_to_keep"] = np.array(logits_to_keep, dtype=np.int64)
    return inputs
