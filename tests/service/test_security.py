"""TLS and bearer-token auth: refused without, served with; health checks need no token."""

from __future__ import annotations

import grpc
import pytest

from gptserve.v1 import generation_pb2 as pb
from gptserve.service.client import GenerationClient
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
