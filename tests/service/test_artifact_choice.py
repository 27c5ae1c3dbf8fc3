"""Which export `serve --model` uses: fp16 where the engine runs on CUDA, fp32 on CPU, one cache folder each."""

from service.artifacts import cached_artifact_folder, default_precision


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
