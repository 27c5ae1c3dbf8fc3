"""Which export `serve --model` uses: fp16 where the engine runs on CUDA, fp32 on CPU, one cache folder each, exported
again when the cached one is of an older format."""

import json
import shutil

from gptserve.export.artifact import MANIFEST, read_manifest
from gptserve.service.artifacts import cached_artifact_folder, default_precision, ensure_artifact, is_current


def test_cpu_machines_default_to_fp32(monkeypatch):
    monkeypatch.delenv("GPTSERVE_PRECISION", raising=False)
    assert default_precision("auto") == "fp32"  # this onnxruntime has no CUDA provider
    assert default_precision("cuda") == "fp32"  # asked for, absent: CPU, so fp32


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("GPTSERVE_PRECISION", "int4")
    assert default_precision() == "int4"


def test_each_precision_has_its_own_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTSERVE_CACHE", str(tmp_path))
    assert cached_artifact_folder("hf:org/name") == tmp_path / "artifacts" / "hf_org_name"
    assert cached_artifact_folder("hf:org/name", "fp16") == tmp_path / "artifacts" / "hf_org_name-fp16"


def test_a_cached_artifact_of_an_older_format_is_exported_again(monkeypatch, tmp_path, tiny_folders, tiny_artifact):
    monkeypatch.setenv("GPTSERVE_CACHE", str(tmp_path))
    model = str(tiny_folders["llama"])
    folder = cached_artifact_folder(model)
    shutil.copytree(tiny_artifact, folder)
    assert is_current(folder) and ensure_artifact(None, model) == folder  # current: served as it is
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "format": "gptserve-artifact/1"}))
    assert not is_current(folder)
    assert ensure_artifact(None, model) == folder and is_current(folder)  # exported again in this format
    assert read_manifest(folder)["parity"]["passed"]
