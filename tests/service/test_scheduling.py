"""Scheduling under pressure: long prompts are read in chunks between decode steps, clients that stop reading give
up their slots and are ended when they make no progress, and a shutdown counts what its clients were told."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from gptserve.service.client import SMALL_WINDOW, GenerationClient
from gptserve.service.scheduler import Chunk, plan_prefill
from gptserve.service.server import BackgroundServer, ServerConfig
from tests.service.support import collect, running_server, solo_greedy, wait_for

LONG = 4000  # new tokens: only a cancel, a stall or the test's end stops these streams


class Admitted:
    """What plan_prefill reads of a request handle: its prompt."""

    def __init__(self, length: int) -> None:
        self.request = SimpleNamespace(prompt_ids=tuple(range(length)))


def test_plan_prefill_batches_short_prompts_and_chunks_long_ones():
    short, other, long = Admitted(30), Admitted(50), Admitted(700)
    # Whole short prompts together while their padded batch fits the budget, in arrival order.
    assert plan_prefill([short, other, long], {}, 256) == (Chunk(short, 0, 30), Chunk(other, 0, 50))
    assert plan_prefill([short, other], {}, 90) == (Chunk(short, 0, 30),)
    # A prompt longer than the budget goes alone, a chunk at a time, until it is read.
    assert plan_prefill([long, short], {}, 256) == (Chunk(long, 0, 256),)
    assert plan_prefill([short, long], {long: 256}, 256) == (Chunk(long, 256, 512),)
    last = plan_prefill([long], {long: 512}, 256)
    assert last == (Chunk(long, 512, 700),) and last[0].completes_prompt
    assert plan_prefill([], {}, 256) == ()


def test_chunked_prefill_equals_one_prefill(default_engine):
    engine = default_engine
    prompt = list(np.random.default_rng(0).integers(100, 40000, 700))
    whole, whole_cache = engine.prefill([prompt])
    cache = None
    for start in range(0, len(prompt), 256):
        chunked, cache = engine.prefill([prompt[start:start + 256]], cache)
    assert np.abs(whole - chunked).max() < 1e-4
    assert list(cache.lengths) == list(whole_cache.lengths) == [700]
    tokens = []
    for current in (whole_cache, cache):
        token, ids = int(whole[0].argmax()), []
        for _ in range(6):
            ids.append(token)
            token = int(engine.decode(current, np.array([token]))[0].argmax())
        tokens.append(ids)
    assert tokens[0] == tokens[1]


@pytest.fixture(scope="module")
def chunked(default_engine):
    with running_server(default_engine, max_batch_size=4, max_queue=4, prefill_chunk_tokens=64) as served:
        yield served


def test_a_long_prompt_read_in_chunks_gives_its_solo_tokens(chunked, default_engine):
    server, client = chunked
    prompt_ids = list(np.random.default_rng(1).integers(100, 40000, 300))
    passes = server.metrics.value("gptserve_prefill_batch_size_count")
    ids, _, _ = collect(client.stream(prompt_token_ids=prompt_ids, max_new_tokens=8, ignore_eos=True))
    assert ids == solo_greedy(default_engine, prompt_ids, 8, ignore_eos=True).token_ids
    assert server.metrics.value("gptserve_prefill_batch_size_count") - passes >= 300 / 64


def test_running_streams_go_on_while_a_long_prompt_is_read(chunked):
    """Between a long prompt's arrival and its first token, the running streams keep getting tokens."""
    server, client = chunked
    arrivals: list[list[float]] = [[], []]
    running = [client.stream("Tell me a long story.", max_new_tokens=LONG, ignore_eos=True) for _ in arrivals]

    def read(stream, times):
        try:
            for message in stream:
                times += [time.perf_counter()] * len(message.tokens)
        except grpc.RpcError:
            pass

    readers = [threading.Thread(target=read, args=pair) for pair in zip(running, arrivals)]
    for reader in readers:
        reader.start()
    wait_for(lambda: all(len(times) >= 2 for times in arrivals), timeout=30)
    sent = time.perf_counter()
    long = client.stream(prompt_token_ids=list(np.random.default_rng(2).integers(100, 40000, 1500)),
                         max_new_tokens=1)
    next(long)
    first_token = time.perf_counter()
    for stream in running:
        stream.cancel()
    for reader in readers:
        reader.join()
    during = [sum(sent < moment < first_token for moment in times) for times in arrivals]
    assert min(during) >= 5, during  # one step for the whole prompt would have given them none


def test_a_request_cancelled_mid_prompt_stops_within_a_chunk(chunked):
    server, client = chunked
    before = server.metrics.value("gptserve_prompt_tokens_total")
    with pytest.raises(grpc.RpcError) as caught:
        collect(client.stub.GenerateStream(
            client_request(list(np.random.default_rng(3).integers(100, 40000, 4000))), timeout=0.5))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: client.model_info().active_sequences == 0, timeout=10)
    read = server.metrics.value("gptserve_prompt_tokens_total") - before
    assert read < 4000, read  # the rest of the prompt was never run
    response = client.generate("The capital of France is", max_new_tokens=4, ignore_eos=True)
    assert response.usage.completion_tokens == 4


def client_request(prompt_ids):
    from gptserve.service.client import build_request

    return build_request(prompt_token_ids=prompt_ids, max_new_tokens=4)


def never_reading(port: int, count: int) -> list:
    """`count` streams on small-window channels, each read once (so it runs) and then never again."""
    clients = [GenerationClient(f"127.0.0.1:{port}", options=SMALL_WINDOW) for _ in range(count)]
    streams = [client.stream(f"Story {index}:", max_new_tokens=LONG, ignore_eos=True, return_logprobs=True)
               for index, client in enumerate(clients)]
    for stream in streams:
        next(stream)
    return list(zip(clients, streams))


def test_streams_that_never_read_give_up_their_slots(default_engine):
    with running_server(default_engine, max_batch_size=2, max_queue=2, max_unread_tokens=8,
                        stall_seconds=120) as (server, client):
        stalled = never_reading(server.port, 2)
        wait_for(lambda: server.metrics.value("gptserve_paused_sequences_total") >= 2, timeout=60)
        time.sleep(1.0)  # a stream paused, resumed and paused again as its window settled pauses for good by now
        generated = server.metrics.value("gptserve_generated_tokens_total")
        # Both slots were theirs; paused, they hold none, so a third request runs at once.
        response = GenerationClient(f"127.0.0.1:{server.port}", timeout=30).generate(
            "The capital of France is", max_new_tokens=8, ignore_eos=True)
        assert response.usage.completion_tokens == 8
        assert client.model_info().active_sequences == 2  # the paused ones, still waiting for their readers
        # They cost no compute while paused: only the third request's tokens were made.
        assert server.metrics.value("gptserve_generated_tokens_total") == generated + 8
        for stalled_client, stream in stalled:
            stream.cancel()
            stalled_client.channel.close()
        wait_for(lambda: client.model_info().active_sequences == 0, timeout=10)


def test_a_stream_that_makes_no_progress_is_ended(default_engine):
    with running_server(default_engine, max_unread_tokens=8, stall_seconds=1.0) as (server, client):
        ((stalled_client, stream),) = never_reading(server.port, 1)
        wait_for(lambda: server.metrics.value(
            "gptserve_requests_total", {"method": "GenerateStream", "code": "RESOURCE_EXHAUSTED"}) == 1, timeout=60)
        wait_for(lambda: client.model_info().active_sequences == 0, timeout=10)
        stalled_client.channel.close()
        assert client.generate("Hello", max_new_tokens=2, ignore_eos=True).usage.completion_tokens == 2


def test_streams_cut_by_shutdown_are_counted_as_what_their_clients_got(default_engine):
    server = BackgroundServer(ServerConfig(host="127.0.0.1", port=0, http_port=0), lambda: default_engine).start()
    with GenerationClient(f"127.0.0.1:{server.port}", timeout=60) as client:
        stream = client.stream("Tell me a long story.", max_new_tokens=LONG, ignore_eos=True)
        next(stream)
        stopping = threading.Thread(target=server.stop, kwargs={"grace": 0.3})
        stopping.start()
        with pytest.raises(grpc.RpcError) as caught:
            collect(stream)
        stopping.join()
    code = caught.value.code()
    assert code == grpc.StatusCode.UNAVAILABLE
    assert server.metrics.value("gptserve_requests_total", {"method": "GenerateStream", "code": code.name}) == 1
