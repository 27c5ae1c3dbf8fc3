"""Export fixtures: the tiny GPT-2 (learned positions) artifact beside conftest.py's tiny Llama (rotary)."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_gpt2_artifact(tmp_path_factory, tiny_folders) -> Path:
    from gptserve.export.exporter import export

    out = tmp_path_factory.mktemp("artifacts") / "tiny-gpt2"
    export(str(tiny_folders["gpt2"]), out, tolerance=1e-5)
    return out
