"""Continuous batching must not change results: 16 concurrent greedy streams (different prompts and lengths,
joining and leaving at different steps) each equal their solo run. Also: a client that stops reading is paused
and resumed without changing its tokens."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from gptserve.model.generation import StoppingParams
from gptserve.model.sampling import SamplingParams
from gptserve.service.api import GenerationRequest
from gptserve.service.metrics import Metrics
from gptserve.service.scheduler import Scheduler
from gptserve.v1 import generation_pb2 as pb
from tests.service.support import collect, running_server, solo_greedy, wait_for

PROMPTS = [
    "The capital of France is",
    "Write a haiku about autumn leaves.",
    "List three prime numbers:",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old woodcutter who",
    "def fibonacci(n):",
    "Translate to French: Good morning!",
    "The three laws of thermodynamics are",
    "Q: What is the boiling point of water at sea level?\nA:",
    "A recipe for pancakes needs",
    "In 1969, the first humans to walk on the Moon were",
    "Why is the sky blue?",
    "Here is a list of things to pack for a camping trip:",
    "The difference between a virus and a bacterium is",
    "Summarise Romeo and Juliet in one sentence.",
    "import numpy as np\n# compute the mean of an array\n",
    "My favourite colour is",
]


@pytest.fixture(scope="module")
def served(default_engine):
    with running_server(default_engine, max_batch_size=16, max_queue=16) as (server, client):
        yield server, client


def test_sixteen_concurrent_streams_equal_their_solo_runs(served, default_engine):
    server, client = served
    lengths = [6 + (index * 5) % 11 for index in range(len(PROMPTS))]  # 6 to 16 new tokens
    chat = [index % 3 == 0 for index in range(len(PROMPTS))]

    def run(index: int):
        prompt = PROMPTS[index]
        if chat[index]:
            return collect(client.stream(messages=[{"role": "user", "content": prompt}],
                                         max_new_tokens=lengths[index]))
        return collect(client.stream(prompt, max_new_tokens=lengths[index]))

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = list(pool.map(run, range(len(PROMPTS))))

    tokenizer = default_engine.tokenizer
    generated = 0
    for index, (ids, text, last) in enumerate(results):
        if chat[index]:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[index]}])
            prompt_ids = tokenizer.encode(rendered, add_special_tokens=False)
        else:
            prompt_ids = tokenizer.encode(PROMPTS[index])
        solo = solo_greedy(default_engine, prompt_ids, lengths[index])
        assert ids == solo.token_ids, f"stream {index} ({PROMPTS[index]!r}) differs from its solo run"
        assert text == solo.text
        assert last.finish_reason != pb.FINISH_REASON_UNSPECIFIED
        generated += len(ids)

    assert client.health() == "SERVING"
    info = client.model_info()
    assert info.active_sequences == 0 and info.queued_requests == 0
    metrics = server.metrics
    finished = {"method": "GenerateStream", "code": "OK"}
    wait_for(lambda: metrics.value("gptserve_requests_total", finished) == len(PROMPTS))
    assert metrics.value("gptserve_generated_tokens_total") == generated
    assert metrics.value("gptserve_time_to_first_token_seconds_count") == len(PROMPTS)
    assert metrics.value("gptserve_inter_token_latency_seconds_count") == generated - len(PROMPTS)
    assert metrics.value("gptserve_active_sequences") == 0 and metrics.value("gptserve_queue_depth") == 0
    # The batch really was shared: some decode steps ran many sequences at once.
    single = metrics.value("gptserve_batch_size_bucket", {"le": "1.0"})
    assert metrics.value("gptserve_batch_size_count") - single > 0
    assert metrics.value("gptserve_batch_size_sum") / metrics.value("gptserve_batch_size_count") > 4
    # Newcomers arriving together were prefilled together (ragged rows), and that changed no result either.
    # (a prompt read in two chunks counts in two passes)
    assert metrics.value("gptserve_prefill_batch_size_sum") >= len(PROMPTS)
    assert metrics.value("gptserve_prefill_batch_size_count") < len(PROMPTS)


def test_a_client_that_stops_reading_is_paused_then_resumed_unchanged(default_engine):
    """The scheduler alone (no gRPC, whose transport buffers hide a slow reader for many kilobytes)."""
    limit = 3
    prompts = [PROMPTS[0], PROMPTS[3]]
    ids = [tuple(default_engine.tokenizer.encode(prompt)) for prompt in prompts]

    async def scenario():
        metrics = Metrics()
        scheduler = Scheduler(default_engine, metrics, max_batch_size=4, max_unread_tokens=limit)
        scheduler.start()
        try:
            request = lambda index: GenerationRequest(str(index), ids[index], SamplingParams(),
                                                      StoppingParams(8, (), True))
            slow, steady = scheduler.submit(request(0)), scheduler.submit(request(1))
            steady_ids = [event.id for events, _ in [item async for item in steady.updates()] for event in events]
            await asyncio.sleep(0.2)  # the steady one has long finished; the slow one is waiting for its reader
            assert slow.paused and slow.produced == limit and scheduler.active_count == 1
            assert metrics.value("gptserve_paused_sequences_total") >= 1
            slow_ids = [event.id for events, _ in [item async for item in slow.updates()] for event in events]
            return slow_ids, steady_ids
        finally:
            scheduler.stop()

    slow_ids, steady_ids = asyncio.run(scenario())
    assert slow_ids == solo_greedy(default_engine, ids[0], 8, ignore_eos=True).token_ids
    assert steady_ids == solo_greedy(default_engine, ids[1], 8, ignore_eos=True).token_ids
