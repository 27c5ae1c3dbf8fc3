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
import urllib.error
import urllib.request

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from gptserve.service.client import SMALL_WINDOW, GenerationClient
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


def test_shutdown_lets_http_streams_finish_and_answers_503(default_engine):
    http_port = free_port()
    server = BackgroundServer(ServerConfig(port=0, http_port=http_port, grace_seconds=30),
                              lambda: default_engine).start()
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0, timeout=60)
    model = api.models.list().data[0].id
    stream = api.completions.create(model=model, prompt="Tell me about the sea.", max_tokens=24, temperature=0,
                                    stream=True, extra_body={"ignore_eos": True, "return_token_ids": True})
    first = next(iter(stream))
    stopping = threading.Thread(target=server.stop, kwargs={"grace": 30})
    started = time.perf_counter()
    stopping.start()
    health = lambda: urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=5).status
    with pytest.raises(urllib.error.HTTPError) as draining:
        wait_for(lambda: health() != 200)
    assert draining.value.code == 503
    with pytest.raises(openai.APIStatusError) as refused:
        api.completions.create(model=model, prompt="A new request", max_tokens=4)
    assert refused.value.status_code == 503
    rest = list(stream)
    assert sum(len(chunk.choices[0].token_ids) for chunk in [first, *rest]) == 24
    assert rest[-1].choices[0].finish_reason == "length"
    stopping.join(30)
    assert not stopping.is_alive() and time.perf_counter() - started < 20  # not held for the whole grace


def test_request_phases_are_traced_in_the_clients_trace(tiny_engine):
    """OpenTelemetry: one span per request, its phases as children, in the trace the client's traceparent names."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    http_port = free_port()
    server = BackgroundServer(ServerConfig(port=0, http_port=http_port), lambda: tiny_engine,
                              tracer_provider=provider).start()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = f"00-{trace_id}-00f067aa0ba902b7-01"
    try:
        with GenerationClient(f"127.0.0.1:{server.port}", timeout=30) as client:
            list(client.stub.GenerateStream(
                pb.GenerateRequest(prompt="Trace me", stopping=pb.StoppingCriteria(max_new_tokens=5, ignore_eos=True)),
                metadata=(("traceparent", parent),)))
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0)
        api.completions.create(model=api.models.list().data[0].id, prompt="Over HTTP", max_tokens=3,
                               extra_headers={"x-request-id": "http-42"})
    finally:
        server.stop()
    spans = exporter.get_finished_spans()
    requests = {span.name: span for span in spans if span.name.startswith("gptserve ")}
    assert set(requests) == {"gptserve GenerateStream", "gptserve Completions"}
    grpc_span = requests["gptserve GenerateStream"]
    assert format(grpc_span.context.trace_id, "032x") == trace_id
    assert grpc_span.attributes["gptserve.completion_tokens"] == 5
    assert requests["gptserve Completions"].attributes["gptserve.request_id"] == "http-42"
    for request in requests.values():
        phases = {span.name: span for span in spans if span.parent and span.parent.span_id == request.context.span_id}
        assert set(phases) == {"queue", "prefill", "decode"}
        assert request.start_time <= phases["queue"].start_time <= phases["prefill"].start_time
        assert phases["prefill"].end_time <= phases["decode"].start_time + 1 <= request.end_time + 1


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


# What an operator reads: every family, with the model's name, while requests run; no `_created` series.
METRIC_FAMILIES = {
    "gptserve_requests", "gptserve_request_finished", "gptserve_prompt_tokens", "gptserve_generated_tokens",
    "gptserve_request_prompt_tokens", "gptserve_request_generation_tokens", "gptserve_request_queue_time_seconds",
    "gptserve_time_to_first_token_seconds", "gptserve_inter_token_latency_seconds",
    "gptserve_request_duration_seconds", "gptserve_queue_depth", "gptserve_active_sequences",
    "gptserve_kv_cache_tokens", "gptserve_kv_cache_usage_ratio", "gptserve_batch_size", "gptserve_prefill_batch_size",
    "gptserve_paused_sequences", "process_resident_memory_bytes", "process_cpu_seconds", "process_open_fds",
}


def scrape(port: int) -> dict[str, list]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_serve_command_client_command_metrics_json_log_and_sigterm(tiny_artifact):
    port, metrics_port = free_port(), free_port()
    environment = {**os.environ, "GPTSERVE_AUTH_TOKEN": ""}
    server = subprocess.Popen(
        gptserve("serve", "--artifacts", str(tiny_artifact), "--port", str(port), "--metrics-port", str(metrics_port),
                 "--http-port", "0", "--provider", "cpu", "--grace-seconds", "5", "--log-format", "json",
                 "--stats-seconds", "0.2"),
        stderr=subprocess.PIPE, text=True, env=environment)
    try:
        # A small window: the stream waits (paused, its cache held) while this client does not read.
        with GenerationClient(f"127.0.0.1:{port}", timeout=30, options=SMALL_WINDOW) as client:
            client.wait_until_serving(timeout=120)
            request = pb.GenerateRequest(prompt="Slowly", stopping=pb.StoppingCriteria(max_new_tokens=240,
                                                                                     ignore_eos=True))
            stream = client.stub.GenerateStream(request, metadata=(("x-request-id", "trace-me-42"),))
            next(stream)
            time.sleep(0.5)
            during = scrape(metrics_port)
            assert sum(len(message.tokens) for message in stream) <= 239
        called = subprocess.run(gptserve("client", "Hello there", "--target", f"127.0.0.1:{port}",
                                         "--max-new-tokens", "6", "--ignore-eos"),
                                capture_output=True, text=True, timeout=60, env=environment)
        assert called.returncode == 0, called.stderr
        assert "[length: 6 tokens" in called.stderr
        time.sleep(0.5)  # a stats line covers the requests
        after = scrape(metrics_port)
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()
    assert METRIC_FAMILIES <= set(after), METRIC_FAMILIES - set(after)
    assert not [name for name, samples in after.items() for sample in samples if sample.name.endswith("_created")]
    assert all(sample.labels.get("model_name") for name, samples in after.items() if name.startswith("gptserve_")
               for sample in samples)
    value = lambda samples, name, **labels: sum(sample.value for sample in samples if sample.name == name
                                                and labels.items() <= sample.labels.items())
    assert value(during["gptserve_active_sequences"], "gptserve_active_sequences") == 1
    assert 0 < value(during["gptserve_kv_cache_tokens"], "gptserve_kv_cache_tokens") <= 256
    assert 0 < value(during["gptserve_kv_cache_usage_ratio"], "gptserve_kv_cache_usage_ratio") < 1
    assert value(after["gptserve_requests"], "gptserve_requests_total", method="GenerateStream", code="OK") == 2
    assert value(after["gptserve_request_finished"], "gptserve_request_finished_total", finish_reason="length") == 2
    assert value(after["gptserve_generated_tokens"], "gptserve_generated_tokens_total") == 246
    assert value(after["gptserve_request_generation_tokens"], "gptserve_request_generation_tokens_sum") == 246
    assert value(after["gptserve_request_queue_time_seconds"], "gptserve_request_queue_time_seconds_count") == 2
    assert value(after["gptserve_request_duration_seconds"], "gptserve_request_duration_seconds_bucket",
                 le="655.36") == 2  # buckets reach long requests
    assert value(after["process_resident_memory_bytes"], "process_resident_memory_bytes") > 50e6
    assert value(after["gptserve_kv_cache_tokens"], "gptserve_kv_cache_tokens") == 0  # all freed

    log = server.stderr.read().splitlines()
    lines = [json.loads(line) for line in log]  # pure JSON lines, every one
    requests = [line for line in lines if line["logger"] == "gptserve.requests"]
    assert [line["request_id"] for line in requests][0] == "trace-me-42"
    for line in requests:
        assert line["code"] == "OK" and line["finish_reason"] == "length" and line["method"] == "GenerateStream"
        assert {"prompt_tokens", "completion_tokens", "ttft_s", "total_s", "queue_s", "time", "level"} <= set(line)
    stats = [line for line in lines if line["logger"] == "gptserve.stats"]
    assert stats and max(line["generation_tokens_per_s"] for line in stats) > 0
    assert any("shutting down" in line["message"] for line in lines)


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
