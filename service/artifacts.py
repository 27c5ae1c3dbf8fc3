"""Which artifact folder a server serves, exporting the model first when there is none yet (cached)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from gptserve.export.artifact import MANIFEST, ArtifactError, read_manifest
from gptserve.model.fetch import cache_dir

log = logging.getLogger("gptserve.server")


def default_precision(provider: str = "auto") -> str:
    """fp16 where the engine will run on CUDA, fp32 on CPU; $GPTSERVE_PRECISION overrides."""
    from gptserve.export.runtime import choose_providers

    if os.environ.get("GPTSERVE_PRECISION"):
        return os.environ["GPTSERVE_PRECISION"]
    return "fp16" if choose_providers(provider)[0] == "CUDAExecutionProvider" else "fp32"


def cached_artifact_folder(model: str, precision: str = "fp32") -> Path:
    """Where `serve --model SPEC` keeps its export: one folder per spec and precision under the gptserve cache."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_")
    return cache_dir() / "artifacts" / (name if precision == "fp32" else f"{name}-{precision}")


def ensure_artifact(artifacts: str | Path | None, model: str, precision: str = "fp32") -> Path:
    """The folder to serve: `artifacts` if it holds a manifest, else `model` exported into it (or the cache).

    The export runs in a child process, so the server process never imports torch.
    """
    folder = Path(artifacts) if artifacts else cached_artifact_folder(model, precision)
    if (folder / MANIFEST).is_file() and (artifacts or is_current(folder)):
        return folder
    log.info("no current artifact in %s: exporting %s at %s (once; later starts reuse it)", folder, model, precision)
    command = [sys.executable, "-m", "gptserve", "export", "--model", model, "--out", str(folder),
               "--precision", precision]
    if subprocess.run(command).returncode:
        raise SystemExit(f"exporting {model} into {folder} failed (see above)")
    return folder


def is_current(folder: Path) -> bool:
    """Whether the folder holds an artifact in this version's format (a cached older one is exported again)."""
    try:
        read_manifest(folder)
        return True
    except ArtifactError:
        return False
