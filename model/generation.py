"""Generation without torch: per-sequence state (sampling, stopping, streaming text) and a generate loop
over any step function, so the eager model and the ONNX engine run the very same logic."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gptserve.model.detokenizer import IncrementalDetokenizer
from gptserve.model.sampling import ParameterError, Sampler, SamplingParams
from gptserve.model.tokenizer import Tokenizer


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"


MAX_STOP_LENGTH = 256  # characters of one stop string


@dataclass(frozen=True)
class StoppingParams:
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()  # end the output like EOS does (even with ignore_eos); ids checked by the edge
    min_tokens: int = 0  # EOS and stop_token_ids cannot be chosen before this many tokens
    include_stop_str_in_output: bool = False  # a matched stop string ends the text instead of being withheld

    def __post_init__(self) -> None:
        if not self.max_new_tokens >= 1:
            raise ParameterError("max_new_tokens", self.max_new_tokens, "1 or more")
        for index, stop in enumerate(self.stop):
            if not 1 <= len(stop) <= MAX_STOP_LENGTH:
                raise ParameterError(f"stop[{index}]", f"{len(stop)} characters", f"1 to {MAX_STOP_LENGTH}")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ParameterError("min_tokens", self.min_tokens, f"0 to max_new_tokens ({self.max_new_tokens})")


@dataclass(frozen=True)
class TokenEvent:
    id: int
    text: str  # the text this token releases; "" while it may still begin a stop string
    logprob: float  # NaN for a sequence made without them (with_logprobs False)
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (id, logprob) of the most likely tokens, when asked for


class StopStringFilter:
    """Holds back text that might be the start of a stop string, so a stop string never reaches the client,
    even when it spans several tokens."""

    def __init__(self, stops: tuple[str, ...], include_stop: bool = False) -> None:
        self.stops = tuple(stop for stop in stops if stop)
        self.include_stop = include_stop
        self.pending = ""
        self.matched: str | None = None

    def feed(self, text: str) -> tuple[str, bool]:
        """The text safe to release now, and whether a stop string was found (text after it is dropped; the
        stop string itself too, unless include_stop). The earliest match wins."""
        if not self.stops:
            return text, False
        buffer = self.pending + text
        hits = [(index, stop) for stop in self.stops if (index := buffer.find(stop)) >= 0]
        if hits:
            index, self.matched = min(hits, key=lambda hit: hit[0])
            self.pending = ""
            return buffer[: index + len(self.matched) if self.include_stop else index], True
        held = max((size for stop in self.stops for size in range(1, len(stop))
                    if buffer.endswith(stop[:size])), default=0)
        self.pending = buffer[len(buffer) - held:]
        return buffer[: len(buffer) - held], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


@dataclass
class Sequence:
    """One request's generation state: it turns each step's logits into a token and the text it releases."""

    tokenizer: Tokenizer
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stopping: StoppingParams = field(default_factory=StoppingParams)
    finish_reason: FinishReason | None = None
    index: int = 0  # which of a request's n sequences (its own random stream)
    top_logprobs: int = 0  # most likely alternatives reported with each token
    # Each token's log-probability costs a log-softmax over the vocabulary, more than the greedy choice itself:
    # the server skips it for a request that does not return them.
    with_logprobs: bool = True

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.sampling, self.index)
        self.guide = self.sampling.grammar.guide() if self.sampling.grammar else None
        self.detokenizer = IncrementalDetokenizer(self.tokenizer)
        self.stop_filter = StopStringFilter(self.stopping.stop, self.stopping.include_stop_str_in_output)
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.text = ""
        self.eos_ids = set() if self.stopping.ignore_eos else set(self.tokenizer.eos_token_ids)
        self.stop_ids = set(self.stopping.stop_token_ids) - self.eos_ids
        self._ending_ids = tuple(sorted(self.eos_ids | self.stop_ids))  # banned until min_tokens
        # A grammar may end on EOS; ignore_eos keeps it going instead, where the grammar lets it.
        self._never = tuple(self.tokenizer.eos_token_ids) if self.guide and self.stopping.ignore_eos else ()
        # Prompt and output ids, for the repetition penalty; output counts for presence and frequency penalties.
        self._seen = set(self.prompt_ids)
        self._counts: dict[int, int] = {}

    @property
    def stop_reason(self) -> str | int | None:
        """What ended a STOP: the stop string matched, or the stop token id; None for a completed grammar."""
        if self.finish_reason is not FinishReason.STOP:
            return None
        if self.stop_filter.matched is not None:
            return self.stop_filter.matched
        return None if self.grammar_complete else self.token_ids[-1]

    @property
    def grammar_complete(self) -> bool:
        return self.guide is not None and self.guide.complete

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _release_rest(self) -> str:
        """At the end: text the detokenizer or the stop filter still holds, unless it completes a stop."""
        text, stopped = self.stop_filter.feed(self.detokenizer.flush())
        if stopped:
            self.finish_reason = FinishReason.STOP
            return text
        return text + self.stop_filter.flush()

    def step(self, logits: np.ndarray) -> TokenEvent:
        """Take the next token from its logits ([V], for the last position)."""
        assert not self.finished, "step() on a finished sequence"
        banned = (self._ending_ids if len(self.token_ids) < self.stopping.min_tokens else ()) + self._never
        allowed = self.guide.allowed(len(logits)) if self.guide else None
        token, logprob, alternatives = self.sampler(logits, self._seen, self._counts, banned, self.top_logprobs,
                                                    allowed, self.with_logprobs)
        self.token_ids.append(token)
        self.logprobs.append(logprob)
        self._seen.add(token)
        self._counts[token] = self._counts.get(token, 0) + 1
        if token in self.eos_ids or token in self.stop_ids:
            self.finish_reason = FinishReason.EOS if token in self.eos_ids else FinishReason.STOP
            text = self._release_rest()
        else:
            if self.guide:
                self.guide.advance(token)
            text, stopped = self.stop_filter.feed(self.detokenizer.push(token))
            if not stopped and self.grammar_complete:  # nothing but the end may follow
                self.finish_reason = FinishReason.STOP
                text += self._release_rest()
            elif not stopped and len(self.token_ids) >= self.stopping.max_new_tokens:
                self.finish_reason = FinishReason.LENGTH
                text += self._release_rest()
            elif stopped:
                self.finish_reason = FinishReason.STOP
        self.text += text
        return TokenEvent(token, text, logprob, alternatives)


@dataclass(frozen=True)
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    logprobs: list[float]

    def to_json(self) -> dict:
        return {"token_ids": self.token_ids, "text": self.text, "finish_reason": self.finish_reason.value,
                "prompt_tokens": self.prompt_tokens}


# (input_ids [B, T], attention_mask [B, P+T], past or None) -> (last-position logits [B, V], present)
StepFunction = Callable[[np.ndarray, np.ndarray, Any], tuple[np.ndarray, Any]]


def generate(
    step: StepFunction,
    sequence: Sequence,
    on_token: Callable[[TokenEvent], None] | None = None,
) -> GenerationResult:
    """Runs one sequence to its end with the KV cache: a prefill of the prompt, then one token per step."""
    input_ids = np.array([sequence.prompt_ids], dtype=np.int64)  # (1, T)
    attention_mask = np.ones_like(input_ids)  # (1, P+T)
    past = None
    while not sequence.finished:
        logits, past = step(input_ids, attention_mask, past)
        event = sequence.step(logits[0])
        if on_token:
            on_token(event)
        input_ids = np.array([[event.id]], dtype=np.int64)
        attention_mask = np.ones((1, attention_mask.shape[1] + 1), dtype=np.int64)
    assert sequence.finish_reason is not None  # the loop ran until the sequence finished
    return GenerationResult(sequence.token_ids, sequence.text, sequence.finish_reason,
                            len(sequence.prompt_ids), sequence.logprobs)
