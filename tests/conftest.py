"""Shared fixtures: the default model's GGUF file, fetched once and verified."""

from pathlib import Path

import pytest

from model.fetch import fetch_default_gguf


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    return fetch_default_gguf()
