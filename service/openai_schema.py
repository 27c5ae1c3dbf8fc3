"""The OpenAI API's request bodies (and vLLM's extra fields under their names), as pydantic models.

pydantic checks only types here; values are checked once, by the gRPC edge's rules (service/api.py), after
`fill` has written a body into the GenerateRequest it means. Fields OpenAI documents that this server cannot honour
yet are refused by name rather than ignored; any other unknown field is ignored, as OpenAI's own API does.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from gptserve.service.errors import InvalidRequest
from gptserve.service.tools import call_grammar
from gptserve.v1 import generation_pb2 as pb


def _encodable(text: str) -> str:
    """JSON may spell a lone surrogate ("\\ud800"); no UTF-8 string, and no protobuf field, can hold one."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode (a lone surrogate)") from None
    return text


Text = Annotated[StrictStr, AfterValidator(_encodable)]
Number = StrictInt | StrictFloat
UNSUPPORTED = ("functions", "function_call", "best_of", "suffix", "prompt_logprobs")


class ContentPart(BaseModel):
    type: str
    text: Text | None = None


class FunctionCall(BaseModel):
    name: Text
    arguments: Text  # a JSON object, as text


class ToolCallMessage(BaseModel):
    id: Text = ""
    type: Text = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Text
    content: Text | list[ContentPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCallMessage] | None = None
    tool_call_id: Text | None = None

    def text(self, index: int) -> str:
        """The content as one string: text parts joined by newlines."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for number, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise InvalidRequest(f"messages[{index}].content[{number}]", f"a {part.type[:32]!r} part; this "
                                     "model reads text parts only")
        return "\n".join(part.text or "" for part in self.content)


class Function(BaseModel):
    name: Text
    description: Text = ""
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    type: Text = "function"
    function: Function


class NamedFunction(BaseModel):
    name: Text


class NamedToolChoice(BaseModel):
    type: Text = "function"
    function: NamedFunction


def chat_messages(messages: list[ChatMessage], tools: list[Tool] | None = None) -> pb.ChatMessages:
    return pb.ChatMessages(
        messages=[pb.ChatMessage(role=item.role, content=item.text(index), tool_call_id=item.tool_call_id or "",
                                 tool_calls=[pb.ToolCall(id=call.id, name=call.function.name,
                                                         arguments=call.function.arguments)
                                             for call in item.tool_calls or []])
                  for index, item in enumerate(messages)],
        tools=[pb.Tool(name=tool.function.name, description=tool.function.description,
                       parameters=json.dumps(tool.function.parameters) if tool.function.parameters else "")
               for tool in tools or []])


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class JsonSchemaFormat(BaseModel):
    name: Text | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None  # the schema is always enforced


class ResponseFormat(BaseModel):
    type: Text
    json_schema: JsonSchemaFormat | None = None

    def target(self) -> dict[str, Any] | None:
        """The JSON schema the output must match; None for free text."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema":
            if self.json_schema is None or self.json_schema.schema_ is None:
                raise InvalidRequest("response_format.json_schema.schema", "missing; send the JSON schema")
            return self.json_schema.schema_
        raise InvalidRequest("response_format.type", f"{self.type[:32]!r}; allowed text, json_object, json_schema")


class GenerationFields(BaseModel):
    """What chat and completions requests share."""

    model_config = ConfigDict(extra="allow")

    model: Text | None = None
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    n: StrictInt | None = None
    stop: Text | list[Text] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[Text, Number] | None = None
    user: Text | None = None
    # vLLM's
    top_k: StrictInt | None = None
    min_p: Number | None = None
    repetition_penalty: Number | None = None
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = None
    min_tokens: StrictInt | None = None
    include_stop_str_in_output: StrictBool = False
    return_token_ids: StrictBool = False
    # Constraints: OpenAI's, and vLLM's under their names. At most one.
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | Text | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: Text | None = None

    def constraint_field(self) -> str | None:
        """The field this body's constraint came in, as the client spelled it (for errors)."""
        if getattr(self, "tools", None) and getattr(self, "tool_choice", None) not in (None, "auto", "none"):
            return "tools"  # the calls' grammar is built from the tools' schemas
        if self.response_format is not None and self.response_format.type == "json_schema":
            return "response_format.json_schema.schema"
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format"
        return next((name for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
                     if getattr(self, name) is not None), None)

    def forced_calls(self) -> str | None:
        """The grammar of the tool calls this request forces, if it does (chat's tool_choice)."""
        return None

    def _constrain(self, request: pb.GenerateRequest) -> None:
        given = [name for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
                 if getattr(self, name) is not None]
        schema = self.response_format.target() if self.response_format is not None else None
        if schema is not None:
            given.insert(0, "response_format")
        calls = self.forced_calls()
        if calls is not None:
            given.insert(0, "tool_choice")
        if len(given) > 1:
            raise InvalidRequest(given[1], f"one constraint per request, and {given[0]} is set too")
        if calls is not None:
            request.grammar = calls
        elif schema is not None:
            request.json_schema = json.dumps(schema)
        elif self.guided_json is not None:
            guided = self.guided_json
            request.json_schema = guided if isinstance(guided, str) else json.dumps(guided)
        elif self.guided_regex is not None:
            request.regex = self.guided_regex
        elif self.guided_choice is not None:
            request.choice.choices.extend(self.guided_choice)
            request.choice.SetInParent()  # an empty list is still a (refused) constraint
        elif self.guided_grammar is not None:
            request.grammar = self.guided_grammar

    def _refuse_unsupported(self) -> None:
        """OpenAI fields that would change the output in ways this server does not offer: refused by name, never
        silently ignored."""
        extra = self.model_extra or {}
        for name in UNSUPPORTED:
            value = extra.get(name)
            if value is None or value == {"type": "text"} or (name == "best_of" and value == (self.n or 1)):
                continue
            raise InvalidRequest(name, "not supported by this server")

    def _number(self, message: Any, name: str, value: Any, field: str | None = None) -> None:
        """Sets a protobuf field; a value its type cannot hold (a negative uint, an int past 64 bits) is a 400."""
        if value is None:
            return
        try:
            setattr(message, name, value)
        except (ValueError, TypeError, OverflowError):
            raise InvalidRequest(field or name, f"{value!r} is out of range") from None

    def length(self) -> int | None:
        return self.max_tokens

    def alternatives(self) -> int | None:
        """None without logprobs; else how many most likely tokens each token lists."""
        raise NotImplementedError

    def fill(self, request: pb.GenerateRequest) -> None:
        """Writes this body's settings into `request` (whose input is already set)."""
        self._refuse_unsupported()
        self._constrain(request)
        sampling, stopping = request.sampling, request.stopping
        # OpenAI samples at temperature 1 unless told otherwise; gRPC is greedy unless told otherwise.
        self._number(sampling, "temperature", 1.0 if self.temperature is None else self.temperature,
                     "sampling.temperature")
        for name in ("top_p", "seed", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            self._number(sampling, name, getattr(self, name), f"sampling.{name}")
        for token, bias in (self.logit_bias or {}).items():
            if not re.fullmatch(r"-?[0-9]{1,10}", token) or not -2**31 <= int(token) < 2**31:
                raise InvalidRequest(f"logit_bias[{token[:32]!r}]", "keys are token ids, as decimal strings")
            sampling.logit_bias[int(token)] = bias
        self._number(stopping, "max_new_tokens", self.length(), "stopping.max_new_tokens")
        stopping.stop.extend([self.stop] if isinstance(self.stop, str) else self.stop or [])
        stopping.ignore_eos = self.ignore_eos
        for index, token_id in enumerate(self.stop_token_ids or []):
            if not -2**31 <= token_id < 2**31:
                raise InvalidRequest(f"stopping.stop_token_ids[{index}]", f"{token_id} is out of range")
        stopping.stop_token_ids.extend(self.stop_token_ids or [])
        self._number(stopping, "min_tokens", self.min_tokens, "stopping.min_tokens")
        stopping.include_stop_str_in_output = self.include_stop_str_in_output
        self._number(request, "n", self.n, "n")
        top = self.alternatives()
        request.return_logprobs = top is not None
        self._number(request, "top_logprobs", top or 0, "top_logprobs")


class ChatCompletionRequest(GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    tools: list[Tool] | None = None
    tool_choice: Text | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True

    def tool_names(self) -> set[str]:
        """The functions whose calls the reply may hold (none when tool_choice is "none")."""
        if not self.tools or self.tool_choice == "none":
            return set()
        return {tool.function.name for tool in self.tools}

    def forced_calls(self) -> str | None:
        choice = self.tool_choice
        if choice is not None and not self.tools:
            raise InvalidRequest("tool_choice", "needs tools")
        for index, tool in enumerate(self.tools or []):
            if tool.type != "function":
                raise InvalidRequest(f"tools[{index}].type", f"{tool.type[:32]!r}; allowed function")
        if choice is None or choice in ("auto", "none"):
            return None
        tools = {tool.function.name: tool.function.parameters for tool in self.tools or []}
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in tools:
                raise InvalidRequest("tool_choice.function.name", f"{choice.function.name[:32]!r} is not one of "
                                     "the tools")
            return call_grammar({choice.function.name: tools[choice.function.name]}, parallel=False)
        if choice != "required":
            raise InvalidRequest("tool_choice", f"{choice[:32]!r}; allowed none, auto, required, or a function")
        return call_grammar(tools, self.parallel_tool_calls)

    def length(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def alternatives(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs", "needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(GenerationFields):
    prompt: Text | list[Text] | list[StrictInt] | list[list[StrictInt]]
    logprobs: StrictInt | None = None
    echo: StrictBool = False

    def alternatives(self) -> int | None:
        if self.echo and self.logprobs is not None:
            raise InvalidRequest("echo", "with logprobs (the prompt's log-probabilities) is not supported")
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a text, or token ids."""
        prompt: Any = self.prompt
        if isinstance(prompt, str) or (prompt and all(isinstance(item, int) for item in prompt)):
            prompts: list[Any] = [prompt]
        elif not prompt:
            raise InvalidRequest("prompt", "empty; send a prompt")
        else:
            prompts = list(prompt)
        for number, ids in enumerate(prompts):
            # Past int32 a protobuf field cannot even hold the id: refused here, as the vocabulary check would.
            outside = [token for token in ids if not -2**31 <= token < 2**31] if isinstance(ids, list) else []
            if outside:
                where = f"prompt[{number}]" if len(prompts) > 1 else "prompt"
                raise InvalidRequest(where, f"{outside[0]} is outside the vocabulary")
        return prompts


class TokenizeRequest(BaseModel):
    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None

    def to_proto(self) -> pb.TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequest("prompt", "send exactly one of prompt and messages")
        if self.messages is not None:
            return pb.TokenizeRequest(messages=chat_messages(self.messages))
        return pb.TokenizeRequest(prompt=self.prompt)


class DetokenizeRequest(BaseModel):
    model: Text | None = None
    tokens: list[StrictInt]

