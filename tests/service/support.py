"""Helpers of the service tests: a real server on 127.0.0.1 (ephemeral port) with a real client, and references."""

from __future__ import annotations

import contextlib
import time

from gptserve.model.generation import GenerationResult, Sequence, StoppingParams, generate
from gptserve.model.sampling import SamplingParams
from gptserve.service.client import GenerationClient
from gptserve.service.server import BackgroundServer, ServerConfig


@contextlib.contextmanager
def running_server(engine, client_token: str | None = None, **settings):
    """A server on its own event-loop thread, serving an already loaded engine; yields (server, client)."""
    config = ServerConfig(**{"host": "127.0.0.1", "port": 0, "http_port": 0, **settings})
    server = BackgroundServer(config, lambda: engine).start()
    try:
        with GenerationClient(f"127.0.0.1:{server.port}", token=client_token, timeout=120) as client:
            yield server, client
    finally:
        server.stop(grace=0)


def solo_greedy(engine, prompt_ids, max_new_tokens: int, stop=(), ignore_eos: bool = False) -> GenerationResult:
    """The reference: one sequence alone through the engine's plain generate loop."""
    sequence = Sequence(engine.tokenizer, list(prompt_ids), SamplingParams(),
                        StoppingParams(max_new_tokens, tuple(stop), ignore_eos))
    return generate(engine.step, sequence)


def collect(responses) -> tuple[list[int], str, object]:
    """A stream's token ids, its joined text, and its last message."""
    ids, text, last = [], "", None
    for last in responses:
        ids += [token.id for token in last.tokens]
        text += "".join(token.text for token in last.tokens)
    return ids, text, last


async def read_ids(handle) -> list[int]:
    """Every token id of a scheduler request's updates, read as they come; raises the request's failure."""
    return [event.id async for events, _ in handle.updates() for event in events]


def wait_for(condition, timeout: float = 10.0, interval: float = 0.01) -> float:
    """Polls until `condition()` is true; the seconds it took. Fails the test on timeout."""
    started = time.perf_counter()
    while not condition():
        if time.perf_counter() - started > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
    return time.perf_counter() - started
