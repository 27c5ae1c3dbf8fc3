"""The plain greedy loop over any step function (the eager model, the engine, a bare session): the certification's
canary, the engine's start-up check of it and the benchmarks all run this one loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from gptserve.model.generation import StepFunction


def greedy_tokens(step: StepFunction, prompt_ids: Sequence[int] | np.ndarray, new_tokens: int,
                  suppress: Sequence[int] = (), on_token: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
    """The argmax continuation, new_tokens long, of each row of prompt_ids ((T,) or (B, T), rows of equal
    length): (B, new_tokens). `suppress`: ids never chosen (EOS, for a run of exactly new_tokens);
    `on_token(ids)` is called with each step's (B,) tokens as soon as they are chosen."""
    input_ids = np.atleast_2d(np.asarray(prompt_ids, dtype=np.int64))  # (B, T)
    attention_mask = np.ones_like(input_ids)  # (B, P+T)
    past, tokens = None, []
    for _ in range(new_tokens):
        logits, past = step(input_ids, attention_mask, past)  # (B, V)
        if len(suppress):
            logits[:, list(suppress)] = -np.inf  # in place: the loop owns a step's logits until its next step
        next_ids = logits.argmax(-1)  # (B,)
        tokens.append(next_ids)
        if on_token:
            on_token(next_ids)
        input_ids = next_ids[:, None].astype(np.int64)  # (B, 1)
        attention_mask = np.ones((input_ids.shape[0], attention_mask.shape[1] + 1), dtype=np.int64)
    return np.stack(tokens, axis=1) if tokens else np.zeros((input_ids.shape[0], 0), dtype=np.int64)
