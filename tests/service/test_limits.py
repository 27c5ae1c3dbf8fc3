"""Cancellation, deadlines and the bounded queue: a client that leaves stops costing compute within a step,
its slot is free again, a full server refuses at once, and nothing else is disturbed."""

from __future__ import annotations

import time

import grpc
import pytest

from gptserve.v1 import generation_pb2 as pb
from tests.service.support import collect, running_server, wait_for

LONG = 2000  # new tokens: far more than any test waits for, so only a cancel or a deadline ends these streams


@pytest.fixture(scope="module")
def served(default_engine):
    with running_server(default_engine, max_batch_size=2, max_queue=1) as (server, client):
        yield server, client


def still_serves(client) -> None:
    response = client.generate("The capital of France is", max_new_tokens=4, ignore_eos=True)
    assert response.usage.completion_tokens == 4 and client.health() == "SERVING"


def step_seconds(server) -> float:
    """The mean time between tokens so far: one decode step."""
    metrics = server.metrics
    return (metrics.value("gptserve_inter_token_latency_seconds_sum")
            / max(1.0, metrics.value("gptserve_inter_token_latency_seconds_count")))


def test_cancelled_stream_frees_its_slot_within_a_step(served):
    server, client = served
    stream = client.stream("Tell me a very long story.", max_new_tokens=LONG, ignore_eos=True)
    next(stream), next(stream), next(stream)
    assert client.model_info().active_sequences == 1
    stream.cancel()
    cancelled_at = time.perf_counter()
    wait_for(lambda: client.model_info().active_sequences == 0, timeout=5)
    freed_after = time.perf_counter() - cancelled_at
    tokens = server.metrics.value("gptserve_generated_tokens_total")
    time.sleep(0.3)
    assert server.metrics.value("gptserve_generated_tokens_total") == tokens  # no compute spent on it any more
    # Freed within about one decode step (plus the polling round trips).
    assert freed_after < 5 * step_seconds(server) + 0.2, (freed_after, step_seconds(server))
    wait_for(lambda: server.metrics.value("gptserve_requests_total",
                                          {"method": "GenerateStream", "code": "CANCELLED"}) == 1)
    still_serves(client)


def test_deadline_ends_generation_and_frees_the_slot(served):
    server, client = served
    with pytest.raises(grpc.RpcError) as caught:
        collect(client.stub.GenerateStream(
            pb.GenerateRequest(prompt="Tell me a long story.", stopping=pb.StoppingCriteria(
                max_new_tokens=LONG, ignore_eos=True)), timeout=0.5))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: client.model_info().active_sequences == 0, timeout=5)
    wait_for(lambda: server.metrics.value("gptserve_requests_total",
                                          {"method": "GenerateStream", "code": "DEADLINE_EXCEEDED"}) == 1)
    still_serves(client)


def test_full_queue_is_refused_at_once(served):
    server, client = served
    running = [client.stream(f"Story number {index}:", max_new_tokens=LONG, ignore_eos=True) for index in range(2)]
    for stream in running:
        next(stream)  # both hold a batch slot now
    waiting = client.stream("Waiting story:", max_new_tokens=LONG, ignore_eos=True)
    wait_for(lambda: client.model_info().queued_requests == 1)
    started = time.perf_counter()
    with pytest.raises(grpc.RpcError) as caught:
        client.generate("One too many", max_new_tokens=4)
    refused_after = time.perf_counter() - started
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-queue" in caught.value.details() and refused_after < 0.5
    # Leaving the queue frees its place too, without ever having run.
    waiting.cancel()
    wait_for(lambda: client.model_info().queued_requests == 0)
    for stream in running:
        stream.cancel()
    wait_for(lambda: client.model_info().active_sequences == 0)
    assert server.metrics.value("gptserve_queue_depth") == 0
    still_serves(client)
