"""Next-token choice on numpy logits: greedy, temperature, top-k, top-p, repetition penalty, seed.

Works on numpy only, so the eager path and the ONNX service share it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = all tokens
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already in prompt or output
    seed: int | None = None

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
        """The logits the choice is made from: repetition penalty applied (as in CTRL and transformers)."""
        logits = logits.astype(np.float32, copy=True)
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
        scaled = logits / params.temperature
        if 0 < params.top_k < len(scaled):
            kth = np.partition(scaled, -params.top_k)[-params.top_k]
            scaled = np.where(scaled < kth, -np.inf, scaled)
        probs = np.exp(scaled - scaled.max())
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
