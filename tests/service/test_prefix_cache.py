"""Prefix caching (service/prefix_cache.py) is exact: a prompt started from cached blocks gives the greedy tokens of
the same prompt read whole, alone and in a batch, for a growing chat history and for a system prompt many requests
share, under a budget that evicts too; usage and the metrics say what was reused."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest

from gptserve.export.parity import CANARY_TEXT
from gptserve.service.bench import free_port
from gptserve.service.client import build_request
from gptserve.service.prefix_cache import BLOCK_TOKENS, PrefixCache
from tests.service.support import running_server, solo_greedy

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def text_ids(default_engine) -> list[int]:
    """About 1500 tokens: the canary text's words in a seeded order (the text itself is 300 tokens)."""
    words = np.random.default_rng(0).choice(CANARY_TEXT.read_text().split(), 1400)
    ids = default_engine.tokenizer.encode(" ".join(words))
    assert len(ids) >= 1200
    return ids


def cacheable(prompt: list[int]) -> int:
    """The positions a fully cached prompt reuses: its whole blocks, short of its last token."""
    return (len(prompt) - 1) // BLOCK_TOKENS * BLOCK_TOKENS


def greedy(client, prompt: list[int], n: int = 1):
    request = build_request(prompt_token_ids=prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    request.n = n
    response = client.stub.Generate(request, timeout=120)
    return [[token.id for token in choice.tokens] for choice in response.choices], response.usage


def test_blocks_are_copies_that_later_writes_never_reach(tiny_engine):
    """A block holds the KV the prefill computed, bit for bit; a cache made from blocks is the engine's to write."""
    prompt = list(range(5, 5 + 3 * BLOCK_TOKENS + 5))
    _, read = tiny_engine.prefill([prompt])
    prefix = PrefixCache(1 << 30)
    prefix.insert([prompt], read)
    assert prefix.tokens == 3 * BLOCK_TOKENS
    expected = [np.array(tensor[:, :, :3 * BLOCK_TOKENS]) for tensor in read.buffers]

    diverging = prompt[:BLOCK_TOKENS + 3] + [1] * 2 * BLOCK_TOKENS
    assert len(prefix.match(diverging)) == 1  # the chain breaks at the first block that differs
    assert len(prefix.match(prompt[:3 * BLOCK_TOKENS])) == 2  # the last token is always read
    blocks = prefix.match(prompt)
    cache = prefix.cache_of(blocks, len(prompt) + 4)
    for tensor, reference in zip(cache.buffers, expected):
        assert np.array_equal(tensor[:, :, :3 * BLOCK_TOKENS], reference)
    tiny_engine.prefill([prompt[3 * BLOCK_TOKENS:]], cache)  # appends in place over the copy
    tiny_engine.decode(cache, np.array([7]))
    for tensor in cache.buffers:
        tensor[...] = 0  # whatever a batch later does to its buffers
    again = prefix.cache_of(prefix.match(prompt), len(prompt))
    for tensor, reference in zip(again.buffers, expected):
        assert np.array_equal(tensor[:, :, :3 * BLOCK_TOKENS], reference)


def test_a_batch_of_prompts_fills_each_row_s_blocks(tiny_engine):
    short, long = list(range(30, 30 + BLOCK_TOKENS + 2)), list(range(90, 90 + 2 * BLOCK_TOKENS + 3))
    _, read = tiny_engine.prefill([short, long])  # ragged: each row's positions first
    prefix = PrefixCache(1 << 30)
    prefix.insert([short, long], read)
    assert prefix.tokens == 3 * BLOCK_TOKENS
    for row, prompt in enumerate((short, long)):
        cached = prefix.cache_of(prefix.match(prompt), len(prompt))
        positions = int(cached.lengths[0])
        assert positions == (len(prompt) - 1) // BLOCK_TOKENS * BLOCK_TOKENS
        for tensor, reference in zip(cached.buffers, read.buffers):
            assert np.array_equal(tensor[0, :, :positions], reference[row, :, :positions])


def test_the_least_recently_used_blocks_go_first_and_the_budget_holds(tiny_engine):
    first, second = list(range(10, 10 + 2 * BLOCK_TOKENS + 1)), list(range(200, 200 + 2 * BLOCK_TOKENS + 1))
    _, read_first = tiny_engine.prefill([first])
    _, read_second = tiny_engine.prefill([second])
    probe = PrefixCache(1 << 30)
    probe.insert([first], read_first)
    block_bytes = probe.nbytes // 2
    prefix = PrefixCache(3 * block_bytes)
    prefix.insert([first], read_first)
    prefix.insert([second], read_second)  # 4 blocks over a budget of 3: the first prompt's last block goes
    assert prefix.nbytes == 3 * block_bytes and prefix.tokens == 3 * BLOCK_TOKENS
    assert (len(prefix.match(first)), len(prefix.match(second))) == (1, 2)
    third = list(range(400, 400 + BLOCK_TOKENS + 1))
    prefix.insert([third], tiny_engine.prefill([third])[1])
    assert len(prefix.match(first)) == 0 and len(prefix.match(second)) == 2  # `first` was the least recent


def test_a_growing_chat_history_gives_the_tokens_of_a_whole_read(default_engine, text_ids):
    """Each turn resends the history with the reply and a new message: it reuses the previous turn's prompt."""
    with running_server(default_engine) as (server, client):
        prompt = text_ids[:150]
        expected_cached = 0
        for turn, message in enumerate((text_ids[150:230], text_ids[230:300], text_ids[300:420])):
            tokens, usage = greedy(client, prompt)
            assert tokens == [solo_greedy(default_engine, prompt, NEW_TOKENS, ignore_eos=True).token_ids], turn
            assert (usage.prompt_tokens, usage.cached_tokens) == (len(prompt), expected_cached)
            expected_cached = len(prompt) // BLOCK_TOKENS * BLOCK_TOKENS  # the blocks this prompt filled
            prompt = prompt + tokens[0] + message
        metrics = server.metrics
        assert metrics.value("gptserve_prefix_cache_hits_total") > 0
        assert metrics.value("gptserve_prefix_cache_tokens") > 0 and metrics.value("gptserve_prefix_cache_bytes") > 0
        assert 0 < metrics.value("gptserve_prefix_cache_hit_ratio") < 1


def test_a_shared_system_prompt_gives_each_batched_request_its_solo_tokens(default_engine, text_ids):
    """Requests sharing a 300-token prefix, arriving together: each starts from the cached prefix and is read
    while the others decode; one asks for n=2, whose sequences share its prompt's cache."""
    system = text_ids[:300]
    prompts = [system + text_ids[400 + 20 * user:400 + 20 * user + 5 + 3 * user] for user in range(6)]
    with running_server(default_engine) as (_server, client):
        greedy(client, system + text_ids[900:910])  # the first user fills the cache
        results: dict[int, tuple] = {}

        def ask(user: int) -> None:
            results[user] = greedy(client, prompts[user], n=2 if user == 3 else 1)

        threads = [threading.Thread(target=ask, args=(user,)) for user in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for user, prompt in enumerate(prompts):
        tokens, usage = results[user]
        solo = solo_greedy(default_engine, prompt, NEW_TOKENS, ignore_eos=True).token_ids
        assert tokens == [solo] * (2 if user == 3 else 1), user
        assert usage.cached_tokens == len(system) // BLOCK_TOKENS * BLOCK_TOKENS


def test_off_reuses_nothing_and_a_tiny_budget_stays_exact(default_engine, text_ids):
    prompts = [text_ids[start:start + 100] for start in (0, 500, 0, 1000, 500)]
    with running_server(default_engine, prefix_cache_mb=0) as (server, client):
        assert [greedy(client, prompt)[1].cached_tokens for prompt in prompts] == [0] * len(prompts)
        assert server.metrics.value("gptserve_prefix_cache_bytes") == 0
    with running_server(default_engine, prefix_cache_mb=4) as (server, client):  # five blocks of this model
        for prompt in prompts:
            tokens, _usage = greedy(client, prompt)
            assert tokens == [solo_greedy(default_engine, prompt, NEW_TOKENS, ignore_eos=True).token_ids]
            assert 0 < server.metrics.value("gptserve_prefix_cache_bytes") <= 4 << 20
        assert server.metrics.value("gptserve_prefix_cache_hits_total") == 0  # each prompt evicted the one before
        tokens, usage = greedy(client, prompts[-1])
        assert usage.cached_tokens == 5 * BLOCK_TOKENS  # what fits: the last prompt's first five blocks


def test_http_usage_reports_cached_tokens(default_engine, text_ids):
    prompt = text_ids[:200]
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0,
            "ignore_eos": True}
    with running_server(default_engine, http_port=free_port()) as (server, _client):
        url = f"http://127.0.0.1:{server.http_port}/v1/completions"
        first, second = (httpx.post(url, json=body, timeout=60).json() for _ in range(2))
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": cacheable(prompt)}
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
