"""Which artifact folder a server serves, exporting the model first when there is none yet (cached)."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

from export.artifact import MANIFEST
from model.fetch import cache_dir

log = logging.getLogger("gptserve.server")


def cached_artifact_folder(model: str) -> Path:
    """Where `serve --model SPEC` keeps its export: one folder per spec under the gptserve cache."""
    return cache_dir() / "artifacts" / re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_")


def ensure_artifact(artifacts: str | Path | None, model: str) -> Path:
    """The folder to serve: `artifacts` if it holds a manifest, else `model` exported into it (or the cache).

    The export runs in a child process, so the server process never imports torch.
    """
    folder = Path(artifacts) if artifacts else cached_artifact_folder(model)
    if (folder / MANIFEST).is_file():
        return folder
    log.info("no artifact in %s yet: exporting %s (once; later starts reuse it)", folder, model)
    script = "import sys; from export.exporter import export; export(sys.argv[1], sys.argv[2])"
    if subprocess.run([sys.executable, "-c", script, model, str(folder)]).returncode:
        raise SystemExit(f"exporting {model} into {folder} failed (see above)")
    return folder
