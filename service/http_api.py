"""The OpenAI-compatible HTTP API, in the gRPC server's process and on its scheduler: HTTP and gRPC requests
batch together.

A request is read into pydantic models (service/openai_schema.py), turned into the gRPC GenerateRequest it
means and checked by the very same rules (service/api.py); an error names the field as this API spells it
(`max_tokens`, not `stopping.max_new_tokens`). Streams are server-sent events (sse-starlette) ending in
`data: [DONE]`. Defaults are OpenAI's where they differ from gRPC's: an unset temperature samples at 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptserve.model.generation import FinishReason, TokenEvent
from gptserve.service.api import MAX_REQUEST_ID_LENGTH, GenerationRequest, parse_generate_request, parse_input
from gptserve.service.auth import BearerToken
from gptserve.service.errors import ConfigError, InvalidRequest, NotServing, ServiceError, status_for
from gptserve.service.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerationFields,
    TokenizeRequest,
    chat_messages,
)
from gptserve.service.scheduler import RequestHandle, merge_updates
from gptserve.service.tools import ToolCallStream, parse_tool_calls, writes_tool_calls
from gptserve.v1 import generation_pb2 as pb

if TYPE_CHECKING:
    from gptserve.service.server import Backend, GenerationServicer, _Call

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.INTERNAL: (500, "server_error"),
}
UNION_MEMBER = re.compile(r"int|float|str|bool|(list|dict|tuple|function-\w+)\[.*\]|[A-Z]\w*")
PROMPT_FIELD = re.compile(r"^(input|prompt_token_ids\.ids|prompt)(?=\[|$)")
ROUTE_METHODS = {"/v1/chat/completions": "ChatCompletions", "/v1/completions": "Completions", "/v1/models": "Models",
                 "/tokenize": "Tokenize", "/detokenize": "Detokenize"}
CONSTRAINT_FIELDS = ("json_schema", "regex", "choice.choices", "grammar")  # service/api.py's names
FINISH_REASONS = {FinishReason.LENGTH: "length", FinishReason.STOP: "stop", FinishReason.EOS: "stop"}


class ModelNotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class HttpError(Exception):
    """A failure as this API reports it: status, OpenAI's error type and code, and the parameter at fault."""

    def __init__(self, status: int, kind: str, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.param, self.code = status, kind, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


async def _respond(request: Request, error: Exception) -> Response:
    assert isinstance(error, HttpError)  # registered for HttpError only
    return error.response()


async def _http_exception(request: Request, error: Exception) -> Response:
    """Starlette's own refusals (no such route, a method the route does not take) in OpenAI's form."""
    assert isinstance(error, StarletteHTTPException)  # registered for it only
    message = f"{request.method} {request.url.path}: {error.detail}"
    if error.status_code == 404:
        message += "; the routes are /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics"
    return HttpError(error.status_code, "invalid_request_error", message).response()


def http_error(error: BaseException, request_id: str | None,
               rename: Callable[[str], str]) -> tuple[HttpError, grpc.StatusCode]:
    """Any failure, through the gRPC edge's own mapping (service/errors.py, which logs a bug once), then to HTTP;
    and the gRPC status it maps to."""
    code, message = status_for(error, request_id)
    status, kind = HTTP_STATUS.get(code, (500, "server_error"))
    if isinstance(error, InvalidRequest):
        param = rename(error.field)
        return HttpError(status, kind, f"{param}: {error.problem}", param), code
    if isinstance(error, ModelNotFound):
        return HttpError(status, kind, message, "model", "model_not_found"), code
    return HttpError(status, kind, message, code=code.name.lower()), code


def renamer(body: GenerationFields) -> Callable[[str], str]:
    """gRPC field paths (service/api.py's errors) as this request spelled them."""
    kind = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
    length = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
    logprobs = "top_logprobs" if kind == "messages" else "logprobs"

    constraint = body.constraint_field()

    def rename(field: str) -> str:
        if constraint and field in CONSTRAINT_FIELDS:
            return constraint
        field = re.sub(r"^(sampling|stopping)\.", "", field)
        field = re.sub(r"^messages\.messages", "messages", field)
        field = re.sub(r"^messages\.tools", "tools", field)
        field = re.sub(r"^(input|prompt_token_ids\.ids)", kind, field)
        return {"max_new_tokens": length, "top_logprobs": logprobs}.get(field, field)
    return rename


class OpenAIFrontend:
    """The routes, over the gRPC servicer's backend, accounting and log."""

    def __init__(self, servicer: GenerationServicer, is_serving: Callable[[], bool]) -> None:
        self.servicer, self.is_serving = servicer, is_serving
        config = servicer.config
        self.config = config
        self.token = BearerToken(config.auth_token) if config.auth_token else None
        self.app = FastAPI(title="gptserve", docs_url=None, redoc_url=None, openapi_url=None)
        self.started = int(time.time())
        self.app.add_middleware(BodyLimit, limit=config.max_message_bytes)
        self.app.add_exception_handler(HttpError, _respond)
        self.app.add_exception_handler(StarletteHTTPException, _http_exception)
        self.app.add_exception_handler(RequestValidationError, self._invalid)
        routes = self.app.add_api_route
        routes("/health", self.health, methods=["GET"])
        routes("/metrics", self.metrics, methods=["GET"])
        routes("/v1/models", self.models, methods=["GET"])
        routes("/v1/chat/completions", self.chat_completions, methods=["POST"])
        routes("/v1/completions", self.completions, methods=["POST"])
        routes("/tokenize", self.tokenize, methods=["POST"])
        routes("/detokenize", self.detokenize, methods=["POST"])

    # Plumbing -----------------------------------------------------------------------------------------------

    async def _invalid(self, request: Request, error: Exception) -> Response:
        """pydantic's complaint about a field's type, as a 400 naming the field."""
        assert isinstance(error, RequestValidationError)  # registered for it only
        self._check_token(request)  # an unauthenticated caller learns nothing about its request
        first = error.errors()[0]
        if first["type"] == "json_invalid":  # its location is a character offset, not a field
            return self._refused_body(request, f"request body: not valid JSON (at character {first['loc'][-1]}: "
                                               f"{first.get('ctx', {}).get('error', first['msg'])})", None)
        # pydantic names the member of a union it tried ("temperature.int"): the field is what the client wrote.
        location = [str(part) for part in first["loc"]
                    if part != "body" and (isinstance(part, int) or not UNION_MEMBER.fullmatch(part))]
        param = location[0] + "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in location[1:]) \
            if location else None
        message = f"{param}: {first['msg']}" if param else \
            "request body: not a JSON object (send one, with the header Content-Type: application/json)"
        return self._refused_body(request, message, param)

    def _refused_body(self, request: Request, message: str, param: str | None) -> Response:
        call = self._open(request)
        call.code, call.message = grpc.StatusCode.INVALID_ARGUMENT, message
        self.servicer.close_call(call)
        return HttpError(400, "invalid_request_error", message, param).response()

    def _check_token(self, request: Request) -> None:
        if self.token is not None and not self.token.admits(request.headers.get("authorization", "")):
            raise HttpError(401, "authentication_error", "missing or wrong bearer token: send the header "
                            "'Authorization: Bearer TOKEN'", code="invalid_api_key")

    def _backend(self, model: str | None) -> Backend:
        backend = self.servicer.backend
        if backend is None:
            raise NotServing("the model is still loading; retry shortly")
        if model is not None and model not in self.model_names(backend):
            raise ModelNotFound(f"the model {model!r} does not exist here; this server serves "
                                f"{', '.join(map(repr, self.model_names(backend)))}")
        return backend

    def model_names(self, backend: Backend) -> list[str]:
        return list(dict.fromkeys([backend.engine.manifest.model.name, *self.config.served_model_names]))

    # Routes without generation ----------------------------------------------------------------------------------

    async def health(self) -> Response:
        """200 only while the gRPC health says SERVING: loaded, not draining."""
        serving = self.is_serving()
        return JSONResponse({"status": "SERVING" if serving else "NOT_SERVING"}, status_code=200 if serving else 503)

    async def metrics(self) -> Response:
        return Response(generate_latest(self.servicer.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request: Request) -> Response:
        async with self._call(request):
            backend = self._backend(None)
            return JSONResponse({"object": "list", "data": [
                {"id": name, "object": "model", "created": self.started, "owned_by": "gptserve",
                 "max_model_len": backend.engine.context_length} for name in self.model_names(backend)]})

    async def tokenize(self, request: Request, body: TokenizeRequest) -> Response:
        async with self._call(request):
            backend = self._backend(body.model)
            ids, _ = await asyncio.to_thread(parse_input, body.to_proto(), backend.engine.tokenizer, backend.limits)
            return JSONResponse({"count": len(ids), "max_model_len": backend.engine.context_length, "tokens": ids})

    async def detokenize(self, request: Request, body: DetokenizeRequest) -> Response:
        async with self._call(request):
            backend = self._backend(body.model)
            vocab = backend.engine.vocab_size
            for index, token in enumerate(body.tokens):
                if not 0 <= token < vocab:
                    raise InvalidRequest(f"tokens[{index}]", f"{token} is outside the vocabulary; allowed 0 to "
                                         f"{vocab - 1}")
            return JSONResponse({"prompt": backend.engine.tokenizer.decode(body.tokens)})

    # Generation -----------------------------------------------------------------------------------------------

    def _open(self, request: Request, generation: bool = False) -> _Call:
        """A call of the route's method (ROUTE_METHODS), as the servicer counts and logs calls."""
        method = ROUTE_METHODS.get(request.url.path, request.url.path)
        call = self.servicer.open_call(method, f"http:{request.client.host if request.client else '?'}",
                                       generation)
        call.carrier = dict(request.headers)
        call.request_id = call.carrier.get("x-request-id", "")[:MAX_REQUEST_ID_LENGTH]
        return call

    def _failed(self, call: _Call, error: BaseException, rename: Callable[[str], str] = str) -> BaseException:
        """What to raise for a failure of `call`, which is recorded with the status the gRPC API would give."""
        if isinstance(error, HttpError):
            call.code = {401: grpc.StatusCode.UNAUTHENTICATED}.get(error.status, grpc.StatusCode.INVALID_ARGUMENT)
            call.message = error.message
            return error
        if isinstance(error, asyncio.CancelledError | GeneratorExit):
            call.code = self.servicer.gone_code()
            return error
        failure, call.code = http_error(error, call.request.request_id if call.request else None, rename)
        call.message = failure.message  # logged as its client read it
        return failure

    @contextlib.asynccontextmanager
    async def _call(self, request: Request):
        """A call that is not a generation: the token check, then its count, and failures as OpenAI's error body."""
        call = self._open(request)
        try:
            self._check_token(request)
            yield call
            call.code = grpc.StatusCode.OK
        except BaseException as error:
            raise self._failed(call, error) from None
        finally:
            self.servicer.close_call(call)

    async def chat_completions(self, request: Request, body: ChatCompletionRequest) -> Response:
        return await self._generate(request, body,
                                    lambda: [pb.GenerateRequest(messages=chat_messages(body.messages, body.tools))])

    async def completions(self, request: Request, body: CompletionRequest) -> Response:
        return await self._generate(request, body, lambda: [
            pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=prompt)) if isinstance(prompt, list)
            else pb.GenerateRequest(prompt=prompt) for prompt in body.prompts()])

    async def _generate(self, request: Request, body: GenerationFields,
                        inputs: Callable[[], list[pb.GenerateRequest]]) -> Response:
        """Checks and queues the request's prompts, then answers whole, or hands the call to its stream."""
        rename, call = renamer(body), self._open(request, generation=True)
        streaming = False
        try:
            self._check_token(request)
            backend = self._backend(body.model)
            if isinstance(body, ChatCompletionRequest) and body.tool_names() and \
                    not writes_tool_calls(backend.engine.tokenizer.chat_template):
                raise InvalidRequest("tools", "this model's chat template does not ask for tool calls in <tool_call> "
                                     "blocks (as Qwen2.5, Qwen3 and Hermes do), the form this server parses")
            checked = []
            messages = inputs()
            for position, message in enumerate(messages):
                body.fill(message)
                message.request_id = call.request_id
                try:
                    checked.append(await asyncio.to_thread(parse_generate_request, message, backend.engine.tokenizer,
                                                           backend.limits, backend.grammars))
                except InvalidRequest as error:  # of several prompts, say which
                    if len(messages) > 1 and PROMPT_FIELD.match(error.field):
                        raise InvalidRequest(PROMPT_FIELD.sub(f"prompt[{position}]", error.field),
                                             error.problem) from None
                    raise
            call.request = checked[0]
            leaders: list[RequestHandle] = []
            try:  # every prompt queued, or none
                for item in checked:
                    leaders.append(backend.scheduler.submit(item))
            except Exception:
                for leader in leaders:
                    leader.cancel()
                raise
            call.handle = leaders[0]
            reply = Reply(body, checked, leaders, backend, body.model or self.model_names(backend)[0])
            if not body.stream:
                whole = await self._until_done_or_gone(request, reply)
                if whole is None:  # nobody is left to read a reply
                    call.code = self.servicer.gone_code()
                    return Response(status_code=499)
                call.code = grpc.StatusCode.OK
                return JSONResponse(whole)
            streaming = True
        except BaseException as error:
            raise self._failed(call, error, rename) from None
        finally:
            if not streaming:
                self.servicer.close_call(call)
        return Stream(self._stream(reply, call, rename), lambda: self._end_stream(reply, call),
                      send_timeout=self.config.stall_seconds)

    def _end_stream(self, reply: Reply, call: _Call) -> None:
        reply.cancel()
        self.servicer.close_call(call)

    async def _until_done_or_gone(self, request: Request, reply: Reply) -> dict | None:
        """The whole reply, or None for a client that disconnected first (its requests end within one step)."""
        work = asyncio.ensure_future(reply.whole())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
            return work.result() if work.done() else None
        finally:
            gone.cancel()
            work.cancel()
            reply.cancel()

    async def _stream(self, reply: Reply, call: _Call, rename: Callable[[str], str]) -> AsyncIterator[str]:
        try:
            async for chunk in reply.chunks():
                yield json.dumps(chunk)
            call.code = grpc.StatusCode.OK
            yield "[DONE]"
        except (asyncio.CancelledError, GeneratorExit) as error:  # the client went away: nothing can reach it
            self._failed(call, error)
            raise
        except Exception as error:  # after the 200: the error goes as the stream's last event
            yield json.dumps(self._failed(call, error, rename).body())  # type: ignore[attr-defined]
        finally:
            self._end_stream(reply, call)


class BodyLimit:
    """ASGI middleware: a request body past `limit` bytes (--max-message-bytes, as gRPC's) is a 413, refused as soon
    as it is known (its declared length, or the bytes received), whether or not it declared its length."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        # The body is read here, counted, and handed on whole (the app would hold it all anyway).
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its request
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                await self._refuse(scope, receive, send)
                return
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send) -> None:
        error = HttpError(413, "invalid_request_error", f"request body: more than {self.limit} bytes "
                          "(--max-message-bytes)", code="request_too_large")
        await error.response()(scope, receive, send)


class Stream(EventSourceResponse):
    """Server-sent events whose call is closed however the response ends, even if its body never starts (a client
    gone before the first byte)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None], send_timeout: float) -> None:
        super().__init__(events, send_timeout=send_timeout, sep="\n")
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _disconnected(request: Request) -> None:
    """Returns once the client has disconnected (the body is already read: what comes next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Reply:
    """The OpenAI response to one generation request: its requests' tokens shaped as choices, whole or chunked."""

    def __init__(self, body: GenerationFields, requests: list[GenerationRequest], leaders: list[RequestHandle],
                 backend: Backend, model: str) -> None:
        self.body, self.requests, self.leaders, self.model = body, requests, leaders, model
        self.tokenizer = backend.engine.tokenizer
        self.chat = isinstance(body, ChatCompletionRequest)
        self.tool_names = body.tool_names() if isinstance(body, ChatCompletionRequest) else set()
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + requests[0].request_id
        self.created = int(time.time())
        self.n = requests[0].n
        # Choice index of each sequence: prompt by prompt, then sequence by sequence, as OpenAI numbers them.
        self.handles = [member for leader in leaders for member in leader.group]
        self.index = {handle: number for number, handle in enumerate(self.handles)}
        self.prompt_of = {handle: requests[position] for position, leader in enumerate(leaders)
                          for handle in leader.group}

    def cancel(self) -> None:
        for leader in self.leaders:
            leader.cancel()

    def _echo(self, handle: RequestHandle) -> str:
        if self.chat or not getattr(self.body, "echo", False):
            return ""
        return self.tokenizer.decode(self.prompt_of[handle].prompt_ids)

    def usage(self) -> dict:
        prompt = sum(len(request.prompt_ids) for request in self.requests)
        completion = sum(len(handle.sequence.token_ids) for handle in self.handles)
        cached = sum(leader.cached_tokens for leader in self.leaders)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _head(self) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _ending(self, handle: RequestHandle) -> dict:
        sequence = handle.sequence
        assert sequence.finish_reason is not None  # asked of finished sequences only
        return {"finish_reason": FINISH_REASONS[sequence.finish_reason], "stop_reason": sequence.stop_reason}

    def _call_finish(self, handle: RequestHandle) -> str:
        """A reply that calls tools ends with `tool_calls`, unless it ran out of tokens."""
        return "length" if handle.sequence.finish_reason is FinishReason.LENGTH else "tool_calls"

    def _logprobs(self, events: list[TokenEvent], offset: int) -> dict | None:
        """The choice's logprobs object for these tokens, as the chat or the completions API shapes it."""
        wanted = self.requests[0].return_logprobs
        if not wanted:
            return None
        text_of = self.tokenizer.token_text
        if self.chat:
            return {"content": [{
                "token": text_of(event.id), "logprob": event.logprob, "bytes": list(text_of(event.id).encode()),
                "top_logprobs": [{"token": text_of(token), "logprob": logprob, "bytes": list(text_of(token).encode())}
                                 for token, logprob in event.top_logprobs]} for event in events]}
        offsets = []
        for event in events:
            offsets.append(offset)
            offset += len(event.text)
        return {"tokens": [text_of(event.id) for event in events],
                "token_logprobs": [event.logprob for event in events],
                "top_logprobs": [{text_of(token): logprob for token, logprob in event.top_logprobs}
                                 for event in events],
                "text_offset": offsets}

    def _extras(self, handle: RequestHandle, events: list[TokenEvent]) -> dict:
        """vLLM's `return_token_ids`: the ids behind the text."""
        if not self.body.return_token_ids:
            return {}
        return {"token_ids": [event.id for event in events],
                "prompt_token_ids": list(self.prompt_of[handle].prompt_ids)}

    async def whole(self) -> dict:
        events: dict[RequestHandle, list[TokenEvent]] = {handle: [] for handle in self.handles}
        async for handle, update, _ in merge_updates(self.handles):
            events[handle] += update
        choices = []
        for handle in self.handles:
            echo = self._echo(handle)
            text = echo + handle.sequence.text
            choice: dict[str, Any] = {"index": self.index[handle]}
            ending = self._ending(handle)
            if self.chat and self.tool_names:
                content, calls = parse_tool_calls(text, self.tool_names)
                choice["message"] = {"role": "assistant", "content": content}
                if calls:
                    choice["message"]["tool_calls"] = [call.to_json() for call in calls]
                    ending["finish_reason"] = self._call_finish(handle)
            else:
                choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
            choice["logprobs"] = self._logprobs(events[handle], len(echo))
            choice.update(ending, **self._extras(handle, events[handle]))
            choices.append(choice)
        return {**self._head(), "choices": choices, "usage": self.usage()}

    async def chunks(self) -> AsyncIterator[dict]:
        head = self._head() | {"object": "chat.completion.chunk" if self.chat else "text_completion"}
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        usage_field = {"usage": None} if include_usage else {}
        offsets = {handle: 0 for handle in self.handles}
        if self.chat:  # the role first, once per choice, as OpenAI streams it
            for handle in self.handles:
                yield {**head, "choices": [{"index": self.index[handle], "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}], **usage_field}
        else:
            for handle in self.handles:
                if echo := self._echo(handle):
                    offsets[handle] = len(echo)
                    yield {**head, "choices": [{"index": self.index[handle], "text": echo, "logprobs": None,
                                                "finish_reason": None}], **usage_field}
        calls = {handle: ToolCallStream(self.tool_names) for handle in self.handles} if self.tool_names else {}
        async for handle, events, done in merge_updates(self.handles):
            text = "".join(event.text for event in events)
            choice: dict[str, Any] = {"index": self.index[handle]}
            ending = self._ending(handle) if done else {"finish_reason": None}
            if handle in calls:  # content up to the first call streams; the calls come whole, at the end
                delta: dict[str, Any] = {"content": calls[handle].feed(text)}
                if done:
                    rest, found = calls[handle].finish()
                    delta["content"] += rest or ""
                    if found:
                        delta["tool_calls"] = [call.to_json(index) for index, call in enumerate(found)]
                        ending["finish_reason"] = self._call_finish(handle)
                choice["delta"] = delta
            else:
                choice.update({"delta": {"content": text} if text or not done else {}} if self.chat
                              else {"text": text})
            choice["logprobs"] = self._logprobs(events, offsets[handle])
            offsets[handle] += len(text)
            choice.update(ending, **self._extras(handle, events))
            if events or done:
                yield {**head, "choices": [choice], **usage_field}
        if include_usage:
            yield {**head, "choices": [], "usage": self.usage()}


class HttpServer(uvicorn.Server):
    """uvicorn on the gRPC server's event loop. Signals stay the gRPC server's: it decides when this one stops."""

    def capture_signals(self):
        return contextlib.nullcontext()


def start_http(frontend: OpenAIFrontend, host: str, port: int, tls: tuple[Path, Path] | None,
               ) -> tuple[HttpServer, asyncio.Task, int]:
    """Serves the frontend on host:port (0 picks a free port): the server, its task and the port it listens on."""
    try:
        listener = bind(host, port)
    except OSError as error:
        raise ConfigError("http_port", f"cannot listen on {host}:{port}: {error.strerror}") from error
    config = uvicorn.Config(frontend.app, lifespan="off", log_config=None, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=1, ssl_certfile=tls[0] if tls else None,
                            ssl_keyfile=tls[1] if tls else None)
    server = HttpServer(config)
    return server, asyncio.create_task(server.serve(sockets=[listener])), listener.getsockname()[1]


def bind(host: str, port: int) -> socket.socket:
    """The HTTP API's listening socket, bound before the server starts (a port in use is a ConfigError there, and
    port 0 picks a free one whose number is known at once)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: a response's head and body leave at once instead of the body waiting
    # (Nagle) for the client's delayed ACK of the head, 40 ms on Linux, on every keep-alive request.
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.bind((host.strip("[]"), port))
    listener.listen(2048)
    listener.setblocking(False)
    return listener
