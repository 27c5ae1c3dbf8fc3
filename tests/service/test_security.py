"""TLS and bearer-token auth: refused without, served with; health checks need no token; a blank token never
starts a server; an unauthenticated request is refused before it is parsed."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest

from gptserve.service.client import TOKEN_ENVIRONMENT, GenerationClient, read_token
from gptserve.service.errors import ConfigError
from gptserve.service.server import ServerConfig
from gptserve.v1 import generation_pb2 as pb
from tests.service.support import running_server

TOKEN = "s3cret-token"


def test_bearer_token_is_required(tiny_engine):
    with running_server(tiny_engine, auth_token=TOKEN) as (server, anonymous):
        for call in (lambda: anonymous.generate("Hello", max_new_tokens=2),
                     lambda: list(anonymous.stream("Hello", max_new_tokens=2)),
                     anonymous.model_info):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "Bearer" in caught.value.details()
        with GenerationClient(f"127.0.0.1:{server.port}", token="wrong") as wrong:
            with pytest.raises(grpc.RpcError) as caught:
                wrong.generate("Hello", max_new_tokens=2)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with GenerationClient(f"127.0.0.1:{server.port}", token=TOKEN) as client:
            response = client.generate("Hello", max_new_tokens=3, ignore_eos=True)
            assert response.usage.completion_tokens == 3
        assert anonymous.health() == "SERVING"  # probes from orchestrators carry no token
        refused = server.metrics.value("gptserve_requests_total", {"method": "Generate", "code": "UNAUTHENTICATED"})
        assert refused == 2


def test_tls_serves_clients_that_trust_the_certificate(tiny_engine, tls_files):
    cert, key = tls_files
    with running_server(tiny_engine, tls_cert_file=cert, tls_key_file=key, auth_token=TOKEN,
                        client_token=TOKEN) as (server, _):
        target = f"127.0.0.1:{server.port}"
        with GenerationClient(target, token=TOKEN, root_certificates=cert.read_bytes(), timeout=30) as client:
            response = client.generate("Hello", max_new_tokens=3, ignore_eos=True)
            assert response.finish_reason == pb.FINISH_REASON_LENGTH and response.usage.completion_tokens == 3
        with GenerationClient(target, token=TOKEN, timeout=5) as plaintext:
            with pytest.raises(grpc.RpcError) as caught:
                plaintext.generate("Hello", max_new_tokens=3)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        with GenerationClient(target, root_certificates=cert.read_bytes(), timeout=30) as no_token:
            with pytest.raises(grpc.RpcError) as caught:
                no_token.generate("Hello", max_new_tokens=3)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


# Authentication never fails open ------------------------------------------------------------------------------


def serve_command(*arguments: str, environment: dict | None = None) -> subprocess.CompletedProcess:
    """`gptserve serve` with arguments that must make it refuse to start (it is killed after 60 s otherwise)."""
    return subprocess.run([sys.executable, "-m", "gptserve", "serve", "--http-port", "0", *arguments],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **(environment or {})})


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_an_empty_token_file_refuses_to_start(tiny_artifact, tmp_path, content):
    token_file = tmp_path / "token"
    token_file.write_text(content)
    done = serve_command("--artifacts", str(tiny_artifact), "--port", "0", "--auth-token-file", str(token_file))
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    assert str(token_file) in lines[0] and "empty" in lines[0]


def test_a_blank_token_in_the_environment_refuses_to_start(tiny_artifact):
    done = serve_command("--artifacts", str(tiny_artifact), "--port", "0", environment={TOKEN_ENVIRONMENT: "  "})
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    assert TOKEN_ENVIRONMENT in lines[0] and "empty" in lines[0]


def test_read_token_refuses_blank_tokens(tmp_path, monkeypatch):
    (tmp_path / "blank").write_text(" \n")
    (tmp_path / "token").write_text(f"{TOKEN}\n")
    with pytest.raises(ConfigError, match="empty"):
        read_token(str(tmp_path / "blank"))
    with pytest.raises(ConfigError, match="cannot read"):
        read_token(str(tmp_path / "missing"))
    assert read_token(str(tmp_path / "token")) == TOKEN
    monkeypatch.setenv(TOKEN_ENVIRONMENT, "\t")
    with pytest.raises(ConfigError, match=TOKEN_ENVIRONMENT):
        read_token(None)
    monkeypatch.setenv(TOKEN_ENVIRONMENT, "")  # empty: not set, as docker compose passes an unset variable
    assert read_token(None) is None


@pytest.mark.parametrize("token", ["", "   "])
def test_server_config_refuses_a_blank_token(token):
    with pytest.raises(ConfigError, match="auth_token"):
        ServerConfig(auth_token=token)


# The token is checked before the request is parsed ------------------------------------------------------------

GARBAGE = bytes([0x12, 0xFF, 0xFF, 0xFF, 0x0F])  # field 2 (prompt) claiming a length far past the message's end


def raw_call(channel: grpc.Channel, method: str, payload: bytes, metadata=()):
    """`method` called with `payload` as the request bytes, unparsed by the client."""
    rpc = channel.unary_unary(f"/gptserve.v1.TextGeneration/{method}", request_serializer=None,
                              response_deserializer=None)
    return rpc(payload, timeout=30, metadata=metadata)


def test_unauthenticated_garbage_is_refused_unparsed(tiny_engine, caplog):
    with running_server(tiny_engine, auth_token=TOKEN) as (server, client):
        caplog.clear()
        for method in ("Generate", "Tokenize", "GetModelInfo"):
            with pytest.raises(grpc.RpcError) as caught:
                raw_call(client.channel, method, GARBAGE)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, (method, caught.value.details())
        stream = client.channel.unary_stream("/gptserve.v1.TextGeneration/GenerateStream",
                                             request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as caught:
            list(stream(GARBAGE, timeout=30))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # With the token, the same bytes are parsed, and refused as the malformed message they are.
        with pytest.raises(grpc.RpcError) as caught:
            raw_call(client.channel, "Generate", GARBAGE, metadata=(("authorization", f"Bearer {TOKEN}"),))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # At most a short line per refusal: no traceback, no echo of the request.
    assert not [record for record in caplog.records if record.exc_info or len(record.getMessage()) > 200], caplog.text
