"""No request can crash the engine loop: when the engine raises, the requests in that step fail with INTERNAL
("engine failure" and the request id; the details go to the log) and the server goes on serving the next ones,
paused requests included."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from gptserve.model.generation import StoppingParams
from gptserve.model.sampling import SamplingParams
from gptserve.service.api import GenerationRequest
from gptserve.service.errors import EngineFailure
from gptserve.service.kv_cache import KVCache
from gptserve.service.metrics import Metrics
from gptserve.service.scheduler import Scheduler
from tests.service.support import read_ids, running_server


class FaultyEngine:
    """The real engine, made to raise on demand (fault injection: what ONNX Runtime does on a real failure)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.fail_prefill = self.fail_decode = False

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def _check(self, decoding: bool) -> None:
        if (self.fail_decode if decoding else self.fail_prefill):
            raise RuntimeError("injected failure in node /blocks.0/attn/GroupQueryAttention")

    def prefill(self, prompts, cache=None):
        self._check(decoding=False)
        return self.engine.prefill(prompts, cache)

    def decode(self, cache, token_ids):
        self._check(decoding=True)
        return self.engine.decode(cache, token_ids)


@pytest.fixture(scope="module")
def served(tiny_engine):
    faulty = FaultyEngine(tiny_engine)
    with running_server(faulty) as (server, client):
        yield faulty, server, client


@pytest.mark.parametrize("where", ["fail_prefill", "fail_decode"])
def test_engine_failure_fails_only_that_step_and_serving_goes_on(served, where, caplog):
    faulty, server, client = served
    setattr(faulty, where, True)
    try:
        with caplog.at_level(logging.ERROR, logger="gptserve.scheduler"), pytest.raises(grpc.RpcError) as caught:
            list(client.stream("Hello there", max_new_tokens=6, ignore_eos=True, request_id=f"req-{where}"))
        details = caught.value.details()
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        # The client learns which request failed, not the runtime's internals; the log has those.
        assert details.startswith("engine failure") and f"req-{where}" in details
        assert "GroupQueryAttention" not in details and "injected" not in details
        assert "injected failure" in caplog.text
    finally:
        setattr(faulty, where, False)
    assert client.model_info().active_sequences == 0
    response = client.generate("Hello there", max_new_tokens=6, ignore_eos=True)
    assert response.usage.completion_tokens == 6 and client.health() == "SERVING"


def test_a_decode_failure_while_a_reader_is_paused_ends_every_request(tiny_engine):
    """The paused request was not in the failed step: it must neither be dropped unended (its stream would hang
    and its slot never return) nor fail; it resumes once read and finishes."""
    faulty = FaultyEngine(tiny_engine)
    ids = tuple(tiny_engine.tokenizer.encode("Hello there"))
    request = lambda name: GenerationRequest(name, ids, SamplingParams(), StoppingParams(8, (), True))

    async def scenario():
        scheduler = Scheduler(faulty, Metrics(), max_batch_size=4, max_unread_tokens=2)
        scheduler.start()
        try:
            slow = scheduler.submit(request("slow"))
            for _ in range(500):
                if slow.paused:
                    break
                await asyncio.sleep(0.01)
            assert slow.paused
            faulty.fail_decode = True
            with pytest.raises(EngineFailure):
                await asyncio.wait_for(read_ids(scheduler.submit(request("steady"))), 10)
            faulty.fail_decode = False
            slow_ids = await asyncio.wait_for(read_ids(slow), 10)
            await asyncio.sleep(0.05)
            return slow_ids, scheduler.active_count
        finally:
            scheduler.stop()

    slow_ids, active = asyncio.run(scenario())
    assert len(slow_ids) == 8 and active == 0


def test_a_scheduler_failure_ends_every_admitted_request(tiny_engine):
    """A bug past the engine (here: a cache that cannot join the batch, after the last chunk of a prompt admitted
    iterations earlier) ends every request in the server with INTERNAL; none is left unended, and serving goes on."""

    class UnjoinableCache(FaultyEngine):
        corrupt_at: int | None = None  # the prompt length whose finished cache comes back with the wrong KV heads

        def prefill(self, prompts, cache=None):
            logits, cache = self.engine.prefill(prompts, cache)
            if self.corrupt_at is not None and int(cache.lengths.max()) == self.corrupt_at:
                cache = KVCache([tensor[:, :1] for tensor in cache.buffers], cache.lengths)
            return logits, cache

    engine = UnjoinableCache(tiny_engine)
    prompt = tuple(tiny_engine.tokenizer.encode("Hello there, how are you today? " * 6))  # three chunks or more
    request = lambda name, new: GenerationRequest(name, prompt[:4] if name == "running" else prompt, SamplingParams(),
                                                  StoppingParams(new, (), True))

    async def outcome(handle) -> str:
        try:
            async for _ in handle.updates():
                pass
            return "finished"
        except EngineFailure:
            return "failed"

    async def scenario():
        scheduler = Scheduler(engine, Metrics(), max_batch_size=4, prefill_chunk_tokens=16)
        scheduler.start()
        try:
            running = scheduler.submit(request("running", 200))
            while not running.produced:
                await asyncio.sleep(0.01)
            engine.corrupt_at = len(prompt)
            joining = scheduler.submit(request("joining", 4))
            results = await asyncio.wait_for(asyncio.gather(outcome(running), outcome(joining)), 30)
            engine.corrupt_at = None
            after = await asyncio.wait_for(outcome(scheduler.submit(request("after", 4))), 30)
            await asyncio.sleep(0.05)
            return results, after, scheduler.active_count
        finally:
            scheduler.stop()

    results, after, active = asyncio.run(scenario())
    assert results == ["failed", "failed"] and after == "finished" and active == 0
