"""Speculative decoding (service/speculative.py) is lossless: greedy tokens are plain decoding's, token for token,
over many prompts, alone and batched, with either drafter; seeded sampling draws the same tokens; unseeded sampling
keeps the target's distribution (a chi-square test on a tiny model); a failed verification fails only its stream."""

from __future__ import annotations

import asyncio
import math
import threading
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest

from gptserve.export.parity import CANARY_TEXT
from gptserve.model.generation import Sequence, StoppingParams, generate
from gptserve.model.greedy import greedy_tokens
from gptserve.model.sampling import SamplingParams
from gptserve.service import kv_cache
from gptserve.service.api import GenerationRequest
from gptserve.service.client import build_request
from gptserve.service.errors import ConfigError, EngineFailure
from gptserve.service.metrics import Metrics
from gptserve.service.scheduler import Scheduler
from gptserve.service.server import ServerConfig
from gptserve.service.speculative import (
    MAX_DRAFT_TOKENS,
    PROBE_STEPS,
    SAME_LOGITS,
    DraftLength,
    DraftModel,
    PromptLookup,
    Speculator,
    StepCosts,
    forward_difference,
)
from tests.service.support import collect, read_ids, running_server, solo_greedy
from tests.service.test_faults import FaultyEngine

NEW_TOKENS = 40
FREE = StepCosts(verify_one=1.0, verify_each=0.0, draft_each=0.0)  # drafting costs nothing: every step drafts


def test_prompt_lookup_continues_the_latest_occurrence_of_the_longest_match():
    lookup = PromptLookup()
    tokens = [1, 2, 3, 4, 9, 9, 2, 3, 4, 5, 6, 7, 8, 3, 4]
    # [3, 4] last occurred before position 9 (the 4-gram and 3-gram ending here never occurred before)
    assert lookup.propose(tokens, 3) == [5, 6, 7]
    assert lookup.propose([*tokens, 5], 2) == [6, 7]  # now [3, 4, 5] matches, the longest that does
    assert lookup.propose([*tokens, 5, 6, 7, 8, 3, 4, 5, 6, 7, 8], 10) == [3, 4, 5, 6, 7, 8]  # what exists, only
    assert PromptLookup().propose([5, 6, 7, 8], 4) == []  # nothing repeats: no guess


def test_draft_length_follows_the_acceptance_rate_and_probes_after_failures():
    costs = StepCosts(verify_one=1.2, verify_each=0.08, draft_each=0.0)
    length = DraftLength(costs)
    for _ in range(6):
        length.record(MAX_DRAFT_TOKENS, MAX_DRAFT_TOKENS)
    assert length.next(100) == MAX_DRAFT_TOKENS and length.next(3) == 3  # a copy in full flow: as far as allowed
    for _ in range(30):
        length.record(4, 0)
    assert [length.next(100) for _ in range(PROBE_STEPS)] == [0] * (PROBE_STEPS - 1) + [1]
    length.record(1, 0)
    assert length.next(100) == 0  # the probe failed: quiet again
    assert DraftLength(StepCosts(1.2, 0.08, draft_each=2.0)).next(100) == 0  # a draft dearer than it saves


def test_an_fp32_forward_of_several_tokens_gives_the_logits_of_one_token_steps(default_engine):
    assert forward_difference(default_engine) <= SAME_LOGITS


def test_a_speculative_mode_is_checked():
    with pytest.raises(ConfigError, match="speculative: 'sometimes'; allowed off, ngram or draft:DIR"):
        ServerConfig(speculative="sometimes")
    with pytest.raises(ConfigError, match="draft:/nonexistent: /nonexistent is not an artifact folder"):
        ServerConfig(speculative="draft:/nonexistent")


@pytest.fixture(scope="module")
def prompts(default_engine) -> list[list[int]]:
    """Prompts that copy (rewrites, lists, code, answers from a document) and prompts that do not."""
    passage = CANARY_TEXT.read_text()
    source = Path(kv_cache.__file__).read_text()[:1500]
    chats = [f"Rewrite this passage, fixing its spelling:\n\n{passage[:900]}",
             f"Summarize this passage:\n\n{passage[900:1800]}",
             f"Rename `lengths` to `sizes` in this code and return all of it:\n\n{source}",
             f"From the text below, quote the sentence about the letter.\n\n{passage}",
             "List the numbers from 1 to 40, separated by commas.",
             "Write a short story about a dragon who learns to cook.",
             "What is the capital of France?"]
    ids = [default_engine.tokenizer.encode_chat([{"role": "user", "content": chat}])[0] for chat in chats]
    plain = [default_engine.tokenizer.encode(text) for text in (passage[:700], "One, two, three, one, two, three,")]
    return ids + plain


def one_at_a_time(engine, speculator: Speculator, requests, metrics: Metrics | None = None) -> list[tuple]:
    """Each request through a real Scheduler with `speculator`, one after another, so that each runs alone and
    speculates: (its token events, its finish reason) each."""
    async def scenario():
        scheduler = Scheduler(engine, metrics or Metrics(), speculator=speculator)
        scheduler.start()
        try:
            results = []
            for request in requests:
                handle = scheduler.submit(request)
                events = [event async for batch, _ in handle.updates() for event in batch]
                results.append((events, handle.sequence.finish_reason))
            return results
        finally:
            scheduler.stop()

    return asyncio.run(scenario())


def plain(engine, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    return solo_greedy(engine, prompt, new_tokens, ignore_eos=True).token_ids


def generated(client, prompt: list[int], new_tokens: int = NEW_TOKENS, **sampling) -> list[int]:
    request = build_request(prompt_token_ids=prompt, max_new_tokens=new_tokens, ignore_eos=True, **sampling)
    return [token.id for token in client.stub.Generate(request, timeout=120).choices[0].tokens]


def test_greedy_tokens_are_plain_decoding_s_over_many_prompts(default_engine, prompts):
    with running_server(default_engine, speculative="ngram") as (server, client):
        for prompt in prompts:
            assert generated(client, prompt) == plain(default_engine, prompt)
        drafted = server.metrics.value("gptserve_speculative_draft_tokens_total")
        accepted = server.metrics.value("gptserve_speculative_accepted_tokens_total")
        assert accepted > 2 * NEW_TOKENS and 0 < accepted < drafted  # guesses were kept, and some were not
        ratio = server.metrics.value("gptserve_speculative_acceptance_ratio")
        assert ratio == pytest.approx(accepted / drafted)
        assert server.server.servicer.backend.scheduler.speculator._streams == {}  # every stream's drafter is gone


def test_streams_that_join_and_leave_a_speculating_one_equal_their_solo_runs(default_engine, prompts):
    """The first stream speculates alone, three join it (plain batched steps), they end at different lengths, and
    the last one speculates alone again."""
    lengths = [96, 12, 20, 28]
    chosen = [prompts[0], prompts[2], prompts[4], prompts[3]]
    results: dict[int, list[int]] = {}
    with running_server(default_engine, speculative="ngram") as (server, client):
        first = client.stub.GenerateStream(build_request(prompt_token_ids=chosen[0], max_new_tokens=lengths[0],
                                                         ignore_eos=True), timeout=120)
        head = next(first)  # it runs, alone

        def run(index: int) -> None:
            results[index] = generated(client, chosen[index], lengths[index])

        threads = [threading.Thread(target=run, args=(index,)) for index in (1, 2, 3)]
        for thread in threads:
            thread.start()
        rest, _, _ = collect(first)
        for thread in threads:
            thread.join()
        results[0] = [token.id for token in head.tokens] + rest
        assert server.metrics.value("gptserve_speculative_accepted_tokens_total") > 0
        batched = server.metrics.value("gptserve_batch_size_sum") - server.metrics.value("gptserve_batch_size_count")
        assert batched > 0  # some steps did run several streams together
    for index, prompt in enumerate(chosen):
        assert results[index] == plain(default_engine, prompt, lengths[index])


def test_seeded_sampling_draws_the_tokens_it_draws_without_speculation(default_engine, prompts):
    with running_server(default_engine, speculative="ngram") as (server, client):
        for seed in range(4):
            sampling = SamplingParams(temperature=0.7, top_p=0.9, seed=seed)
            plain = generate(default_engine.step, Sequence(default_engine.tokenizer, prompts[0], sampling,
                                                           StoppingParams(NEW_TOKENS, ignore_eos=True)))
            assert generated(client, prompts[0], temperature=0.7, top_p=0.9, seed=seed) == plain.token_ids
        assert server.metrics.value("gptserve_speculative_accepted_tokens_total") > NEW_TOKENS


@pytest.mark.parametrize("draft", ["default_artifact", "tiny_artifact"])
def test_a_draft_artifact_gives_plain_decoding_s_tokens(default_engine, prompts, draft, request):
    """The model drafting for itself (guesses hold) and a tiny random model sharing its tokenizer (they fail)."""
    folder = request.getfixturevalue(draft)
    with running_server(default_engine, speculative=f"draft:{folder}") as (server, client):
        for prompt in prompts[:3]:
            assert generated(client, prompt) == plain(default_engine, prompt)
        assert server.metrics.value("gptserve_speculative_draft_tokens_total") > 0


def chi_square_p_value(statistic: float, degrees: int) -> float:
    """Upper tail of the chi-square distribution (Wilson and Hilferty's cube-root normal approximation)."""
    z = ((statistic / degrees) ** (1 / 3) - (1 - 2 / (9 * degrees))) / math.sqrt(2 / (9 * degrees))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_sampled_tokens_keep_the_target_s_distribution(tiny_engine):
    """The tiny model drafts for itself (its argmax), every step drafting; requests sample 4 tokens from the top 3
    at temperature 1, one at a time (so each speculates). The joint distribution of the 4 tokens over 1500 seeds
    is the target's, exactly computed from its logits: a guess is kept with the probability the target gives it,
    and a rejection draws from the rest."""
    samples, new_tokens, top_k = 1500, 4, 3
    prompt = tuple(tiny_engine.tokenizer.encode("The lighthouse keeper woke before dawn"))
    sampling = lambda seed: SamplingParams(temperature=1.0, top_k=top_k, seed=seed)

    def top(context: tuple[int, ...]) -> dict[int, float]:
        logits = tiny_engine.prefill([list(context)])[0][0].astype(np.float64)
        best = np.argsort(logits)[-top_k:]
        weights = np.exp(logits[best] - logits[best].max())
        return dict(zip(best.tolist(), (weights / weights.sum()).tolist()))

    def joint(context: tuple[int, ...], depth: int) -> dict[tuple[int, ...], float]:
        if depth == 0:
            return {(): 1.0}
        return {(token, *rest): p * q for token, p in top(context).items()
                for rest, q in joint((*context, token), depth - 1).items()}

    metrics = Metrics()
    requests = (GenerationRequest(str(seed), prompt, sampling(seed), StoppingParams(new_tokens, (), True))
                for seed in range(samples))
    results = one_at_a_time(tiny_engine, Speculator(lambda: DraftModel(tiny_engine), FREE, "draft"), requests, metrics)
    counts = Counter(tuple(event.id for event in events) for events, _ in results)
    drafted = metrics.value("gptserve_speculative_draft_tokens_total")
    accepted = metrics.value("gptserve_speculative_accepted_tokens_total")
    assert 0.2 * drafted < accepted < 0.8 * drafted  # both ways of the rule ran often
    expected = joint(prompt, new_tokens)
    assert set(counts) <= set(expected)
    # Cells expected fewer than 5 times are pooled, as a chi-square test needs.
    cells = sorted(expected, key=expected.get, reverse=True)
    big = [cell for cell in cells if expected[cell] * samples >= 5]
    observed = [counts[cell] for cell in big] + [samples - sum(counts[cell] for cell in big)]
    wanted = [expected[cell] * samples for cell in big] + [samples * (1 - sum(expected[cell] for cell in big))]
    statistic = sum((seen - mean) ** 2 / mean for seen, mean in zip(observed, wanted) if mean > 0)
    assert chi_square_p_value(statistic, len(observed) - 1) > 1e-3, (statistic, len(observed))


class FaultyVerify(FaultyEngine):
    fail_verify = False

    def verify(self, cache, token_ids):
        if self.fail_verify:
            raise RuntimeError("injected failure in node /blocks.0/attn/GroupQueryAttention")
        return self.engine.verify(cache, token_ids)


def test_a_failed_verification_fails_only_its_stream(tiny_engine):
    faulty = FaultyVerify(tiny_engine)
    prompt = tuple(tiny_engine.tokenizer.encode("one two three one two three one two three"))
    request = lambda name: GenerationRequest(name, prompt, SamplingParams(), StoppingParams(12, (), True))

    async def scenario():
        speculator = Speculator(lambda: DraftModel(tiny_engine), FREE, "draft")  # every step verifies
        scheduler = Scheduler(faulty, Metrics(), speculator=speculator)
        scheduler.start()
        try:
            faulty.fail_verify = True
            with pytest.raises(EngineFailure):
                await asyncio.wait_for(read_ids(scheduler.submit(request("failing"))), 10)
            faulty.fail_verify = False
            after = await asyncio.wait_for(read_ids(scheduler.submit(request("after"))), 10)
            await asyncio.sleep(0.05)
            return after, scheduler.active_count, scheduler.speculator._streams
        finally:
            scheduler.stop()

    after, active, streams = asyncio.run(scenario())
    assert after == plain(tiny_engine, list(prompt), 12)
    assert active == 0 and streams == {}


def test_a_cancelled_speculating_stream_frees_its_slot(default_engine, prompts):
    with running_server(default_engine, speculative="ngram") as (server, client):
        stream = client.stub.GenerateStream(build_request(prompt_token_ids=prompts[0], max_new_tokens=200,
                                                          ignore_eos=True), timeout=120)
        next(stream)
        stream.cancel()
        with pytest.raises(grpc.RpcError):
            list(stream)
        scheduler = server.server.servicer.backend.scheduler
        for _ in range(200):
            if not scheduler.active_count:
                break
            threading.Event().wait(0.01)
        assert scheduler.active_count == 0 and scheduler.speculator._streams == {}


def test_a_failing_draft_model_leaves_its_stream_to_decode_plainly(tiny_engine, caplog):
    """The draft model's runtime fails (fault injection): the stream goes on without guesses, its tokens unchanged."""
    draft = FaultyVerify(tiny_engine)
    draft.fail_prefill = True
    prompt = tuple(tiny_engine.tokenizer.encode("one two three one two three"))

    request = GenerationRequest("r", prompt, SamplingParams(), StoppingParams(12, (), True))
    [(events, _)] = one_at_a_time(tiny_engine, Speculator(lambda: DraftModel(draft), FREE, "draft"), [request])
    assert [event.id for event in events] == plain(tiny_engine, list(prompt), 12)
    assert "the draft drafter failed" in caplog.text


def test_every_way_of_choosing_a_token_is_plain_decoding_s(default_engine, prompts):
    """Penalties, a logit bias, a stop string, min_tokens, top logprobs, seeded top-k/top-p sampling and a regex
    constraint: each request, drafting at every step, gives the tokens, text, log-probabilities and finish reason
    of the plain generate loop."""
    from gptserve.model.guidance import Constraint, GrammarCompiler

    grammar = GrammarCompiler(default_engine.tokenizer, default_engine.vocab_size).compile(
        Constraint("regex", r"The lighthouse keeper[a-z ,.\n]{10,200}"))
    comma = default_engine.tokenizer.encode(",")[0]
    cases = [(SamplingParams(repetition_penalty=1.2), StoppingParams(NEW_TOKENS, ignore_eos=True)),
             (SamplingParams(presence_penalty=0.5, frequency_penalty=0.3, logit_bias=((comma, -5.0),)),
              StoppingParams(NEW_TOKENS, ignore_eos=True)),
             (SamplingParams(), StoppingParams(NEW_TOKENS, stop=("great lamp",), min_tokens=4)),
             (SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7),
              StoppingParams(NEW_TOKENS, ignore_eos=True)),
             (SamplingParams(grammar=grammar), StoppingParams(NEW_TOKENS))]

    for sampling, stopping in cases:
        speculator = Speculator(PromptLookup, FREE, "ngram")
        request = GenerationRequest("r", tuple(prompts[0]), sampling, stopping, return_logprobs=True, top_logprobs=3)
        [(events, reason)] = one_at_a_time(default_engine, speculator, [request])
        accepted = speculator.accepted
        sequence = Sequence(default_engine.tokenizer, prompts[0], sampling, stopping, top_logprobs=3)
        expected = generate(default_engine.step, sequence)
        assert [event.id for event in events] == expected.token_ids and reason == expected.finish_reason
        assert "".join(event.text for event in events) == expected.text
        np.testing.assert_allclose([event.logprob for event in events], expected.logprobs, atol=1e-4)
        assert accepted > 0  # guesses were kept


def test_a_draft_model_reads_a_window_of_the_stream(tiny_engine):
    """Its cache holds the stream's last tokens only, and starts again from the last window past twice its size;
    its guesses are the model's greedy continuation of that window."""
    drafter = DraftModel(tiny_engine)
    window = drafter.window
    tokens = [(7 * index) % 5000 + 100 for index in range(window + 40)]
    guesses = drafter.propose(tokens, 3)
    assert len(guesses) == 3 and drafter._cache is not None
    assert int(drafter._cache.lengths[0]) == window + 2  # the window, and the guesses fed back in but the last
    expected = greedy_tokens(tiny_engine.step, tokens[-window:], 3)[0].tolist()
    assert guesses == expected
    tokens += [guesses[0], 42]  # the target kept one guess, then chose 42: the cache follows
    assert drafter.propose(tokens, 2) == greedy_tokens(tiny_engine.step, tokens[-window - 2:], 2)[0].tolist()
    longer = tokens + [9] * window  # past twice the window: from the last window again
    assert drafter.propose(longer, 2) == greedy_tokens(tiny_engine.step, longer[-window:], 2)[0].tolist()
    assert int(drafter._cache.lengths[0]) == window + 1
