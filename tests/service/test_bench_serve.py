"""`gptserve bench-serve` runs for real: against a running server over both protocols (with a token), and in its
own side-by-side mode on an artifact. Figures are not judged here (benchmarks print them); every request must have
produced its tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gptserve.service.bench import free_port
from gptserve.service.server import BackgroundServer, ServerConfig

TOKEN = "bench-token"


def bench_serve(*arguments: str, token: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptserve", "bench-serve", "--concurrency", "1", "2", "--repeats",
                           "1", "--rounds", "1", "--max-new-tokens", "4", *arguments], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "GPTSERVE_AUTH_TOKEN": token})


def figures(path) -> dict[tuple[str, int], dict]:
    return {(item["path"], item["streams"]): item for item in json.loads(path.read_text())}


@pytest.mark.parametrize("protocol", ["grpc", "openai"])
def test_bench_serve_measures_a_running_server(tiny_engine, tmp_path, protocol):
    http_port = free_port()
    server = BackgroundServer(ServerConfig(port=0, http_port=http_port, auth_token=TOKEN), lambda: tiny_engine).start()
    try:
        port = server.port if protocol == "grpc" else http_port
        done = bench_serve("--target", f"127.0.0.1:{port}", "--protocol", protocol, "--json",
                           str(tmp_path / "figures.json"), token=TOKEN)
        refused = bench_serve("--target", f"127.0.0.1:{port}", "--protocol", protocol, token="wrong")
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr
    measured = figures(tmp_path / "figures.json")
    assert set(measured) == {(protocol, 1), (protocol, 2)}
    assert measured[(protocol, 1)]["tokens"] == 4 and measured[(protocol, 2)]["tokens"] == 8
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert ("401" if protocol == "openai" else "UNAUTHENTICATED") in refused.stderr


def test_bench_serve_side_by_side_on_an_artifact(tiny_artifact, tmp_path):
    """With onnxruntime-genai beside (an artifact is also a genai model folder: it has a genai_config.json)."""
    pytest.importorskip("onnxruntime_genai")
    done = bench_serve("--artifacts", str(tiny_artifact), "--genai", str(tiny_artifact), "--json",
                       str(tmp_path / "figures.json"))
    assert done.returncode == 0, done.stderr
    measured = figures(tmp_path / "figures.json")
    assert set(measured) == {("engine", 1), *((path, streams) for path in ("scheduler", "grpc", "openai", "genai")
                                                for streams in (1, 2))}
    assert all(item["tokens"] == 4 * item["streams"] for item in measured.values())
    assert "1 streams over HTTP: " in done.stdout and "of the in-process engine's tokens/s" in done.stdout
    assert "2 streams over gRPC: " in done.stdout and "of the in-process scheduler's tokens/s" in done.stdout
    assert "onnxruntime-genai in process" in done.stdout
