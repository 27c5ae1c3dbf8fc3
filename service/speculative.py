"""Lossless speculative decoding for a stream that runs alone: a drafter guesses the stream's next tokens, one
forward of the target model reads its last token and the guesses together (Engine.verify), and the stream keeps
the guesses its own sampling confirms.

Why it is exact: at each verified position the sequence takes its token from the target's logits exactly as a plain
decode step would (the same sampler, penalties, constraint and random stream), and a guess counts only when it
equals that token; the first position where they differ gives the stream its token and ends the run. Both drafters
guess deterministically (prompt lookup; a draft model's argmax), so this is the standard acceptance rule with a
one-hot draft distribution q: a guess d is kept with probability min(1, p(d) / q(d)) = p(d), and on rejection the
token follows max(0, p - q) renormalized, which is p without d: what a sample from p that is not d follows. Greedy
output is the target's argmax, token for token; sampled output keeps the target's distribution, and a seeded request
draws the very tokens it draws without speculation.

When: the graph runs several new tokens over a past for a batch of one only, so the scheduler speculates while one
stream runs and decodes plainly when several do (then batching, not guessing, fills each pass over the weights).
How far: each stream drafts the length that promises the most tokens per unit of time, from its own acceptance rate
(recent evidence weighs most, as a copied span ends) and the step costs measured at start-up. A stream whose guesses
fail stops drafting and tries one token every PROBE_STEPS steps, so a workload that gains nothing loses about 1%.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from gptserve.service.errors import ConfigError
from gptserve.service.kv_cache import KVCache

log = logging.getLogger("gptserve.speculative")

MAX_DRAFT_TOKENS = 16  # one verification of 17 tokens costs 1.6 to 2 decode steps on 2 cores
PROBE_STEPS = 16  # plain steps between single-token tries of a stream that stopped drafting
DRAFT_WINDOW = 512  # the stream's last tokens a draft model reads at most (at most half its context)
NGRAM_SIZES = (4, 3, 2)  # prompt lookup matches the longest first; one token alone predicts too little
EVIDENCE_DECAY = 0.8  # per verification: the weight of what earlier ones showed
PRIOR = (1.0, 2.0)  # (accepted, tried): a stream starts by expecting half its guesses to hold
SPECULATIVE_MODES = "off, ngram or draft:DIR (an artifact sharing the model's tokenizer)"


class Drafter(Protocol):
    def propose(self, tokens: list[int], limit: int) -> list[int]:
        """Up to `limit` guesses of the tokens that follow `tokens` (the stream's prompt and output so far)."""
        ...


class PromptLookup:
    """Guesses from the stream's own tokens (prompt and output): what followed the latest earlier occurrence of its
    last n tokens, for the longest n in NGRAM_SIZES that occurred. Summaries, rewrites, code edits and answers from
    a given document copy long spans of their prompt."""

    def __init__(self) -> None:
        self._next: dict[tuple[int, ...], int] = {}  # an n-gram -> the position after its latest occurrence
        self._indexed = 0  # n-grams ending before this position are in _next

    def propose(self, tokens: list[int], limit: int) -> list[int]:
        for end in range(max(self._indexed, 1), len(tokens)):  # every n-gram with a token after it
            for n in NGRAM_SIZES:
                if end >= n:
                    self._next[tuple(tokens[end - n:end])] = end
        self._indexed = len(tokens)
        for n in NGRAM_SIZES:
            start = self._next.get(tuple(tokens[-n:])) if len(tokens) >= n else None
            if start is not None:
                return tokens[start:start + limit]
        return []


class NoGuesses:
    def propose(self, tokens: list[int], limit: int) -> list[int]:
        return []


class DraftModel:
    """Guesses with a smaller or lower-precision model sharing the target's tokenizer: its greedy continuation. It
    keeps a KV cache of the stream's last tokens, which follows the stream: the positions of guesses the target
    rejected are taken back, and the tokens it has not seen are read in the next proposal's first step. It reads
    a window of the stream, not all of it: a guess needs the recent text, and reading a 2500-token prompt whole, at
    the stream's first guess, halved a code edit's decode rate. Past twice the window it starts again from the
    last window's tokens."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.window = min(DRAFT_WINDOW, engine.context_length // 2)
        self._cache: KVCache | None = None
        self._start = 0  # the stream's position of the cache's first token
        self._ids: list[int] = []  # the tokens the cache holds, in order
        self._confirmed = 0  # of them, those known to be the stream's

    def propose(self, tokens: list[int], limit: int) -> list[int]:
        if self._cache is None or len(tokens) - self._start > 2 * self.window:
            self._cache, self._ids, self._confirmed = None, [], 0
            self._start = max(0, len(tokens) - self.window)
        seen = tokens[self._start:]
        limit = min(limit, self.engine.context_length - len(seen) - 1)
        if limit < 1:
            return []
        same = self._confirmed
        while same < min(len(self._ids), len(seen) - 1) and self._ids[same] == seen[same]:
            same += 1
        if self._cache is not None:
            self._cache.rewind(len(self._ids) - same)
        logits, self._cache = self.engine.prefill([seen[same:]], self._cache)
        drafts = [int(logits[0].argmax())]
        while len(drafts) < limit:
            drafts.append(int(self.engine.decode(self._cache, np.array(drafts[-1:]))[0].argmax()))
        self._ids, self._confirmed = [*seen, *drafts[:-1]], len(seen)
        return drafts


@dataclass(frozen=True)
class StepCosts:
    """What verifying k guesses (k + 1 tokens in one forward) and drafting them cost, in plain decode steps."""

    verify_one: float  # a forward of 2 tokens
    verify_each: float  # each further token of a forward
    draft_each: float  # drafting one token

    def of(self, drafts: int) -> float:
        return self.verify_one + (drafts - 1) * self.verify_each + drafts * self.draft_each


class DraftLength:
    """How many tokens one stream drafts next: the length whose expected tokens per unit of time are the most."""

    def __init__(self, costs: StepCosts) -> None:
        self.costs = costs
        self.accepted, self.tried = PRIOR  # decayed counts of guesses kept, and of guesses judged
        self.idle = 0  # plain steps since the stream last drafted

    def next(self, limit: int) -> int:
        """With acceptance rate a per guess, k guesses yield 1 + a + ... + a^k tokens for costs.of(k) steps."""
        rate, expected = self.accepted / self.tried, 1.0
        best, best_value = 0, 1.0  # a plain step: one token for one step
        for drafts in range(1, min(limit, MAX_DRAFT_TOKENS) + 1):
            expected += rate ** drafts
            if (value := expected / self.costs.of(drafts)) > best_value:
                best, best_value = drafts, value
        if best == 0 and limit >= 1:
            self.idle += 1
            if self.idle >= PROBE_STEPS:  # the content may have changed: try one guess
                best = 1
        return best

    def record(self, drafted: int, accepted: int) -> None:
        """A verification kept `accepted` of `drafted` guesses: those, and the first rejected one, were judged."""
        self.idle = 0
        self.accepted = self.accepted * EVIDENCE_DECAY + accepted
        self.tried = self.tried * EVIDENCE_DECAY + accepted + (accepted < drafted)


class Speculator:
    """The scheduler's speculative decoding: a drafter and a draft length per stream, created on its first use and
    forgotten when the stream ends. Only the engine thread uses it."""

    def __init__(self, new_drafter: Callable[[], Drafter], costs: StepCosts, name: str) -> None:
        self.new_drafter, self.costs, self.name = new_drafter, costs, name
        self._streams: dict[Hashable, tuple[Drafter, DraftLength]] = {}
        self.drafted = self.accepted = 0  # guesses verified, and kept, since the start

    def draft(self, stream: Hashable, prompt: Sequence[int], output: list[int], limit: int) -> list[int]:
        """The guesses to verify after the stream's prompt and output (none: decode plainly); at most `limit`. A
        drafter that fails (a draft model's runtime error) is the stream's no more: guesses are optional, the
        stream goes on without."""
        if stream not in self._streams:
            self._streams[stream] = (self.new_drafter(), DraftLength(self.costs))
        drafter, length = self._streams[stream]
        wanted = length.next(limit)
        try:
            return drafter.propose([*prompt, *output], wanted) if wanted else []
        except Exception:
            log.exception("the %s drafter failed; this stream goes on without guesses", self.name)
            self._streams[stream] = (NoGuesses(), length)
            return []

    def record(self, stream: Hashable, drafted: int, accepted: int) -> None:
        self.drafted, self.accepted = self.drafted + drafted, self.accepted + accepted
        if stream in self._streams:  # not when the verification ended the stream
            self._streams[stream][1].record(drafted, accepted)

    def forget(self, stream: Hashable) -> None:
        self._streams.pop(stream, None)


def check_mode(mode: str) -> str | None:
    """What is wrong with a --speculative value, or None."""
    if mode in ("off", "ngram"):
        return None
    if mode.startswith("draft:"):
        folder = mode.removeprefix("draft:")
        if folder and (Path(folder) / "manifest.json").is_file():
            return None
        return f"{mode}: {folder or 'no folder'} is not an artifact folder (no manifest.json)"
    return f"{mode!r}; allowed {SPECULATIVE_MODES}"


def create_speculator(mode: str, engine) -> Speculator | None:
    """The speculator a --speculative value asks for, its costs measured on this machine (about a second); none
    where the model's forward of several tokens does not compute what its one-token steps do."""
    if mode == "off":
        return None
    difference = forward_difference(engine)
    if not difference <= SAME_LOGITS:
        log.warning("speculative decoding is off: this artifact's logits for tokens read together differ from "
                    "those of the same tokens read one by one by %.3g (at most %g would keep its output; int4 and "
                    "int8 round activations to 8 bits, which magnifies the last bits' differences)",
                    difference, SAME_LOGITS)
        return None
    if mode == "ngram":
        speculator = Speculator(PromptLookup, measure_costs(engine), mode)
    else:
        draft = engine.load_beside(Path(mode.removeprefix("draft:")))
        if draft.tokenizer.vocabulary() != engine.tokenizer.vocabulary() or draft.vocab_size > engine.vocab_size:
            raise ConfigError("speculative", f"{mode}: the draft model's tokenizer is not the served model's; a "
                                             "draft must share it")
        speculator = Speculator(lambda: DraftModel(draft), measure_costs(engine, draft),
                                f"draft:{draft.manifest.model.name} ({draft.manifest.precision})")
    costs = speculator.costs
    log.info("speculative decoding: %s while one stream runs; a verification costs %.2f decode steps and %.3f more "
             "a guess, drafting %.3f a guess", speculator.name, costs.verify_one, costs.verify_each, costs.draft_each)
    return speculator


# A verification must give the logits plain decoding would: fp32's forward of 8 canary tokens together is within
# 3.2e-5 of its 8 one-token steps (attention sums in another order); int8's is 0.9 and int4's 1.2 away, enough to
# change greedy tokens: their MatMulNBits round activations to 8 bits, and a difference in the last bits moves a
# value to the next step. (int4 with float activations stays within 4e-5, but decodes 3 times slower.)
SAME_LOGITS = 1e-3


def forward_difference(engine) -> float:
    """Max abs difference between the logits of the start-up canary's greedy tokens read in one forward over its
    prompt and read one decode step at a time (inf without a canary)."""
    canary = engine.manifest.canary
    if canary is None:
        return float("inf")
    tokens = list(canary.greedy_tokens[:8])
    _, cache = engine.prefill([list(canary.prompt_ids)])
    cache.reserve(len(canary.prompt_ids) + len(tokens))
    stepped = np.array([engine.decode(cache, np.array([token]))[0].copy() for token in tokens])  # buffers reused
    cache.rewind(len(tokens))
    return float(np.abs(engine.verify(cache, tokens) - stepped).max())


CALIBRATION_TOKENS = 256  # the past the forwards are timed over
CALIBRATION_ROUNDS = 7


def measure_costs(engine, draft=None) -> StepCosts:
    """Median times of a decode step and of forwards of 2 and MAX_DRAFT_TOKENS + 1 tokens over the same past (taken
    in turn, round after round, so a busy moment weighs on all alike), and of the draft model's decode step: the
    cost model DraftLength weighs guesses with."""
    past = min(CALIBRATION_TOKENS, *(each.context_length - MAX_DRAFT_TOKENS - 1 for each in (engine, draft) if each))
    ids = (np.arange(past) % engine.vocab_size).tolist()
    engines = [engine, engine, engine] + ([draft] if draft is not None else [])
    widths = [1, 2, MAX_DRAFT_TOKENS + 1, 1]
    caches = [each.prefill([ids])[1] for each in engines]
    times: list[list[float]] = [[] for _ in engines]
    for _ in range(CALIBRATION_ROUNDS):
        for each, cache, width, taken in zip(engines, caches, widths, times):
            started = time.perf_counter()
            each.verify(cache, ids[:width])
            taken.append(time.perf_counter() - started)
            cache.rewind(width)
    decode, two, most, *drafting = (float(np.median(taken)) for taken in times)
    return StepCosts(verify_one=two / decode, verify_each=(most - two) / (MAX_DRAFT_TOKENS - 1) / decode,
                     draft_each=drafting[0] / decode if drafting else 0.0)
