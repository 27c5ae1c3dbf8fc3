"""The load balancer for real: Debian's nginx, run on the repository's template rendered for two `gptserve serve`
processes on 127.0.0.1 (the tiny artifact), as docker-compose.yml runs it for its replicas.

Each replica counts the calls it served in its Prometheus metrics, which is how the spread is seen. The replica
kill comes last in this module: the tests before it need both replicas."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gptserve.service.client import GenerationClient
from gptserve.v1 import generation_pb2 as pb
from tests.deploy.support import HEALTHCHECK, NGINX_TEMPLATE, NGINX_TLS_CONF, REPO, render_template

TOKEN = "deploy-test-token"
SERVICE = "gptserve.v1.TextGeneration"
START_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Replica:
    process: subprocess.Popen
    port: int
    http_port: int
    metrics_port: int
    log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def served(self, method: str = "GenerateStream") -> float:
        """Calls of `method` this replica finished with OK, from its /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                   if sample.name == "gptserve_requests_total"
                   and (sample.labels["method"], sample.labels["code"]) == (method, "OK"))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_replica(artifact: Path, folder: Path) -> Replica:
    """`gptserve serve` as a process of its own, as in a container: the token from the environment."""
    port, http_port, metrics_port = free_port(), free_port(), free_port()
    log = folder / f"replica-{port}.log"
    command = [sys.executable, "-m", "gptserve", "serve", "--artifacts", str(artifact), "--host", "127.0.0.1",
               "--port", str(port), "--http-port", str(http_port), "--metrics-port", str(metrics_port),
               "--provider", "cpu", "--threads", "1"]
    with open(log, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=REPO,
                                   env={**os.environ, "GPTSERVE_AUTH_TOKEN": TOKEN})
    return Replica(process, port, http_port, metrics_port, log)


def wait_serving(replica: Replica) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    with GenerationClient(replica.target, timeout=2) as client:
        while time.monotonic() < deadline:
            if replica.process.poll() is not None:
                pytest.fail(f"replica exited with {replica.process.returncode}:\n{replica.log.read_text()}")
            with contextlib.suppress(grpc.RpcError):
                if client.health() == "SERVING":
                    return
            time.sleep(0.1)
    pytest.fail(f"replica not SERVING within {START_TIMEOUT} s:\n{replica.log.read_text()}")


@dataclass
class Balancer:
    process: subprocess.Popen
    port: int
    http_port: int
    prefix: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # nginx: fast shutdown
            self.process.wait(10)


def start_nginx(nginx: str, prefix: Path, replicas: list[Replica],
                certificate: tuple[Path, Path] | None = None) -> Balancer:
    """nginx as a plain process under `prefix` (its own pid, logs and temp folders), on the repository's template
    rendered as the nginx image renders it; with `certificate`, TLS as deploy/compose.tls.yml sets it up."""
    port, http_port = free_port(), free_port()
    conf = prefix / "conf"
    (prefix / "temp").mkdir(parents=True)
    conf.mkdir()
    servers = " ".join(f"server 127.0.0.1:{replica.port};" for replica in replicas)
    http_servers = " ".join(f"server 127.0.0.1:{replica.http_port};" for replica in replicas)
    listen = f"127.0.0.1:{port} {'ssl http2' if certificate else 'http2'}"
    http_listen = f"127.0.0.1:{http_port}{' ssl' if certificate else ''}"
    rendered = render_template(NGINX_TEMPLATE.read_text(), {
        "GPTSERVE_UPSTREAM_SERVERS": servers, "GPTSERVE_LB_LISTEN": listen,
        "GPTSERVE_HTTP_UPSTREAM_SERVERS": http_servers, "GPTSERVE_HTTP_LB_LISTEN": http_listen})
    (conf / "gptserve.conf").write_text(rendered)
    if certificate:
        (conf / "gptserve-tls").mkdir()
        shutil.copy(NGINX_TLS_CONF, conf / "gptserve-tls" / "tls.conf")
        (conf / "gptserve-tls-certs").mkdir()
        shutil.copy(certificate[0], conf / "gptserve-tls-certs" / "cert.pem")
        shutil.copy(certificate[1], conf / "gptserve-tls-certs" / "key.pem")
    # The nginx image's nginx.conf, reduced to what a process of the test's own needs.
    temp = {name: prefix / "temp" / name for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    (conf / "nginx.conf").write_text("\n".join([
        "daemon off;",
        "worker_processes 1;",
        f"pid {prefix / 'nginx.pid'};",
        f"error_log {prefix / 'error.log'} info;",
        "user root;" if os.geteuid() == 0 else "",  # as root, workers would otherwise become nobody
        "events { worker_connections 256; }",
        "http {",
        f"    access_log {prefix / 'access.log'};",
        *(f"    {name}_temp_path {path};" for name, path in temp.items()),
        "    include gptserve.conf;",
        "}",
    ]) + "\n")
    test = subprocess.run([nginx, "-t", "-p", str(prefix), "-c", str(conf / "nginx.conf"), "-e", "stderr"],
                          capture_output=True, text=True)
    assert test.returncode == 0, f"nginx -t rejects the rendered configuration:\n{test.stderr}\n{rendered}"
    process = subprocess.Popen([nginx, "-p", str(prefix), "-c", str(conf / "nginx.conf"),
                                "-e", str(prefix / "error.log")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    balancer = Balancer(process, port, http_port, prefix)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"nginx exited with {process.returncode}:\n{(prefix / 'error.log').read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return balancer
        time.sleep(0.05)
    balancer.stop()
    pytest.fail("nginx did not listen within 10 s")


@pytest.fixture(scope="module")
def replicas(tiny_artifact, tmp_path_factory):
    folder = tmp_path_factory.mktemp("replicas")
    started = []
    try:
        started = [start_replica(tiny_artifact, folder) for _ in range(2)]
        for replica in started:
            wait_serving(replica)
        yield started
    finally:
        for replica in started:
            replica.stop()


@pytest.fixture(scope="module")
def balancer(nginx, replicas, tmp_path_factory):
    started = start_nginx(nginx, tmp_path_factory.mktemp("nginx"), replicas)
    yield started
    started.stop()


@pytest.fixture
def client(balancer):
    with GenerationClient(balancer.target, token=TOKEN, timeout=60) as client:
        yield client


def stream(client: GenerationClient, prompt: str, max_new_tokens: int = 6) -> list[int]:
    """One streamed generation; its token ids, checked to have ended as asked."""
    ids, last = [], None
    for last in client.stream(prompt, max_new_tokens=max_new_tokens, ignore_eos=True):
        ids += [token.id for token in last.tokens]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH and last.usage.completion_tokens == max_new_tokens
    assert len(ids) == max_new_tokens
    return ids


def healthcheck(target: str) -> subprocess.CompletedProcess:
    """deploy/healthcheck.py, as the containers' healthcheck runs it."""
    return subprocess.run([sys.executable, str(HEALTHCHECK), target], capture_output=True, text=True, cwd=REPO,
                          timeout=30)


def test_streams_through_nginx_are_spread_over_both_replicas(client, replicas):
    before = [replica.served() for replica in replicas]
    prompts = ["The load balancer", "A second prompt"] * 4
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda prompt: stream(client, prompt), prompts))
    served = [replica.served() - count for replica, count in zip(replicas, before)]
    assert sum(served) == len(prompts)
    assert min(served) >= 1, f"nginx sent every stream to one replica: {served}"
    # Both replicas serve the same model the same way: greedy tokens agree whichever replica answered.
    for prompt in set(prompts):
        assert len({tuple(ids) for ids, asked in zip(results, prompts) if asked == prompt}) == 1


def test_health_through_nginx_reports_serving(client, balancer):
    assert client.health() == "SERVING"
    assert client.health(SERVICE) == "SERVING"
    with GenerationClient(balancer.target, timeout=10) as anonymous:  # health needs no token
        assert anonymous.health() == "SERVING"
    result = healthcheck(balancer.target)
    assert result.returncode == 0 and "SERVING" in result.stdout, result.stderr


def test_the_token_reaches_the_replicas(client, balancer):
    assert client.model_info().max_batch_size > 0
    with GenerationClient(balancer.target, timeout=10) as anonymous:
        with pytest.raises(grpc.RpcError) as refused:
            anonymous.model_info()
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_tls_at_nginx(nginx, replicas, certificate, tmp_path):
    tls = start_nginx(nginx, tmp_path / "nginx-tls", replicas, certificate)
    try:
        root = certificate[0].read_bytes()
        with GenerationClient(tls.target, token=TOKEN, root_certificates=root, timeout=60) as client:
            assert client.health() == "SERVING"
            assert len(stream(client, "Over TLS")) == 6
        with GenerationClient(tls.target, token=TOKEN, timeout=5) as plaintext:
            with pytest.raises(grpc.RpcError):
                plaintext.health()
        http = openai_client(f"https://127.0.0.1:{tls.http_port}/v1",
                             openai.DefaultHttpxClient(verify=str(certificate[0])))
        completion = http.completions.create(model=http.models.list().data[0].id, prompt="Over TLS", max_tokens=4,
                                             temperature=0, extra_body={"ignore_eos": True})
        assert completion.usage.completion_tokens == 4
    finally:
        tls.stop()


def openai_client(base_url: str, http_client=None) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=TOKEN, http_client=http_client, max_retries=0, timeout=60)


def test_openai_streams_through_nginx_are_spread_over_both_replicas(balancer, replicas):
    """The HTTP API behind nginx: streams reach both replicas, and every token comes through."""
    http = openai_client(f"http://127.0.0.1:{balancer.http_port}/v1")
    before = [replica.served("Completions") for replica in replicas]
    model = http.models.list().data[0].id

    def one(prompt: str) -> tuple[list[int], str]:
        events = list(http.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0, stream=True,
                                              extra_body={"ignore_eos": True, "return_token_ids": True}))
        assert events[-1].choices[0].finish_reason == "length"
        return ([token for event in events for token in event.choices[0].token_ids],
                "".join(event.choices[0].text for event in events))

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, ["Through nginx"] * 8))
    served = [replica.served("Completions") - count for replica, count in zip(replicas, before)]
    assert sum(served) == 8 and min(served) >= 1, served
    assert all(len(ids) == 6 for ids, _ in results), results
    assert len(set(map(str, results))) == 1  # greedy: the same whichever replica answered
    with urllib.request.urlopen(f"http://127.0.0.1:{balancer.http_port}/health", timeout=10) as health:
        assert health.status == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{balancer.http_port}/v1", api_key="wrong",
                      max_retries=0).models.list()


def test_a_killed_replica_is_routed_around(client, balancer, replicas):
    victim, survivor = replicas
    victim.process.kill()  # no graceful shutdown: a crash, as far as nginx can tell
    victim.process.wait()
    before = survivor.served()
    for index in range(6):
        stream(client, f"After the kill {index}")
    assert survivor.served() - before == 6
    assert client.health() == "SERVING"
    assert healthcheck(balancer.target).returncode == 0
    assert healthcheck(victim.target).returncode == 1
