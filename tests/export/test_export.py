"""Export and certification on tiny random models and the default model; the engine generates exactly what
the eager model generates; corrupted artifacts are refused at load."""

import json
import shutil
import subprocess
import sys

import pytest

from gptserve.export.artifact import ArtifactError, read_manifest
from gptserve.export.contract import past_names, present_names
from gptserve.export.graph_file import position_limit
from gptserve.model.eager import EagerStep
from gptserve.model.generation import Sequence, StoppingParams, generate
from gptserve.model.spec import load_pretrained
from gptserve.service.engine import Engine

PROMPTS = ["The quick brown fox", "def fibonacci(n):", "Bonjour, je m'appelle", "1, 2, 3, 5, 8,"]


def greedy(step, tokenizer, prompt, max_new_tokens=24):
    sequence = Sequence(tokenizer, tokenizer.encode(prompt), stopping=StoppingParams(max_new_tokens, ignore_eos=True))
    return generate(step, sequence).token_ids


@pytest.fixture(params=["gpt2", "llama"])
def tiny_case(request, tiny_folders, tiny_gpt2_artifact, tiny_artifact):
    artifact = {"gpt2": tiny_gpt2_artifact, "llama": tiny_artifact}[request.param]
    return tiny_folders[request.param], artifact


def test_manifest_holds_the_contract_and_a_passed_report(tiny_case):
    folder, artifact = tiny_case
    manifest = read_manifest(artifact)
    graph = manifest.graph
    assert {spec.name for spec in graph.inputs} == {"input_ids", "attention_mask", *past_names(graph.n_layer)}
    assert {spec.name for spec in graph.outputs} == {"logits", *present_names(graph.n_layer)}
    report = manifest.parity
    assert report.passed and report.criteria["max_abs_diff"] == 1e-5
    assert [case.case for case in report.cases] == [
        "prefill_1", "prefill_17", "prefill_128", "prefill_128_last_only", "decode_32", "batch_3_ragged_4_steps"]
    assert all(case.max_abs_diff <= 1e-5 and case.greedy_match for case in report.cases)
    assert set(manifest.files) >= {"model.onnx", "tokenizer.json", "tokenizer_config.json", "genai_config.json"}


def test_graph_computes_no_output_nobody_reads(tiny_case):
    import onnx

    folder, artifact = tiny_case
    graph = onnx.load(str(artifact / "model.onnx"), load_external_data=False).graph
    read = {name for node in graph.node for name in node.input} | {value.name for value in graph.output}
    norms = [node for node in graph.node if node.op_type.startswith("Skip")]
    assert norms and all(node.output[1:3] == ["", ""] for node in norms)  # mean and inverse deviation left out
    assert [name for node in graph.node for name in node.output if name and name not in read] == []


def test_engine_greedy_equals_eager(tiny_case):
    folder, artifact = tiny_case
    pretrained = load_pretrained(str(folder))
    eager, engine = EagerStep(pretrained.build()), Engine.load(artifact)
    for prompt in PROMPTS:
        tokens = greedy(engine.step, engine.tokenizer, prompt)
        assert tokens == greedy(eager, pretrained.tokenizer, prompt)
        assert len(set(tokens)) > 1


def test_default_model_certified_and_engine_equals_eager(default_artifact):
    manifest = read_manifest(default_artifact)
    assert manifest.parity.passed and manifest.parity.criteria["max_abs_diff"] == 1e-4
    pretrained = load_pretrained("smollm2-135m-instruct")
    eager, engine = EagerStep(pretrained.build()), Engine.load(default_artifact)
    for prompt in PROMPTS[:3]:
        chat = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        assert greedy(engine.step, engine.tokenizer, chat, 32) == greedy(eager, pretrained.tokenizer, chat, 32)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_capped_context_is_the_graphs_own(kind, tiny_folders, tmp_path):
    """--max-context: the built model is limited (a learned position table keeps that many rows), not a model
    of the full context whose config is overwritten afterwards; the engine's cross-check agrees."""
    from gptserve.export.exporter import build_artifact

    pretrained = load_pretrained(str(tiny_folders[kind]))
    manifest = build_artifact(pretrained, tmp_path / kind, tolerance=1e-5, context_length=64)
    assert manifest.generation.context_length == manifest.model.config.context_length == 64
    assert position_limit(tmp_path / kind / "model.onnx") == 64
    assert pretrained.config.context_length == 256  # the caller's model is left as it was
    assert Engine.load(tmp_path / kind).context_length == 64


def test_inspect_shows_the_report(tiny_artifact):
    result = subprocess.run([sys.executable, "-m", "gptserve", "inspect", str(tiny_artifact)],
                            capture_output=True, text=True, check=True)
    assert "PASSED" in result.stdout and "decode_32" in result.stdout


def test_failed_certification_writes_nothing(tiny_folders, tmp_path):
    from gptserve.export.exporter import export

    out = tmp_path / "refused"
    with pytest.raises(ArtifactError, match="parity certification failed"):
        export(str(tiny_folders["llama"]), out, tolerance=1e-12)
    assert not out.exists()
    assert not list(tmp_path.iterdir()), "no half-written folder left behind"


@pytest.fixture
def broken(tiny_artifact, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(tiny_artifact, copy)
    return copy


def test_changed_weight_byte_is_refused(broken):
    graph = broken / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.onnx is corrupt"):
        Engine.load(broken)


def test_missing_file_is_refused(broken):
    (broken / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match="tokenizer.json is missing"):
        Engine.load(broken)


def test_manifest_of_another_model_is_refused(broken, tiny_gpt2_artifact):
    other = json.loads((tiny_gpt2_artifact / "manifest.json").read_text())
    (broken / "model.onnx").write_bytes((tiny_gpt2_artifact / "model.onnx").read_bytes())
    mine = json.loads((broken / "manifest.json").read_text())
    mine["files"]["model.onnx"] = other["files"]["model.onnx"]  # hashes line up; the contract does not
    (broken / "manifest.json").write_text(json.dumps(mine))
    with pytest.raises(ArtifactError, match="do not match the manifest|has shape"):
        Engine.load(broken)


def test_wrong_recorded_canary_is_refused(broken):
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["canary"]["greedy_tokens"] = [(token + 1) % 100 for token in manifest["canary"]["greedy_tokens"]]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="canary failed"):
        Engine.load(broken)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="no manifest.json"):
        Engine.load(tmp_path)
