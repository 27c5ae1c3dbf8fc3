"""Which folder `serve` serves. --model: fp16 where the engine runs on CUDA, fp32 on CPU, one cache folder each,
exported again when the cached one is of an older format. --artifacts: that folder, which must hold an artifact;
a model is exported into it only when one is named and the folder is absent or empty."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from gptserve.export.artifact import MANIFEST, ArtifactError, read_manifest
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
    assert read_manifest(folder).parity.passed


def run_serve(cache, *arguments, timeout: float = 60):
    """`gptserve serve ARGUMENTS` in a child process; its exit status and stderr lines. A child still running
    after `timeout` went on to export or load: it is ended, with whatever it started, and the test fails."""
    environment = {**os.environ, "GPTSERVE_CACHE": str(cache)}
    child = subprocess.Popen([sys.executable, "-m", "gptserve", "serve", "--port", "0", "--http-port", "0", *arguments],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
                             start_new_session=True)
    try:
        _, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        pytest.fail(f"`gptserve serve {' '.join(arguments)}` was still running after {timeout} s")
    return child.returncode, stderr.strip().splitlines()


def test_serving_a_mistyped_folder_fails_at_once(tmp_path):
    typo = tmp_path / "typo"
    code, errors = run_serve(tmp_path / "cache", "--artifacts", str(typo))
    assert code != 0 and errors == [f"error: {typo}: no such folder (to export a model into it, add --model MODEL)"]
    assert not typo.exists()


@pytest.mark.parametrize("contents", [{}, {"notes.txt": "mine"}])
def test_serving_a_folder_that_is_not_an_artifact_fails_at_once(tmp_path, contents):
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, text in contents.items():
        (folder / name).write_text(text)
    code, errors = run_serve(tmp_path / "cache", "--artifacts", str(folder))
    assert code != 0 and errors == [f"error: {folder}: not an artifact folder (it holds no manifest.json)"]
    assert {path.name: path.read_text() for path in folder.iterdir()} == contents


def test_a_model_is_never_exported_into_a_folder_holding_other_files(tmp_path, tiny_folders):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="holds other files and no manifest.json; refusing to export"):
        ensure_artifact(folder, str(tiny_folders["llama"]))
    assert [path.name for path in folder.iterdir()] == ["notes.txt"]


def test_a_named_model_is_exported_into_an_absent_or_empty_folder(tmp_path, tiny_folders):
    model = str(tiny_folders["llama"])
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "absent", tmp_path / "empty"):
        assert ensure_artifact(folder, model) == folder and read_manifest(folder).model.name == model
    assert ensure_artifact(tmp_path / "absent", None) == tmp_path / "absent"  # then served as it is
