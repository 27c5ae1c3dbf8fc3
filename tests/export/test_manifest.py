"""manifest.json is parsed strictly and checked against the graph it describes. No hash covers the manifest
itself, so an edited one must be caught by what the engine reads from the graph: each edit below is refused at
load with an ArtifactError that says what is wrong, before a request could reach ONNX Runtime."""

import json
import shutil

import pytest

from gptserve.export.artifact import MANIFEST, ArtifactError, read_manifest
from gptserve.service.engine import Engine


@pytest.fixture(params=["llama", "gpt2"])
def artifact(request, tiny_artifact, tiny_gpt2_artifact):
    """Rotary (the cos/sin cache bounds the context) and learned positions (the position table does)."""
    return {"llama": tiny_artifact, "gpt2": tiny_gpt2_artifact}[request.param]


@pytest.fixture
def edited(artifact, tmp_path):
    """A copy of the artifact with its manifest changed by `change(manifest as JSON)`."""

    def edit(change):
        folder = tmp_path / "artifact"
        shutil.copytree(artifact, folder)
        manifest = json.loads((folder / MANIFEST).read_text())
        change(manifest)
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
        return folder

    return edit


def test_the_manifest_reads_back_as_it_was_written(artifact):
    written = json.loads((artifact / MANIFEST).read_text())
    assert read_manifest(artifact).to_json() == written


def test_a_context_length_beyond_the_graphs_positions_is_refused(edited):
    # The case: accepted, a 9000-token prompt then failed INTERNAL inside ONNX Runtime.
    folder = edited(lambda manifest: manifest["generation"].update(context_length=100000))
    with pytest.raises(ArtifactError, match="context length 100000, but the graph embeds 256 positions"):
        Engine.load(folder)


def test_a_vocabulary_other_than_the_logits_is_refused(edited):
    folder = edited(lambda manifest: manifest["graph"].update(vocab_size=60000))
    with pytest.raises(ArtifactError, match="logits cover 49152 tokens, the manifest's vocabulary is 60000"):
        Engine.load(folder)


@pytest.mark.parametrize("field, value", [("n_kv_heads", 8), ("head_dim", 32)])
def test_kv_heads_and_head_size_other_than_the_pasts_are_refused(edited, field, value):
    folder = edited(lambda manifest: manifest["graph"].update({field: value}))
    message = r"past_key_values\.0\.key has shape \['batch', \d, 'past_sequence', 16\] in the graph, not \d+ KV heads"
    with pytest.raises(ArtifactError, match=message):
        Engine.load(folder)


def test_a_precision_other_than_the_graphs_is_refused(edited):
    folder = edited(lambda manifest: manifest.update(precision="fp16"))
    with pytest.raises(ArtifactError, match="precision fp16 with a float32 KV cache"):
        Engine.load(folder)


def test_an_artifact_without_a_canary_is_refused(edited):
    # It used to be served with a warning.
    folder = edited(lambda manifest: manifest.update(canary=None))
    with pytest.raises(ArtifactError, match="no start-up canary recorded .*refusing to serve it unchecked"):
        Engine.load(folder)


def test_a_canary_too_short_to_check_is_refused(edited):
    # Zero recorded tokens used to pass: the engine compared nothing with nothing.
    folder = edited(lambda manifest: manifest["canary"].update(greedy_tokens=[]))
    with pytest.raises(ArtifactError, match="recorded canary .* is not one the engine can check"):
        Engine.load(folder)


def test_a_graph_file_without_its_hash_is_refused(edited):
    folder = edited(lambda manifest: manifest["files"].pop("model.onnx"))
    with pytest.raises(ArtifactError, match="lists no sha256 for model.onnx"):
        Engine.load(folder)


@pytest.mark.parametrize("change, message", [
    (lambda manifest: manifest["generation"].pop("context_length"), "generation.context_length: missing"),
    (lambda manifest: manifest.pop("canary"), "canary: missing"),
    (lambda manifest: manifest["generation"].update(context_length="256"),
     "generation.context_length: expected an integer, got the string '256'"),
    (lambda manifest: manifest["graph"].update(n_layer=True), "graph.n_layer: expected an integer, got true"),
    (lambda manifest: manifest["graph"]["inputs"][0].update(shape="batch"),
     r"graph.inputs\[0\].shape: expected a list"),
    (lambda manifest: manifest["model"]["config"].update(positions="alibi"),
     "model.config.positions: expected one of 'learned', 'rope', got 'alibi'"),
    (lambda manifest: manifest["parity"].update(passed="yes"), "parity.passed: expected true or false"),
    (lambda manifest: manifest.update(signed_by="nobody"), "signed_by: unknown field"),
])
def test_a_missing_or_mistyped_field_is_named(edited, change, message):
    folder = edited(change)
    with pytest.raises(ArtifactError, match=message):
        Engine.load(folder)
