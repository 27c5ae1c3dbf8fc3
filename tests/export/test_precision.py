"""Reduced precisions: int8 and int4 (weight-only MatMulNBits) certified on quality, fp16 structurally; an
artifact below its quality threshold is refused."""

import onnx
import pytest

from export.artifact import ArtifactError, read_manifest
from export.exporter import export
from export.parity import QUALITY_CRITERIA
from model.generation import Sequence, StoppingParams, generate
from service.engine import Engine


@pytest.fixture(scope="module")
def tiny_llama(tiny_folders):
    return str(tiny_folders["llama"])


def matmul_kinds(artifact):
    """Counts of MatMulNBits nodes and of plain MatMuls that still read a weight initializer."""
    graph = onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph
    weights = {tensor.name for tensor in graph.initializer}
    quantized = sum(node.op_type == "MatMulNBits" for node in graph.node)
    plain = sum(node.op_type == "MatMul" and node.input[1] in weights for node in graph.node)
    return quantized, plain


# Tiny random models have near-flat distributions over 49152 tokens, where 4-bit rounding flips many near-ties
# (measured: int4 ~0.49 agreement, int8 ~0.97): a looser bar than real models get, but a bar, since a broken
# quantization lands near 1/49152.
TINY_CRITERIA = {"int8": {"min_top1_agreement": 0.9, "max_perplexity_ratio": 1.1},
                 "int4": {"min_top1_agreement": 0.3, "max_perplexity_ratio": 1.5}}


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_weight_only_quantization_is_certified_on_quality(precision, tiny_llama, tmp_path):
    out = tmp_path / precision
    criteria = TINY_CRITERIA[precision]
    manifest = export(tiny_llama, out, precision=precision, criteria=criteria)
    report = manifest["parity"]
    assert report["passed"] and report["precision"] == precision and report["criteria"] == criteria
    assert criteria["min_top1_agreement"] <= report["top1_agreement"] <= 1.0
    assert report["perplexity"]["ratio"] <= criteria["max_perplexity_ratio"]
    # 2 layers x (qkv, o, gate, up, down) + the LM head, and no weight left behind.
    assert matmul_kinds(out) == (2 * 5 + 1, 0)
    assert manifest["quantization"]["embedding"] == "fp32"
    engine = Engine.load(out)
    prompt = engine.tokenizer.encode("Once upon a time")
    tokens = generate(engine.step, Sequence(engine.tokenizer, prompt, stopping=StoppingParams(8, ignore_eos=True))).token_ids
    assert len(tokens) == 8


def test_quality_below_threshold_is_refused(tiny_llama, tmp_path):
    out = tmp_path / "refused"
    with pytest.raises(ArtifactError, match="certification failed"):
        export(tiny_llama, out, precision="int4", criteria={"min_top1_agreement": 1.01, "max_perplexity_ratio": 1.0})
    assert not out.exists()


def test_fp16_is_certified_structurally(tiny_llama, tmp_path):
    out = tmp_path / "fp16"
    manifest = export(tiny_llama, out, precision="fp16")
    assert manifest["parity"]["passed"] and manifest["parity"]["runtime"] == "onnx.checker"
    assert manifest["canary"] is None
    kv = manifest["graph"]["inputs"][-1]
    assert kv["dtype"] == "float16" and manifest["graph"]["outputs"][0]["dtype"] == "float32"
    onnx.checker.check_model(str(out / "model.onnx"))


def test_default_model_int4_meets_the_shipped_thresholds(default_gguf, tmp_path):
    manifest = export("smollm2-135m-instruct", tmp_path / "int4", precision="int4")
    report = manifest["parity"]
    assert report["passed"] and report["criteria"] == QUALITY_CRITERIA["int4"]
    assert "quantized_twice" in manifest["quantization"]  # GGUF Q4_1 source, quantized again
