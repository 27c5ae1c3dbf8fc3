"""Next-token choice on numpy logits: greedy, temperature, top-k, top-p, repetition penalty, seed.

Works on numpy only, so the eager path and the ONNX service share it without torch. The parameters check their own
ranges, so every entry point (gRPC, the command line, a library caller) refuses the same values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 10.0
MAX_SEED = 2**64 - 1  # the request's uint64


class ParameterError(ValueError):
    """A sampling or stopping value out of range: the message names the field, its value as received and what is
    allowed, e.g. "temperature: -5.0; allowed 0 (greedy) to 100"."""

    def __init__(self, field: str, value: float | int | str, allowed: str) -> None:
        # A string is our own phrase about the value ("300 characters"), never the user's value itself.
        super().__init__(f"{field}: {value if isinstance(value, str) else shown(value)}; allowed {allowed}")
        self.field = field


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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


class Sampler:
    """One per sequence: holds the sequence's random generator so a seed reproduces its tokens."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def adjust(self, logits: np.ndarray, seen_ids: np.ndarray) -> np.ndarray:
        """The logits the choice is made from: repetition penalty applied (as in CTRL and transformers).
        In float64: a float32 logit divided by the smallest allowed penalty (about 1e-45) stays finite there."""
        logits = logits.astype(np.float64, copy=True)
        penalty = self.params.repetition_penalty
        if penalty != 1.0 and len(seen_ids):
            seen = np.unique(seen_ids)
            values = logits[seen]
            logits[seen] = np.where(values > 0, values / penalty, values * penalty)
        return logits

    def choose(self, logits: np.ndarray) -> int:
        params = self.params
        if params.greedy:
            return int(np.argmax(logits))
        # The maximum comes off before the division: every scaled logit is then <= 0, and a tiny temperature
        # sends the others to -inf (probability 0) instead of overflowing to inf - inf = NaN.
        scaled = (logits - logits.max()) / params.temperature
        if 0 < params.top_k < len(scaled):
            kth = np.partition(scaled, -params.top_k)[-params.top_k]
            scaled = np.where(scaled < kth, -np.inf, scaled)
        probs = np.exp(scaled)
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

    def __call__(self, logits: np.ndarray, seen_ids: np.ndarray) -> tuple[int, float]:
        """The next token and its log-probability under the (penalised, untempered) distribution."""
        adjusted = self.adjust(logits, seen_ids)
        token = self.choose(adjusted)
        return token, float(log_softmax(adjusted)[token])
