"""A server's life: NOT_SERVING until the model is loaded; on shutdown NOT_SERVING again, new requests refused,
streams in flight finished. And the real `gptserve serve` process: client command, metrics endpoint, request
log, SIGTERM, no torch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gptserve.service.client import GenerationClient
from gptserve.service.server import BackgroundServer, ServerConfig
from gptserve.v1 import generation_pb2 as pb
from tests.service.support import wait_for


def test_not_serving_until_the_model_is_loaded(tiny_engine):
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return tiny_engine

    server = BackgroundServer(ServerConfig(port=0, http_port=0), slow_load).start(wait_ready=False)
    try:
        with GenerationClient(f"127.0.0.1:{server.port}", timeout=30) as client:
            assert client.health() == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as caught:
                client.generate("Hello", max_new_tokens=2)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in caught.value.details()
            release.set()
            server.wait_ready(30)
            assert client.health() == "SERVING"
            assert client.generate("Hello", max_new_tokens=2, ignore_eos=True).usage.completion_tokens == 2
    finally:
        release.set()
        server.stop()


def test_shutdown_lets_streams_in_flight_finish_and_refuses_new_ones(default_engine):
    server = BackgroundServer(ServerConfig(port=0, http_port=0, grace_seconds=30), lambda: default_engine).start()
    with GenerationClient(f"127.0.0.1:{server.port}", timeout=60) as client:
        statuses = []
        watch = health_pb2_grpc.HealthStub(client.channel).Watch(health_pb2.HealthCheckRequest())

        def follow_health():
            try:
                for response in watch:
                    statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
            except grpc.RpcError:
                pass  # the server closes the watch when it stops

        threading.Thread(target=follow_health, daemon=True).start()
        stream = client.stream("Tell me about the sea.", max_new_tokens=24, ignore_eos=True)
        first = next(stream)
        stopping = threading.Thread(target=server.stop, kwargs={"grace": 30})
        started = time.perf_counter()
        stopping.start()
        wait_for(lambda: "NOT_SERVING" in statuses)
        with pytest.raises(grpc.RpcError) as caught:
            client.generate("A new request", max_new_tokens=4)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(stream)
        assert sum(len(message.tokens) for message in [first, *rest]) == 24
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
        stopping.join(30)
        assert not stopping.is_alive() and time.perf_counter() - started < 20  # not held for the whole grace
        assert statuses[0] == "SERVING"


def test_the_serving_modules_import_no_torch():
    script = ("import sys, service.server, service.client, service.engine, service.bench, service.artifacts; "
              "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", script]).returncode == 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def gptserve(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "gptserve", *arguments]


def test_serve_command_client_command_metrics_and_sigterm(tiny_artifact):
    port, metrics_port = free_port(), free_port()
    environment = {**os.environ, "GPTSERVE_AUTH_TOKEN": ""}
    server = subprocess.Popen(
        gptserve("serve", "--artifacts", str(tiny_artifact), "--port", str(port), "--metrics-port", str(metrics_port),
                 "--http-port", "0", "--provider", "cpu", "--grace-seconds", "5"),
        stderr=subprocess.PIPE, text=True, env=environment)
    try:
        with GenerationClient(f"127.0.0.1:{port}", timeout=30) as client:
            client.wait_until_serving(timeout=120)
        called = subprocess.run(gptserve("client", "Hello there", "--target", f"127.0.0.1:{port}",
                                         "--max-new-tokens", "6", "--ignore-eos"),
                                capture_output=True, text=True, timeout=60, env=environment)
        assert called.returncode == 0, called.stderr
        assert "[length: 6 tokens" in called.stderr
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert 'gptserve_requests_total{code="OK",method="GenerateStream"} 1.0' in metrics
        assert "gptserve_generated_tokens_total 6.0" in metrics
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()
    log = server.stderr.read()
    request_lines = [json.loads(line.split("gptserve.requests ", 1)[1]) for line in log.splitlines()
                     if "gptserve.requests " in line]
    assert len(request_lines) == 1, log
    line = request_lines[0]
    assert line["code"] == "OK" and line["completion_tokens"] == 6 and line["finish_reason"] == "length"
    assert {"request_id", "prompt_tokens", "ttft_s", "total_s", "queue_s"} <= set(line)
    assert "shutting down" in log


# Start-up mistakes: one line on stderr and a non-zero exit, before anything is loaded --------------------------


@pytest.fixture
def nothing_to_load(tmp_path) -> list[str]:
    """Arguments under which reaching the model at all would fail loudly: no artifact, no such model file."""
    return ["--artifacts", str(tmp_path / "no-artifact"), "--model", str(tmp_path / "no-model.gguf")]


def refusal(*arguments: str, environment: dict | None = None) -> str:
    """The one line a `gptserve serve` that must not start writes, checked to be one line with a non-zero exit."""
    done = subprocess.run(gptserve("serve", "--http-port", "0", *arguments), capture_output=True, text=True,
                          timeout=120, env={**os.environ, "GPTSERVE_AUTH_TOKEN": "", **(environment or {})})
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_start_up_mistakes_are_one_line_each(nothing_to_load, tmp_path, tls_files):
    cert, key = tls_files
    port = str(free_port())
    missing = str(tmp_path / "missing.pem")
    assert "--auth-token-file" in refusal(*nothing_to_load, "--port", port, "--auth-token-file", missing)
    assert "--tls-cert" in refusal(*nothing_to_load, "--port", port, "--tls-cert", missing, "--tls-key", str(key))
    assert "--tls-key" in refusal(*nothing_to_load, "--port", port, "--tls-cert", str(cert), "--tls-key", missing)
    assert "both" in refusal(*nothing_to_load, "--port", port, "--tls-cert", str(cert))
    swapped = refusal(*nothing_to_load, "--port", port, "--tls-cert", str(key), "--tls-key", str(cert))
    assert "--tls-cert" in swapped and "Failed to bind" not in swapped
    assert "--max-batch-size" in refusal(*nothing_to_load, "--port", port, "--max-batch-size", "0")
    assert "--max-queue" in refusal(*nothing_to_load, "--port", port, "--max-queue", "-1")
    assert "--grace-seconds" in refusal(*nothing_to_load, "--port", port, "--grace-seconds", "nan")
    assert "--threads" in refusal(*nothing_to_load, "--port", port, "--threads", "0")
    assert "--stall-seconds" in refusal(*nothing_to_load, "--port", port, "--stall-seconds", "0")
    assert "--prefill-step-seconds" in refusal(*nothing_to_load, "--port", port, "--prefill-step-seconds", "-1")


def test_a_client_with_an_unreadable_certificate_says_so_in_one_line(tmp_path):
    done = subprocess.run(gptserve("client", "--tls-ca", str(tmp_path / "missing.pem"), "Hi"), capture_output=True,
                          text=True, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "--tls-ca" in lines[0] and "Traceback" not in done.stderr


def test_a_port_in_use_is_named(nothing_to_load):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        line = refusal(*nothing_to_load, "--port", port)
    assert "--port" in line and f"127.0.0.1:{port}: address already in use" in line


def test_generate_refuses_out_of_range_values_before_loading(tmp_path):
    done = subprocess.run(gptserve("generate", "--artifacts", str(tmp_path / "no-artifact"), "--temperature", "-5",
                                   "Hello"), capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "temperature: -5.0" in lines[0] and "allowed" in lines[0]


SERVE_WITH_A_LOAD_THAT_NEVER_ENDS = """
import asyncio, logging, sys, threading
from gptserve.service.server import ServerConfig, serve
logging.basicConfig(level="INFO", format="%(message)s")
sys.exit(asyncio.run(serve(ServerConfig(port=0, http_port=0), lambda: threading.Event().wait())))
"""


def test_sigterm_while_the_model_loads_exits_at_once():
    server = subprocess.Popen([sys.executable, "-c", SERVE_WITH_A_LOAD_THAT_NEVER_ENDS], stderr=subprocess.PIPE,
                              text=True)
    try:
        assert "listening on" in server.stderr.readline()
        server.send_signal(signal.SIGTERM)
        started = time.perf_counter()
        assert server.wait(20) == 0
        assert time.perf_counter() - started < 10
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_serve_flags_take_their_defaults_from_server_config(monkeypatch):
    from gptserve.cli import build_parser, serve_config

    monkeypatch.delenv("GPTSERVE_AUTH_TOKEN", raising=False)
    assert serve_config(build_parser().parse_args(["serve"])) == ServerConfig()


@pytest.mark.parametrize("command", [["inspect"], ["generate", "Hi", "--artifacts"]])
def test_a_folder_that_is_not_an_artifact_is_one_line(tmp_path, command):
    done = subprocess.run(gptserve(*command, str(tmp_path / "typo")), capture_output=True, text=True, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "no manifest.json" in lines[0], done.stderr
