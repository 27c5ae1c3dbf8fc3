"""The speculative decoding bench's workloads, built on the default model's tokenizer, and its argument checks (no
server is started here)."""

import pytest

from gptserve.bench import speculative
from gptserve.model.tokenizer import Tokenizer


def test_workloads_have_their_intended_sizes(default_artifact):
    tokenizer = Tokenizer.from_folder(default_artifact)
    passage = len(tokenizer.encode(speculative.passage(), add_special_tokens=False))
    assert 450 <= passage <= 550
    code = speculative.code_file()
    assert len(code.splitlines()) == speculative.CODE_LINES
    assert f"class {speculative.RENAMED[0]}" in code  # the class the prompt asks to rename is in the file

    prompts = speculative.workloads(tokenizer)
    assert list(prompts) == ["rewrite", "summarize", "code-edit", "document-qa", "story"]
    for name in ("rewrite", "summarize", "document-qa"):  # the passage, an instruction and the chat template
        assert passage < len(prompts[name]) < passage + 120, name
    assert len(prompts["code-edit"]) > len(tokenizer.encode(code, add_special_tokens=False))
    assert len(prompts["story"]) < 80  # nothing to copy from
    assert speculative.passage() in tokenizer.decode(prompts["document-qa"])
    assert speculative.workloads(tokenizer) == prompts  # deterministic: every round and run sends the same ids


def test_a_missing_artifact_folder_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        speculative.parse_args(["--artifacts", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--artifacts" in error and "missing holds no manifest.json" in error


def test_a_run_needs_two_new_tokens_for_a_decode_rate(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(SystemExit):
        speculative.parse_args(["--artifacts", str(tmp_path), "--new-tokens", "1"])
    assert "--new-tokens" in capsys.readouterr().err
    assert speculative.parse_args(["--artifacts", str(tmp_path)]).new_tokens == 128
