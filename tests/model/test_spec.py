"""Model specs: each kind resolves, and each wrong one fails with a message saying what was expected."""

import pytest

from gptserve.model.checkpoint import CheckpointError
from gptserve.model.fetch import DEFAULT_SHA256, FetchError, fetch_default_gguf, verify_sha256
from gptserve.model.spec import load_pretrained, resolve


def test_unknown_spec_names_what_is_accepted():
    with pytest.raises(CheckpointError, match="expected .smollm2-135m-instruct., a preset"):
        resolve("no-such-model")


def test_unreachable_hub_is_a_clear_error():
    with pytest.raises(CheckpointError, match="could not download 'org/name' from the Hugging Face hub"):
        resolve("hf:org/name")


def test_default_spec_is_the_cached_verified_gguf(default_gguf):
    assert resolve("smollm2-135m-instruct") == default_gguf
    assert fetch_default_gguf() == default_gguf


def test_wrong_sha256_is_refused(tmp_path, monkeypatch, default_gguf):
    broken = tmp_path / default_gguf.name
    broken.write_bytes(default_gguf.read_bytes()[:-1] + b"\0")
    with pytest.raises(FetchError, match="sha256 is .*, expected " + DEFAULT_SHA256):
        verify_sha256(broken, DEFAULT_SHA256)
    monkeypatch.setenv("GPTSERVE_CACHE", str(tmp_path))  # a cache holding the damaged file
    with pytest.raises(FetchError, match="delete the file to fetch it again"):
        fetch_default_gguf()


def test_folder_spec_loads_weights_and_tokenizer(tiny_folders):
    pretrained = load_pretrained(str(tiny_folders["llama"]))
    assert pretrained.config.architecture == "llama" and pretrained.config.kv_heads == 2
    assert pretrained.tokenizer.decode(pretrained.tokenizer.encode("hello world")) == "hello world"
    assert pretrained.build().config == pretrained.config


def _hub_cache(root, repo_id: str, folder) -> None:
    """`folder` as huggingface_hub's cache holds a downloaded snapshot of `repo_id` (its documented layout)."""
    import shutil

    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hub_specs_and_presets_come_from_huggingface_hubs_cache(tmp_path, family_folders):
    """hf:ORG/NAME and preset names resolve through huggingface_hub's own cache when the hub is out of reach; a
    preset whose repository holds another architecture is refused. (A fresh process: huggingface_hub reads its
    cache location and offline switch from the environment when it is imported.)"""
    import json
    import os
    import subprocess
    import sys

    _hub_cache(tmp_path, "tiny-org/tiny-qwen2", family_folders["qwen2"])
    _hub_cache(tmp_path, "Qwen/Qwen2.5-0.5B-Instruct", family_folders["qwen2"])
    script = (
        "import json\n"
        "from gptserve.model.checkpoint import CheckpointError\n"
        "from gptserve.model.spec import load_pretrained\n"
        "pretrained = load_pretrained('hf:tiny-org/tiny-qwen2')\n"
        "try:\n"
        "    load_pretrained('qwen2.5-0.5b-instruct')\n"
        "    refusal = None\n"
        "except CheckpointError as error:\n"
        "    refusal = str(error)\n"
        "print(json.dumps({'architecture': pretrained.config.architecture, 'source': str(pretrained.source),\n"
        "                  'refusal': refusal}))\n"
    )
    environment = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                            check=True)
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["architecture"] == "qwen2"
    assert found["source"].startswith(str(tmp_path / "models--tiny-org--tiny-qwen2" / "snapshots"))
    assert found["refusal"].startswith("qwen2.5-0.5b-instruct: the downloaded model (Qwen/Qwen2.5-0.5B-Instruct) "
                                       "is not the preset's: vocab_size 49152 (preset: 151936)")


def test_every_preset_spec_names_a_preset_config():
    from gptserve.model.config import PRESETS
    from gptserve.model.spec import PRESET_REPOS

    assert {preset_name for preset_name, _ in PRESET_REPOS.values()} <= set(PRESETS)
    with pytest.raises(CheckpointError, match=r"a preset \(gpt2, gpt2-medium, .*llama-3.2-1b-instruct"):
        resolve("llama-3.2-1b")
