"""The compose `export` service: exports MODEL (a model spec) once into the cache volume ($GPTSERVE_CACHE), at
$GPTSERVE_PRECISION (the compose file sets fp16 for the GPU profile and fp32 for the CPU one).

    python export-once.py MODEL

A later run finds the artifact (in this version's format) and exits at once. `gptserve serve --model MODEL` looks
in the same folder (service.artifacts.cached_artifact_folder), so the servers, which have no torch, never export
themselves.
"""

import logging
import sys

from gptserve.export.artifact import ArtifactError
from gptserve.service.artifacts import cached_artifact_folder, default_precision, ensure_artifact, is_current


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    model = argv[1]
    precision = default_precision()
    folder = cached_artifact_folder(model, precision)
    if is_current(folder):
        print(f"{model}: already exported in {folder}; nothing to do")
        return 0
    try:
        ensure_artifact(None, model, precision)
    except ArtifactError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{model}: exported into {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
