"""Reduced precisions of an exported fp32 graph, written into the same artifact format.

int4 and int8 are weight-only: every MatMul weight becomes ONNX Runtime's block-quantized MatMulNBits (blocks along
the input dimension, asymmetric, int8 compute on CPU); activations and the KV cache stay fp32. int4 takes blocks of
64, not 32: on the default model the same quality (perplexity ratio 1.21 against 1.22, top-1 agreement 0.68 against
0.69) and a batch-8 decode step about 10% faster (half the scales to apply); 128 raised the ratio to 1.29. int8
keeps 32: with 64 its agreement fell from 0.977 to 0.951, at its 0.95 threshold. In int4 the LM head's first 8192
token ids keep 8 bits: a BPE vocabulary numbers its tokens in merge order, most frequent first, and their logits are
the ones rounding hurts. On the default model an all 4-bit head raised the perplexity ratio to 1.37 (1.34 in blocks
of 16), an all 8-bit one kept 1.21 for 14 MB more read per token, and the split keeps 1.24 for about 2 MB more
(16384 ids: 1.23). The token embedding stays fp32: a Gather reads one row per token, so quantizing it saves memory
but no time. fp16 converts weights, activations and the KV cache for GPUs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from gptserve.export.manifest import Precision

PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "int8", "int4")
BLOCK_SIZES = {"int8": 32, "int4": 64}  # weights per scale (see above)
FREQUENT_TOKENS = 8192  # int4: LM head columns (token ids) that keep 8 bits (see above)
IR_VERSION = 10  # onnx can write newer IR versions than this onnxruntime reads


def untie_lm_head(model: onnx.ModelProto) -> None:
    """A tied LM head is exported as MatMul(x, Transpose(embedding)); give it a [C, V] initializer of its own so
    the quantizer sees a plain weight."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    producers = {output: node for node in model.graph.node for output in node.output}
    for node in model.graph.node:
        source = producers.get(node.input[1]) if node.op_type == "MatMul" else None
        if source is None or source.op_type != "Transpose" or source.input[0] not in initializers:
            continue
        weight = numpy_helper.to_array(initializers[source.input[0]]).T.copy()  # (C, V)
        model.graph.initializer.append(numpy_helper.from_array(weight, "lm_head.weight"))
        node.input[1] = "lm_head.weight"
        model.graph.node.remove(source)
        return


def split_lm_head(model: onnx.ModelProto, frequent: int) -> str:
    """Splits the LM head by token id: one MatMul for the first `frequent` ids, one for the rest, their logits
    concatenated. Returns the name of the first, the MatMul that keeps 8 bits (the whole head when the vocabulary
    is no larger). A BPE vocabulary numbers its tokens in merge order, so its first ids are its most frequent."""
    graph = model.graph
    head = next(node for node in graph.node if node.op_type == "MatMul" and "logits" in node.output)
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    weight = initializers.get(head.input[1])
    if weight is None or weight.dims[1] <= frequent:
        return head.name
    array = numpy_helper.to_array(weight)  # (C, V)
    graph.initializer.remove(weight)
    parts = []
    for part, columns in (("frequent", array[:, :frequent]), ("rare", array[:, frequent:])):
        graph.initializer.append(numpy_helper.from_array(columns.copy(), f"{weight.name}.{part}"))
        parts.append(onnx.helper.make_node("MatMul", [head.input[0], f"{weight.name}.{part}"], [f"logits.{part}"],
                                           name=f"{head.name}_{part}"))
    concat = onnx.helper.make_node("Concat", [part.output[0] for part in parts], ["logits"], axis=-1,
                                   name=f"{head.name}_concat")
    index = list(graph.node).index(head)
    graph.node.remove(head)
    for offset, node in enumerate([*parts, concat]):
        graph.node.insert(index + offset, node)
    return parts[0].name


def quantize_weights(model: onnx.ModelProto, bits: int, block_size: int, **selection) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # accuracy_level 4: int8 activations inside MatMulNBits, the fast CPU kernel for 4- and 8-bit weights.
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=False, accuracy_level=4,
                                     **selection)
    quantizer.process()
    return quantizer.model.model


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # Token ids, the mask and the logits keep their types; weights, activations and the KV cache go to fp16.
    return convert_float_to_float16(model, keep_io_types=["logits"], disable_shape_infer=True)


def convert(fp32_path: Path, out_path: Path, precision: Precision, source_quantized: bool) -> dict:
    """Writes the graph at `precision`; returns the manifest's notes on what was quantized."""
    model = onnx.load(str(fp32_path))
    notes = {"embedding": "fp32"}
    if precision == "int8":
        block = BLOCK_SIZES[precision]
        untie_lm_head(model)
        model = quantize_weights(model, bits=8, block_size=block)
        notes.update(method=f"MatMulNBits weight-only, 8-bit, block {block}, asymmetric",
                     quantized="every MatMul weight (attention, MLP, LM head)", lm_head="8-bit")
    elif precision == "int4":
        block = BLOCK_SIZES[precision]
        untie_lm_head(model)
        head = [split_lm_head(model, FREQUENT_TOKENS)]
        model = quantize_weights(model, bits=4, block_size=block, nodes_to_exclude=head)
        model = quantize_weights(model, bits=8, block_size=block, nodes_to_include=head)
        notes.update(method=f"MatMulNBits weight-only, 4-bit, block {block}, asymmetric",
                     quantized="every MatMul weight (attention, MLP, LM head: 4-bit, but 8-bit for the LM head's "
                               f"first {FREQUENT_TOKENS} token ids)",
                     lm_head=f"8-bit for token ids below {FREQUENT_TOKENS}, 4-bit above")
    if precision in ("int4", "int8"):
        if source_quantized:
            notes["quantized_twice"] = ("the source weights were already quantized (GGUF); they were dequantized to "
                                        "fp32 and quantized again here, so this artifact carries both roundings")
    if precision == "fp16":
        model = to_fp16(model)
        notes.update(method="fp16 weights, activations and KV cache", embedding="fp16", lm_head="fp16")
    model.ir_version = min(model.ir_version, IR_VERSION)
    size = sum(np.prod(tensor.dims) * 4 for tensor in model.graph.initializer)
    onnx.save(model, str(out_path), save_as_external_data=bool(size > (1 << 30)),
              location=out_path.name + ".data", all_tensors_to_one_file=True)
    return notes
