"""Shared fixtures: the default model's GGUF (fetched once, verified) and exported artifacts built once per run."""

from pathlib import Path

import pytest

from gptserve.model.fetch import fetch_default_gguf
from tests.tiny_models import FAMILIES, save_family_folder, save_tiny_folder


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    return fetch_default_gguf()


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory, default_gguf) -> dict[str, Path]:
    """Hugging Face folders of tiny random models: {"gpt2": path, "llama": path}."""
    folders = {}
    for kind in ("gpt2", "llama"):
        folders[kind] = tmp_path_factory.mktemp(f"tiny-{kind}")
        save_tiny_folder(kind, folders[kind], default_gguf)
    return folders


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, tiny_folders) -> Path:
    """The tiny random Llama, exported and certified at the tiny models' tolerance (1e-5)."""
    from gptserve.export.exporter import export

    out = tmp_path_factory.mktemp("artifacts") / "tiny-llama"
    export(str(tiny_folders["llama"]), out, tolerance=1e-5)
    return out


@pytest.fixture(scope="session")
def default_artifact(tmp_path_factory, default_gguf) -> Path:
    """The default model (SmolLM2-135M-Instruct), exported and certified once per test run."""
    from gptserve.export.exporter import export

    out = tmp_path_factory.mktemp("artifacts") / "smollm2-135m-instruct"
    export("smollm2-135m-instruct", out)
    return out


@pytest.fixture(scope="session")
def family_folders(tmp_path_factory, default_gguf) -> dict[str, Path]:
    """Hugging Face folders of tiny random models of each family (tests/tiny_models.py FAMILIES)."""
    folders = {}
    for kind in FAMILIES:
        folders[kind] = tmp_path_factory.mktemp(f"tiny-{kind}")
        save_family_folder(kind, folders[kind], default_gguf)
    return folders


@pytest.fixture(scope="session")
def family_artifacts(tmp_path_factory, family_folders) -> dict[str, Path]:
    """Each family's tiny model exported and certified at the tiny models' tolerance (1e-5), once per run."""
    from gptserve.export.exporter import export

    root = tmp_path_factory.mktemp("family-artifacts")
    for kind, folder in family_folders.items():
        export(str(folder), root / kind, tolerance=1e-5)
    return {kind: root / kind for kind in family_folders}
