"""Model specs: each kind resolves, and each wrong one fails with a message saying what was expected."""

import pytest

from gptserve.model.checkpoint import CheckpointError
from gptserve.model.fetch import DEFAULT_SHA256, FetchError, fetch_default_gguf, verify_sha256
from gptserve.model.spec import load_pretrained, resolve


def test_unknown_spec_names_what_is_accepted():
    with pytest.raises(CheckpointError, match="expected 'smollm2-135m-instruct', a path to a .gguf file"):
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
