"""The edge: protobuf requests checked once and turned into plain dataclasses, and results turned back into
protobuf. Nothing past this module sees a protobuf message or an unchecked value."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from gptserve.v1 import generation_pb2 as pb
from gptserve.model.generation import FinishReason, StoppingParams, TokenEvent
from gptserve.model.sampling import SamplingParams
from gptserve.model.tokenizer import CHAT_ROLES, Tokenizer, TokenizerError
from gptserve.service.errors import InvalidRequest

MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 10.0
MAX_STOP_LENGTH = 256  # characters of one stop string
MAX_REQUEST_ID_LENGTH = 128


@dataclass(frozen=True)
class Limits:
    """What one request may ask for on this server."""

    context_length: int
    vocab_size: int
    default_max_new_tokens: int = 256
    max_stop_strings: int = 16


@dataclass(frozen=True)
class GenerationRequest:
    """A checked request: every value in range, the prompt already token ids."""

    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    stopping: StoppingParams
    return_logprobs: bool = False


def parse_generate_request(message: pb.GenerateRequest, tokenizer: Tokenizer, limits: Limits) -> GenerationRequest:
    if len(message.request_id) > MAX_REQUEST_ID_LENGTH:
        raise InvalidRequest(f"request_id: {len(message.request_id)} characters; at most {MAX_REQUEST_ID_LENGTH}")
    prompt_ids, _ = parse_input(message, tokenizer, limits.vocab_size)
    room = limits.context_length - len(prompt_ids)
    if room < 1:
        raise InvalidRequest(f"input: {len(prompt_ids)} prompt tokens; at most {limits.context_length - 1} fit in the "
                             f"context length {limits.context_length} with room for one new token")
    return GenerationRequest(
        request_id=message.request_id or uuid.uuid4().hex[:16],
        prompt_ids=tuple(prompt_ids),
        sampling=parse_sampling(message.sampling),
        stopping=parse_stopping(message.stopping, len(prompt_ids), limits),
        return_logprobs=message.return_logprobs,
    )


def parse_input(message: pb.GenerateRequest | pb.TokenizeRequest, tokenizer: Tokenizer,
                vocab_size: int) -> tuple[list[int], str | None]:
    """The prompt's token ids, and the text they were encoded from (None for ids sent as ids)."""
    kind = message.WhichOneof("input")
    if kind is None:
        names = " or ".join(field.name for field in message.DESCRIPTOR.oneofs_by_name["input"].fields)
        raise InvalidRequest(f"input: missing; set one of {names}")
    if kind == "prompt":
        if not message.prompt:
            raise InvalidRequest("prompt: empty; send at least one character")
        return tokenizer.encode(message.prompt), message.prompt
    if kind == "messages":
        text = render_chat(message.messages.messages, tokenizer)
        # The template writes the special tokens itself (as transformers' apply_chat_template does).
        return tokenizer.encode(text, add_special_tokens=False), text
    ids = list(message.prompt_token_ids.ids)
    if not ids:
        raise InvalidRequest("prompt_token_ids.ids: empty; send at least one token id")
    outside = [(index, token) for index, token in enumerate(ids) if not 0 <= token < vocab_size]
    if outside:
        index, token = outside[0]
        raise InvalidRequest(f"prompt_token_ids.ids[{index}]: {token} is outside the vocabulary; "
                             f"allowed 0 to {vocab_size - 1}")
    return ids, None


def render_chat(messages, tokenizer: Tokenizer) -> str:
    if not messages:
        raise InvalidRequest("messages.messages: empty; send at least one message")
    for index, chat_message in enumerate(messages):
        if chat_message.role not in CHAT_ROLES:
            raise InvalidRequest(f"messages.messages[{index}].role: {chat_message.role!r} is not a chat role; "
                                 f"allowed {', '.join(CHAT_ROLES)}")
    try:
        return tokenizer.apply_chat_template([{"role": item.role, "content": item.content} for item in messages])
    except TokenizerError as error:  # no template, or the template itself refuses this chat
        raise InvalidRequest(f"messages: {error}") from error


def parse_sampling(sampling: pb.SamplingParameters) -> SamplingParams:
    temperature = _optional(sampling, "temperature", 0.0)
    if not 0.0 <= temperature <= MAX_TEMPERATURE:  # also refuses NaN
        raise InvalidRequest(f"sampling.temperature: {temperature:.6g}; allowed 0 (greedy) to {MAX_TEMPERATURE:g}")
    top_k = _optional(sampling, "top_k", 0)
    if top_k < 0:
        raise InvalidRequest(f"sampling.top_k: {top_k}; allowed 0 (no cut) or more")
    top_p = _optional(sampling, "top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise InvalidRequest(f"sampling.top_p: {top_p:.6g}; allowed (0, 1]")
    penalty = _optional(sampling, "repetition_penalty", 1.0)
    if not 0.0 < penalty <= MAX_REPETITION_PENALTY:
        raise InvalidRequest(f"sampling.repetition_penalty: {penalty:.6g}; allowed (0, {MAX_REPETITION_PENALTY:g}], 1 = off")
    seed = sampling.seed if sampling.HasField("seed") else None
    return SamplingParams(float(temperature), int(top_k), float(top_p), float(penalty), seed)


def parse_stopping(stopping: pb.StoppingCriteria, prompt_tokens: int, limits: Limits) -> StoppingParams:
    room = limits.context_length - prompt_tokens
    if stopping.HasField("max_new_tokens"):
        max_new_tokens = stopping.max_new_tokens
        if not 1 <= max_new_tokens <= room:
            raise InvalidRequest(f"stopping.max_new_tokens: {max_new_tokens}; allowed 1 to {room} (context length "
                                 f"{limits.context_length} minus {prompt_tokens} prompt tokens)")
    else:
        max_new_tokens = min(limits.default_max_new_tokens, room)
    stops = list(stopping.stop)
    if len(stops) > limits.max_stop_strings:
        raise InvalidRequest(f"stopping.stop: {len(stops)} strings; at most {limits.max_stop_strings}")
    for index, stop in enumerate(stops):
        if not 1 <= len(stop) <= MAX_STOP_LENGTH:
            raise InvalidRequest(f"stopping.stop[{index}]: {len(stop)} characters; allowed 1 to {MAX_STOP_LENGTH}")
    return StoppingParams(max_new_tokens, tuple(stops), stopping.ignore_eos)


def _optional(message, name: str, default):
    # Every range check above is written so that NaN and infinities fail it too.
    return getattr(message, name) if message.HasField(name) else default


# Results back to protobuf ------------------------------------------------------------------------------------

FINISH_REASONS = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
}


@dataclass(frozen=True)
class Timings:
    """Seconds from the server receiving the request."""

    queue: float
    time_to_first_token: float
    total: float

    def to_proto(self) -> pb.Timings:
        return pb.Timings(time_to_first_token_seconds=self.time_to_first_token, total_seconds=self.total,
                          queue_seconds=self.queue)


def tokens_to_proto(events: list[TokenEvent], return_logprobs: bool) -> list[pb.Token]:
    if return_logprobs:
        return [pb.Token(id=event.id, text=event.text, logprob=event.logprob) for event in events]
    return [pb.Token(id=event.id, text=event.text) for event in events]


def usage_to_proto(prompt_tokens: int, completion_tokens: int) -> pb.Usage:
    return pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
