"""Next-token choice on numpy logits: greedy, temperature, top-k, top-p, repetition penalty, seed.

Works on numpy only, so the eager path and the ONNX service share it without torch. The parameters check their own
ranges, so every entry point (gRPC, the command line, a library caller) refuses the same values.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from gptserve.model.guidance import Grammar

MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 10.0
MAX_SEED = 2**64 - 1  # the request's uint64
MAX_PENALTY = 2.0  # presence and frequency, as OpenAI allows
MAX_LOGIT_BIAS = 100.0
MAX_TOP_LOGPROBS = 20


class ParameterError(ValueError):
    """A sampling or stopping value out of range: the message names the field, its value as received and what is
    allowed, e.g. "temperature: -5.0; allowed 0 (greedy) to 100"."""

    def __init__(self, field: str, value: float | int | str, allowed: str) -> None:
        # A string is our own phrase about the value ("300 characters"), never the user's value itself.
        self.field = field
        self.problem = f"{value if isinstance(value, str) else shown(value)}; allowed {allowed}"
        super().__init__(f"{field}: {self.problem}")


def shown(value: float | int) -> str:
    """A number as its sender wrote it. A request's float fields are float32, so 100.0001 arrives as
    100.00009918212891: a value that is exactly a float32 is printed as the shortest float32 that reads back."""
    if isinstance(value, float) and math.isfinite(value) and float(np.float32(value)) == value:
        return repr(float(str(np.float32(value))))
    return repr(value)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = all tokens
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already in prompt or output
    seed: int | None = None
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one; 0 = off
    # OpenAI's: subtracted from the logit of every token already in the output, once (presence) or per
    # occurrence (frequency); 0 = off.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit); ids checked by the edge
    grammar: Grammar | None = None  # the output must match it (model/guidance.py); compiled by the edge

    def __post_init__(self) -> None:
        # Each test is written so that NaN fails it too.
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise ParameterError("temperature", self.temperature, f"0 (greedy) to {MAX_TEMPERATURE:g}")
        if not self.top_k >= 0:
            raise ParameterError("top_k", self.top_k, "0 (no cut) or more")
        if not 0.0 < self.top_p <= 1.0:
            raise ParameterError("top_p", self.top_p, "(0, 1]")
        if not 0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ParameterError("repetition_penalty", self.repetition_penalty,
                                 f"(0, {MAX_REPETITION_PENALTY:g}], 1 = off")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ParameterError("seed", self.seed, f"0 to {MAX_SEED}, or none for a fresh one")
        if not 0.0 <= self.min_p <= 1.0:
            raise ParameterError("min_p", self.min_p, "0 (off) to 1")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise ParameterError(name, getattr(self, name), f"-{MAX_PENALTY:g} to {MAX_PENALTY:g}, 0 = off")
        for token, bias in self.logit_bias:
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ParameterError(f"logit_bias[{token}]", bias, f"-{MAX_LOGIT_BIAS:g} to {MAX_LOGIT_BIAS:g}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


class Sampler:
    """One per sequence: holds the sequence's random generator so a seed reproduces its tokens. `stream` tells
    apart the sequences of one request (n > 1): the first draws exactly what a lone request with the seed draws."""

    def __init__(self, params: SamplingParams, stream: int = 0) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed if params.seed is None or not stream else [params.seed, stream])
        self._bias_ids = np.array([token for token, _ in params.logit_bias], dtype=np.int64)
        self._bias = np.array([bias for _, bias in params.logit_bias], dtype=np.float64)

    def adjust(self, logits: np.ndarray, seen_ids: Collection[int], output_counts: dict[int, int] | None = None,
               banned: tuple[int, ...] = (), allowed: np.ndarray | None = None) -> np.ndarray:
        """The logits the choice is made from: repetition penalty (as in CTRL and transformers) over prompt and
        output, presence and frequency penalties (as OpenAI) over the output, logit bias, `banned` ids (-inf) and
        ids outside `allowed` ([V] bool, a grammar's mask; -inf). In float64: a float32 logit divided by the
        smallest allowed penalty (about 1e-45) stays finite. Logits nothing applies to come back as they are (no
        copy): the log-softmax of float32 logits costs a fifteenth of float64's, a few percent of a batch's step."""
        params = self.params
        repeated = params.repetition_penalty != 1.0 and len(seen_ids)
        counted = output_counts and (params.presence_penalty or params.frequency_penalty)
        if not (repeated or counted or len(self._bias_ids) or banned or allowed is not None):
            return logits.astype(np.float32, copy=False)
        logits = logits.astype(np.float64, copy=True)
        if repeated:
            seen = np.unique(np.fromiter(seen_ids, dtype=np.int64))
            values = logits[seen]
            logits[seen] = np.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
        if counted:
            assert output_counts is not None  # counted says so
            ids = np.fromiter(output_counts, dtype=np.int64, count=len(output_counts))
            counts = np.fromiter(output_counts.values(), dtype=np.float64, count=len(output_counts))
            logits[ids] -= params.presence_penalty + params.frequency_penalty * counts
        if len(self._bias_ids):
            logits[self._bias_ids] += self._bias
        if banned:
            logits[list(banned)] = -np.inf
        if allowed is not None:
            logits[~allowed] = -np.inf
        return logits

    def choose(self, logits: np.ndarray) -> int:
        params = self.params
        if params.greedy:
            return int(np.argmax(logits))
        # The maximum comes off before the division: every scaled logit is then <= 0, and a tiny temperature
        # sends the others to -inf (probability 0) instead of overflowing to inf - inf = NaN.
        scaled = (logits.astype(np.float64) - logits.max()) / params.temperature
        if 0 < params.top_k < len(scaled):
            kth = np.partition(scaled, -params.top_k)[-params.top_k]
            scaled = np.where(scaled < kth, -np.inf, scaled)
        probs = np.exp(scaled)
        if params.min_p > 0.0:  # the most likely token has probability proportional to exp(0) = 1
            probs = np.where(probs < params.min_p, 0.0, probs)
        probs /= probs.sum()
        if params.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            # Keep the smallest prefix whose mass reaches top_p (always at least the most likely token).
            keep = order[: int(np.searchsorted(cumulative, params.top_p)) + 1]
            kept = np.zeros_like(probs)
            kept[keep] = probs[keep]
            probs = kept / kept.sum()
        return int(self.rng.choice(len(probs), p=probs))

    def __call__(self, logits: np.ndarray, seen_ids: Collection[int], output_counts: dict[int, int] | None = None,
                 banned: tuple[int, ...] = (), top: int = 0,
                 allowed: np.ndarray | None = None,
                 with_logprobs: bool = True) -> tuple[int, float, tuple[tuple[int, float], ...]]:
        """The next token, its log-probability under the adjusted (penalised, biased, masked, untempered)
        distribution, and the `top` most likely tokens with theirs; without logprobs, NaN and none."""
        adjusted = self.adjust(logits, seen_ids, output_counts, banned, allowed)
        token = self.choose(adjusted)
        if not with_logprobs:
            return token, float("nan"), ()
        logprobs = log_softmax(adjusted)
        return token, float(logprobs[token]), top_logprobs(logprobs, top)


def top_logprobs(logprobs: np.ndarray, top: int) -> tuple[tuple[int, float], ...]:
    """The `top` most likely (token id, log-probability) pairs, most likely first; fewer where fewer tokens are
    possible at all (a grammar's mask), since -inf has no JSON spelling."""
    top = min(top, len(logprobs))
    if top <= 0:
        return ()
    best = np.argpartition(-logprobs, top - 1)[:top]
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return tuple((int(token), float(logprobs[token])) for token in best if logprobs[token] > -np.inf)
