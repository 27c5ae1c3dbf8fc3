"""setuptools' build with one step more: the gRPC stubs (gptserve/v1/*_pb2*.py, with .pyi for type checkers)
generated from protos/ before the packages are collected. grpcio-tools is a build requirement only
(pyproject's build-system.requires): `pip install .`, `pip install -e .` and `pip wheel .` of a fresh clone all
yield the stubs, and nothing that serves needs grpcio-tools installed."""

import contextlib
from importlib.resources import files
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def generate_stubs() -> None:
    from grpc_tools import protoc

    protos = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "protos").glob("gptserve/v1/*.proto"))
    include = str(files("grpc_tools") / "_proto")  # the well-known types (google/protobuf/*.proto)
    arguments = ["protoc", "-Iprotos", f"-I{include}", "--python_out=.", "--pyi_out=.", "--grpc_python_out=.", *protos]
    with contextlib.chdir(ROOT):  # paths from the root: the generated modules import gptserve.v1.<name>
        status = protoc.main(arguments)
    if status != 0:
        raise SystemExit(f"protoc failed (status {status}) on {', '.join(protos)}")


class BuildWithStubs(build_py):
    def run(self) -> None:
        # Before the parent's run, which returns at once in an editable install: the stubs land in the source
        # tree, where both an editable install and a wheel's collection find them.
        generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildWithStubs})
