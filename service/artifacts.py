"""Which artifact folder a server serves, exporting a model first only where the user named one (cached)."""

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


def ensure_artifact(artifacts: str | Path | None, model: str | None, precision: str = "fp32") -> Path:
    """The folder to serve, decided before anything is loaded:

      artifacts alone            that folder, which must hold an artifact (nothing is exported)
      artifacts and model        the folder's artifact; `model` is exported into it only when it is absent or
                                 empty, never into a folder that holds anything else
      model alone                its export in the cache, made on first use (and again for an older format)

    Raises ArtifactError, with a one-line message, for a folder that cannot be served. The export runs in a child
    process, so the server process never imports torch.
    """
    if artifacts is None:
        if model is None:
            raise ValueError("ensure_artifact needs an artifact folder or a model")
        folder = cached_artifact_folder(model, precision)
        if not is_current(folder):
            export_into(folder, model, precision)
        return folder
    folder = Path(artifacts)
    if (folder / MANIFEST).is_file():
        read_manifest(folder)  # an unreadable or outdated manifest is refused now, not after minutes of loading
        return folder
    if model is None:
        if not folder.exists():
            raise ArtifactError(f"{folder}: no such folder (to export a model into it, add --model MODEL)")
        raise ArtifactError(f"{folder}: not an artifact folder (it holds no {MANIFEST})")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ArtifactError(f"{folder}: holds other files and no {MANIFEST}; refusing to export {model} into it "
                            "(name an empty or new folder)")
    export_into(folder, model, precision)
    return folder


class ExportFailed(ArtifactError):
    """The export's own process failed and has said why on stderr; `status` is its exit status."""

    def __init__(self, model: str, folder: Path, status: int) -> None:
        super().__init__(f"exporting {model} into {folder} failed (see above)")
        self.status = status


def export_into(folder: Path, model: str, precision: str) -> None:
    log.info("no current artifact in %s: exporting %s at %s (once; later starts reuse it)", folder, model, precision)
    command = [sys.executable, "-m", "gptserve", "export", "--model", model, "--out", str(folder),
               "--precision", precision]
    status = subprocess.run(command).returncode
    if status:
        raise ExportFailed(model, folder, status)


def is_current(folder: Path) -> bool:
    """Whether the folder holds an artifact in this version's format (a cached older one is exported again)."""
    try:
        read_manifest(folder)
        return True
    except ArtifactError:
        return False
