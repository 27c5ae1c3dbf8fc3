"""The edge: protobuf requests checked once and turned into plain dataclasses, and results turned back into
protobuf. Nothing past this module sees a protobuf message or an unchecked value; the ranges of sampling and
stopping values are their dataclasses' own, and this module only maps their errors to INVALID_ARGUMENT."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, replace
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from gptserve.model.generation import FinishReason, Sequence, StoppingParams, TokenEvent
from gptserve.model.guidance import Constraint, ConstraintError, Grammar, GrammarCompiler
from gptserve.model.sampling import MAX_TOP_LOGPROBS, ParameterError, SamplingParams
from gptserve.model.tokenizer import CHAT_ROLES, Tokenizer, TokenizerError
from gptserve.service.errors import InvalidRequest, clip
from gptserve.v1 import generation_pb2 as pb

M = TypeVar("M", bound=Message)

MAX_REQUEST_ID_LENGTH = 128


@dataclass(frozen=True)
class Limits:
    """What one request may ask for on this server."""

    context_length: int
    vocab_size: int
    default_max_new_tokens: int
    max_stop_strings: int
    # A text longer than this cannot fit in the context (context_length times the longest token's characters):
    # refused on its length alone, before any time goes into tokenizing it.
    max_prompt_characters: int
    max_n: int = 1  # sequences of one request: each takes a batch slot


@dataclass(frozen=True)
class GenerationRequest:
    """A checked request: every value in range, the prompt already token ids."""

    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    stopping: StoppingParams
    return_logprobs: bool = False
    n: int = 1
    top_logprobs: int = 0


def read_message(kind: type[M], data: bytes) -> M:
    """A request message of type `kind` from its bytes as they came off the wire."""
    try:
        return kind.FromString(data)
    except DecodeError as error:
        raise InvalidRequest("request", f"not a valid {kind.DESCRIPTOR.name} message (malformed protobuf, or a "
                             "string field that is not UTF-8)") from error


def parse_generate_request(message: pb.GenerateRequest, tokenizer: Tokenizer, limits: Limits,
                           grammars: GrammarCompiler) -> GenerationRequest:
    """Cheap checks first: the prompt is tokenized only once everything else is known to be good, and a
    constraint is compiled last (a cache hit when the same constraint came before)."""
    if len(message.request_id) > MAX_REQUEST_ID_LENGTH:
        raise InvalidRequest("request_id", f"{len(message.request_id)} characters; at most {MAX_REQUEST_ID_LENGTH}")
    n = message.n if message.HasField("n") else 1
    if not 1 <= n <= limits.max_n:
        raise InvalidRequest("n", f"{n}; allowed 1 to {limits.max_n} (each sequence takes a batch slot: "
                             "--max-batch-size)")
    if message.top_logprobs > MAX_TOP_LOGPROBS:
        raise InvalidRequest("top_logprobs", f"{message.top_logprobs}; allowed 0 to {MAX_TOP_LOGPROBS}")
    if message.top_logprobs and not message.return_logprobs:
        raise InvalidRequest("top_logprobs", "needs return_logprobs")
    sampling = parse_sampling(message.sampling, limits)
    _check_ids("stopping.stop_token_ids", message.stopping.stop_token_ids, limits)
    constraint = parse_constraint(message)
    prompt_ids, _ = parse_input(message, tokenizer, limits)
    room = limits.context_length - len(prompt_ids)
    if room < 1:
        raise InvalidRequest("input", f"{len(prompt_ids)} prompt tokens; at most {limits.context_length - 1} fit in "
                             f"the context length {limits.context_length} with room for one new token")
    if constraint is not None:
        sampling = replace(sampling, grammar=compile_constraint(constraint, grammars))
    return GenerationRequest(
        request_id=message.request_id or uuid.uuid4().hex[:16],
        prompt_ids=tuple(prompt_ids),
        sampling=sampling,
        stopping=parse_stopping(message.stopping, len(prompt_ids), limits),
        return_logprobs=message.return_logprobs,
        n=n,
        top_logprobs=message.top_logprobs,
    )


def constraint_field(kind: str) -> str:
    """The request field a constraint kind came in."""
    return "choice.choices" if kind == "choice" else kind


def parse_constraint(message: pb.GenerateRequest) -> Constraint | None:
    kind = message.WhichOneof("constraint")
    if kind is None:
        return None
    try:
        if kind == "choice":
            return Constraint(kind, json.dumps(list(message.choice.choices)))
        return Constraint(kind, getattr(message, kind))
    except ConstraintError as error:
        raise InvalidRequest(constraint_field(kind), str(error)) from error


def compile_constraint(constraint: Constraint, grammars: GrammarCompiler) -> Grammar:
    try:
        return grammars.compile(constraint)
    except ConstraintError as error:
        raise InvalidRequest(constraint_field(constraint.kind), f"cannot be compiled: {error}") from error


def parse_input(message: pb.GenerateRequest | pb.TokenizeRequest, tokenizer: Tokenizer,
                limits: Limits) -> tuple[list[int], str | None]:
    """The prompt's token ids, and the text they were encoded from (None for ids sent as ids)."""
    kind = message.WhichOneof("input")
    if kind is None:
        names = " or ".join(field.name for field in message.DESCRIPTOR.oneofs_by_name["input"].fields)
        raise InvalidRequest("input", f"missing; set one of {names}")
    if message.parse_special_tokens and kind != "prompt":
        raise InvalidRequest("parse_special_tokens", f"applies to a prompt only, not to {kind} (chat content is "
                             "always plain text)")
    if kind == "prompt":
        if not message.prompt:
            raise InvalidRequest("prompt", "empty; send at least one character")
        _check_fits("prompt", len(message.prompt), limits)
        return tokenizer.encode(message.prompt, parse_special_tokens=message.parse_special_tokens), message.prompt
    if kind == "messages":
        return encode_chat(message.messages, tokenizer, limits)
    assert isinstance(message, pb.GenerateRequest)  # a TokenizeRequest's input is a prompt or messages only
    ids = list(message.prompt_token_ids.ids)
    if not ids:
        raise InvalidRequest("prompt_token_ids.ids", "empty; send at least one token id")
    _check_ids("prompt_token_ids.ids", ids, limits)
    return ids, None


def _check_ids(field: str, ids, limits: Limits) -> None:
    for index, token in enumerate(ids):
        if not 0 <= token < limits.vocab_size:
            raise InvalidRequest(f"{field}[{index}]", f"{token} is outside the vocabulary; allowed 0 to "
                                 f"{limits.vocab_size - 1}")


def encode_chat(chat: pb.ChatMessages, tokenizer: Tokenizer, limits: Limits) -> tuple[list[int], str]:
    """The chat's token ids (control tokens from the template only) and the prompt the template rendered."""
    messages = chat.messages
    if not messages:
        raise InvalidRequest("messages.messages", "empty; send at least one message")
    for index, chat_message in enumerate(messages):
        if chat_message.role not in CHAT_ROLES:
            raise InvalidRequest(f"messages.messages[{index}].role", f"{clip(chat_message.role)} is not a chat "
                                 f"role; allowed {', '.join(CHAT_ROLES)}")
    # The template only adds text around the contents, so their length alone can already be too much.
    _check_fits("messages", sum(len(chat_message.content) for chat_message in messages), limits)
    turns = [_turn(item, index) for index, item in enumerate(messages)]
    tools = [_tool(tool, index) for index, tool in enumerate(chat.tools)]
    try:
        ids, text = tokenizer.encode_chat(turns, tools=tools)
    except TokenizerError as error:  # no template, a template that refuses this chat, or one that rewrites content
        raise InvalidRequest("messages", str(error)) from error
    # A template that ignores `tools` would let the model answer as if it had none.
    if tools and tokenizer.apply_chat_template(turns) == text:
        raise InvalidRequest("messages.tools", "this model's chat template does not render tools; send them "
                             "without tools, or serve a model whose template does (Qwen2.5, Qwen3, Llama 3.1)")
    return ids, text


def _json_object(field: str, text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidRequest(field, f"not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise InvalidRequest(field, "a JSON object")
    return value


def _turn(message: pb.ChatMessage, index: int) -> dict:
    """A message as chat templates read it (transformers' shape)."""
    turn: dict = {"role": message.role, "content": message.content}
    if message.tool_calls:
        turn["tool_calls"] = [{"id": call.id, "type": "function", "function": {
            "name": call.name, "arguments": _json_object(f"messages.messages[{index}].tool_calls[{number}].arguments",
                                                         call.arguments or "{}")}}
            for number, call in enumerate(message.tool_calls)]
    if message.tool_call_id:
        turn["tool_call_id"] = message.tool_call_id
    return turn


def _tool(tool: pb.Tool, index: int) -> dict:
    if not tool.name:
        raise InvalidRequest(f"messages.tools[{index}].name", "empty; name the function")
    function: dict = {"name": tool.name, "description": tool.description,
                      "parameters": _json_object(f"messages.tools[{index}].parameters", tool.parameters or "{}")}
    return {"type": "function", "function": function}


def _check_fits(field: str, characters: int, limits: Limits) -> None:
    if characters > limits.max_prompt_characters:
        raise InvalidRequest(field, f"{characters} characters; at most {limits.max_prompt_characters} can fit in "
                             f"the context length {limits.context_length}")


def parse_sampling(sampling: pb.SamplingParameters, limits: Limits) -> SamplingParams:
    for token in sampling.logit_bias:
        if not 0 <= token < limits.vocab_size:
            raise InvalidRequest(f"sampling.logit_bias[{token}]", f"token id outside the vocabulary; allowed 0 to "
                                 f"{limits.vocab_size - 1}")
    try:
        return SamplingParams(
            temperature=_optional(sampling, "temperature", 0.0),
            top_k=_optional(sampling, "top_k", 0),
            top_p=_optional(sampling, "top_p", 1.0),
            repetition_penalty=_optional(sampling, "repetition_penalty", 1.0),
            seed=sampling.seed if sampling.HasField("seed") else None,
            min_p=_optional(sampling, "min_p", 0.0),
            presence_penalty=_optional(sampling, "presence_penalty", 0.0),
            frequency_penalty=_optional(sampling, "frequency_penalty", 0.0),
            logit_bias=tuple(sorted(sampling.logit_bias.items())),
        )
    except ParameterError as error:
        raise InvalidRequest(f"sampling.{error.field}", error.problem) from error


def parse_stopping(stopping: pb.StoppingCriteria, prompt_tokens: int, limits: Limits) -> StoppingParams:
    room = limits.context_length - prompt_tokens
    if stopping.HasField("max_new_tokens"):
        max_new_tokens = stopping.max_new_tokens
        if not 1 <= max_new_tokens <= room:
            raise InvalidRequest("stopping.max_new_tokens", f"{max_new_tokens}; allowed 1 to {room} (context length "
                                 f"{limits.context_length} minus {prompt_tokens} prompt tokens)")
    else:
        max_new_tokens = min(limits.default_max_new_tokens, room)
    for name in ("stop", "stop_token_ids"):
        if len(getattr(stopping, name)) > limits.max_stop_strings:
            raise InvalidRequest(f"stopping.{name}", f"{len(getattr(stopping, name))} given; at most "
                                 f"{limits.max_stop_strings} (--max-stop-strings)")
    try:
        return StoppingParams(max_new_tokens, tuple(stopping.stop), stopping.ignore_eos,
                              tuple(stopping.stop_token_ids), stopping.min_tokens,
                              stopping.include_stop_str_in_output)
    except ParameterError as error:
        raise InvalidRequest(f"stopping.{error.field}", error.problem) from error


def _optional(message, name: str, default):
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


def tokens_to_proto(events: list[TokenEvent], request: GenerationRequest, tokenizer: Tokenizer) -> list[pb.Token]:
    if not request.return_logprobs:
        return [pb.Token(id=event.id, text=event.text) for event in events]
    return [pb.Token(id=event.id, text=event.text, logprob=event.logprob,
                     top_logprobs=[pb.TopLogprob(id=token, text=tokenizer.token_text(token), logprob=logprob)
                                   for token, logprob in event.top_logprobs])
            for event in events]


def matched_stop(sequence: Sequence) -> dict:
    """The `matched_stop` oneof of a finished sequence, as keyword arguments (stop_string or stop_token_id)."""
    reason = sequence.stop_reason
    if reason is None:
        return {}
    return {"stop_string": reason} if isinstance(reason, str) else {"stop_token_id": reason}


def usage_to_proto(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> pb.Usage:
    return pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cached_tokens=cached_tokens)
