"""The gRPC server on grpc.aio: a thin servicer over the scheduler, plus health, reflection, TLS, a bearer-token
check, Prometheus metrics and graceful shutdown.

Deployment: both TLS (`tls_cert_file`/`tls_key_file`) and the bearer token (`auth_token`) are off by default,
which suits a server bound to 127.0.0.1. Anything reachable from other machines should turn both on: the token
travels in the `authorization: Bearer TOKEN` metadata and is only secret over TLS. The health service answers
without a token, so load balancers and orchestrators can probe it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Protocol, TypeVar
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from gptserve.export.artifact import format_report
from gptserve.export.manifest import Manifest
from gptserve.model.generation import TokenEvent
from gptserve.model.guidance import GrammarCompiler
from gptserve.service.api import (
    FINISH_REASONS,
    MAX_REQUEST_ID_LENGTH,
    GenerationRequest,
    Limits,
    matched_stop,
    parse_generate_request,
    parse_input,
    read_message,
    tokens_to_proto,
    usage_to_proto,
)
from gptserve.service.auth import BearerToken
from gptserve.service.errors import ConfigError, NotServing, StalledReader, Unauthenticated, status_for
from gptserve.service.http_api import HttpServer, OpenAIFrontend, start_http
from gptserve.service.metrics import Metrics
from gptserve.service.prefix_cache import PREFIX_CACHE_MB, PrefixCache
from gptserve.service.scheduler import PREFILL_CHUNK_TOKENS, PREFILL_STEP_SECONDS, BatchEngine, RequestHandle, Scheduler
from gptserve.service.speculative import check_mode, create_speculator
from gptserve.service.tracing import RequestTracer, otlp_provider
from gptserve.v1 import generation_pb2 as pb
from gptserve.v1 import generation_pb2_grpc as pb_grpc

log = logging.getLogger("gptserve.server")
request_log = logging.getLogger("gptserve.requests")
stats_log = logging.getLogger("gptserve.stats")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TextGeneration"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
DEADLINE_SLACK_SECONDS = 0.1


def setting(default, minimum: float, maximum: float = math.inf):
    """A numeric ServerConfig field and its allowed range, which the config checks itself."""
    return field(default=default, metadata={"range": (minimum, maximum)})


@dataclass(frozen=True)
class ServerConfig:
    """Every server setting and its default, once: `gptserve serve`'s flags take their defaults from here."""

    host: str = "127.0.0.1"
    port: int = setting(50051, 0, 65535)  # 0 picks a free port
    http_port: int = setting(8000, 0, 65535)  # the OpenAI-compatible HTTP API (service/http_api.py); 0: none
    served_model_names: tuple[str, ...] = ()  # names the HTTP API answers to besides the model's own
    max_batch_size: int = setting(8, 1)
    max_queue: int = setting(64, 0)
    # A stream whose client has this many tokens unread (not yet written) is paused (service/scheduler.py); up to
    # max_paused paused streams give up their slots (None: as many as max_batch_size).
    max_unread_tokens: int = setting(32, 1)
    max_paused: int | None = setting(None, 0)
    stall_seconds: float = setting(30.0, 0.001)  # a stream whose writes make no progress this long is ended
    prefill_chunk_tokens: int = setting(PREFILL_CHUNK_TOKENS, 1)  # prompt tokens per engine iteration at most
    prefill_step_seconds: float = setting(PREFILL_STEP_SECONDS, 0.001)  # what a prompt chunk aims to take
    prefix_cache_mb: int = setting(PREFIX_CACHE_MB, 0)  # KV of prompts kept for reuse (service/prefix_cache.py); 0: off
    default_max_new_tokens: int = setting(256, 1)
    max_stop_strings: int = setting(16, 0)
    max_message_bytes: int = setting(1 << 20, 1)  # of one request or response message
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    auth_token: str | None = None
    metrics_port: int | None = setting(None, 0, 65535)  # None: no metrics endpoint; 0 picks a free port
    metrics_host: str = "127.0.0.1"
    grace_seconds: float = setting(10.0, 0.0)  # streams in flight get this long to finish on shutdown
    stats_seconds: float = setting(10.0, 0.0)  # a log line of throughput and load this often while busy; 0: never
    otlp_endpoint: str | None = None  # OpenTelemetry traces to this OTLP/gRPC collector (service/tracing.py)
    speculative: str = "ngram"  # ngram, draft:DIR or off (service/speculative.py)

    def __post_init__(self) -> None:
        for item in fields(self):
            value, allowed = getattr(self, item.name), item.metadata.get("range")
            if allowed is not None and value is not None and not allowed[0] <= value <= allowed[1]:  # NaN too
                low, high = allowed
                raise ConfigError(item.name, f"{value}; allowed {low} or more" if high == math.inf
                                  else f"{value}; allowed {low} to {high}")
        # Authentication never fails open: a token that is there must be a token.
        if self.auth_token is not None and not self.auth_token.strip():
            raise ConfigError("auth_token", "empty; give a token, or none to serve without one")
        if (problem := check_mode(self.speculative)) is not None:
            raise ConfigError("speculative", problem)
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("tls_cert_file" if self.tls_key_file else "tls_key_file",
                              "TLS needs both a certificate file and a key file")


class ServedEngine(BatchEngine, Protocol):
    """What the server needs of an engine (service/engine.py's Engine): the scheduler's verbs and its description."""

    manifest: Manifest
    context_length: int
    vocab_size: int
    execution_provider: str


T = TypeVar("T")


@dataclass
class Backend:
    """What exists once the model is loaded."""

    engine: ServedEngine
    scheduler: Scheduler
    limits: Limits
    grammars: GrammarCompiler  # the requests' constraints, compiled for this model's tokenizer


@dataclass
class _Call:
    """One RPC's outcome, for the metrics and the request log line."""

    method: str
    peer: str
    generation: bool = False  # counted among the calls a graceful shutdown waits for, and logged
    code: grpc.StatusCode = grpc.StatusCode.CANCELLED  # what is left when the client goes away mid-call
    message: str = ""
    request: GenerationRequest | None = None
    handle: RequestHandle | None = None
    closed: bool = False
    request_id: str = ""  # the client's x-request-id, for a request that names none itself
    carrier: dict[str, str] = field(default_factory=dict)  # its metadata or headers: a trace context it names

class GenerationServicer(pb_grpc.TextGenerationServicer):
    """Protobuf in, checked request to the scheduler, tokens back out. No generation logic lives here.

    Requests arrive as their raw bytes (see `add_generation_service`) and are parsed here, after the token check
    and inside the call's error handling; parsing and tokenizing run off the event loop."""

    def __init__(self, metrics: Metrics, config: ServerConfig, tracer: RequestTracer | None = None) -> None:
        self.metrics, self.config, self.tracer = metrics, config, tracer
        self.backend: Backend | None = None
        # Generation calls in flight, so a graceful shutdown knows when the last one has finished.
        self.generating = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.closing = False  # the shutdown grace is over: calls still open end UNAVAILABLE

    def _ready(self) -> Backend:
        if self.backend is None:
            raise NotServing("the model is still loading; retry shortly")
        return self.backend

    def open_call(self, method: str, peer: str, generation: bool) -> _Call:
        """A call of either API begins: until `close_call`, a generation call holds a graceful shutdown."""
        call = _Call(method, peer, generation)
        if generation:
            self.generating += 1
            self.idle.clear()
        return call

    def close_call(self, call: _Call) -> None:
        """Once per call, whatever ended it: its request stops (if still running), it is counted and logged."""
        if call.closed:
            return
        call.closed = True
        if call.handle is not None:
            call.handle.cancel()  # frees the slots at the next step if the request is still running
        self.metrics.requests.labels(call.method, call.code.name).inc()
        self._log_request(call)
        if self.tracer is not None and call.generation:
            self.tracer.record(call, call.carrier)
        if call.generation:
            self.generating -= 1
            if not self.generating:
                self.idle.set()

    @contextlib.asynccontextmanager
    async def _rpc(self, method: str, context: grpc.aio.ServicerContext):
        # The peer is read now: once a deadline has torn the call down, asking its context segfaults grpc.aio.
        call = self.open_call(method, context.peer(), generation=method.startswith("Generate"))
        call.carrier = {key: str(value) for key, value in context.invocation_metadata() or ()}
        call.request_id = call.carrier.get("x-request-id", "")
        try:
            yield call
            call.code = grpc.StatusCode.OK
        except (asyncio.CancelledError, GeneratorExit):
            call.code = self._why_gone(context)
            raise
        except Exception as error:
            call.code, call.message = status_for(error, call.request.request_id if call.request else None)
            if method == "GenerateStream":  # an abort would wait behind a write its client never takes
                context.set_code(call.code)
                context.set_details(call.message)
            else:
                await context.abort(call.code, call.message)
        finally:
            self.close_call(call)

    def gone_code(self) -> grpc.StatusCode:
        """The status of a call whose client left: UNAVAILABLE when the shutdown grace cut it, else CANCELLED."""
        return grpc.StatusCode.UNAVAILABLE if self.closing else grpc.StatusCode.CANCELLED

    def _why_gone(self, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
        """The status of a call that ended without a reply of ours: what its client was told."""
        if self.closing:  # cut at the end of the shutdown grace: its client gets UNAVAILABLE
            return self.gone_code()
        # The client's own timer usually fires first and cancels the call moments before the server's copy of
        # the deadline runs out, so a cancel that close to the deadline is the deadline.
        remaining = context.time_remaining()
        past_deadline = remaining is not None and remaining <= DEADLINE_SLACK_SECONDS
        return grpc.StatusCode.DEADLINE_EXCEEDED if past_deadline else grpc.StatusCode.CANCELLED

    def _log_request(self, call: _Call) -> None:
        fields: dict[str, object] = {"method": call.method, "code": call.code.name, "peer": call.peer}
        if call.message:
            fields["error"] = call.message
        if call.request_id:
            fields["request_id"] = call.request_id[:MAX_REQUEST_ID_LENGTH]
        if call.request is not None:
            fields.update(request_id=call.request.request_id, prompt_tokens=len(call.request.prompt_ids))
        if call.handle is not None:
            sequence, timings = call.handle.sequence, call.handle.timings()
            fields.update(
                completion_tokens=sum(len(handle.sequence.token_ids) for handle in call.handle.group),
                finish_reason=sequence.finish_reason.value if sequence.finish_reason else None,
                queue_s=round(timings.queue, 4), ttft_s=round(timings.time_to_first_token, 4),
                total_s=round(timings.total, 4),
            )
            self.metrics.request_duration.observe(timings.total)
        log_call(fields)

    async def _checked(self, data: bytes, call: _Call, backend: Backend) -> GenerationRequest:
        """The request from its bytes, checked (off the event loop); named by x-request-id if it names itself not."""
        message = read_message(pb.GenerateRequest, data)
        if not message.request_id and call.request_id:
            message.request_id = call.request_id[:MAX_REQUEST_ID_LENGTH]
        call.request = await asyncio.to_thread(parse_generate_request, message, backend.engine.tokenizer,
                                               backend.limits, backend.grammars)
        return call.request

    async def Generate(self, data: bytes, context) -> pb.GenerateResponse:
        async with self._rpc("Generate", context) as call:
            backend = self._ready()
            request = await self._checked(data, call, backend)
            call.handle = handle = backend.scheduler.submit(request)
            events: dict[RequestHandle, list[TokenEvent]] = {member: [] for member in handle.group}
            async for member, update, _ in handle.group_updates():
                events[member] += update
            tokenizer = backend.engine.tokenizer
            choices = [pb.Choice(index=member.sequence.index, text=member.sequence.text,
                                 tokens=tokens_to_proto(events[member], request, tokenizer),
                                 finish_reason=_finish_reason(member), **matched_stop(member.sequence))
                       for member in handle.group]
            sequence = handle.sequence
            return pb.GenerateResponse(
                request_id=request.request_id, text=sequence.text, token_ids=sequence.token_ids,
                finish_reason=choices[0].finish_reason,
                usage=usage_to_proto(len(request.prompt_ids), sum(len(member.sequence.token_ids) for member in events),
                                     handle.cached_tokens),
                timings=handle.timings().to_proto(),
                logprobs=sequence.logprobs if request.return_logprobs else [],
                choices=choices,
            )

    async def GenerateStream(self, data: bytes, context) -> None:
        async with self._rpc("GenerateStream", context) as call:
            backend = self._ready()
            request = await self._checked(data, call, backend)
            call.handle = handle = backend.scheduler.submit(request)
            running, tokenizer = len(handle.group), backend.engine.tokenizer
            # Every token that arrived while the previous message was being written goes out in one message, so a
            # slow reader gets fewer, larger messages; its tokens count as unread until their write completes.
            async for member, events, done in handle.group_updates():
                response = pb.GenerateStreamResponse(
                    request_id=request.request_id, tokens=tokens_to_proto(events, request, tokenizer),
                    index=member.sequence.index)
                if done:
                    response.finish_reason = _finish_reason(member)
                    response.MergeFrom(pb.GenerateStreamResponse(**matched_stop(member.sequence)))
                    running -= 1
                if not running:  # the request's last message
                    completion = sum(len(sequence.sequence.token_ids) for sequence in handle.group)
                    response.usage.CopyFrom(usage_to_proto(len(request.prompt_ids), completion, handle.cached_tokens))
                    response.timings.CopyFrom(handle.timings().to_proto())
                try:
                    async with asyncio.timeout(self.config.stall_seconds):  # no task per write, unlike wait_for
                        await context.write(response)
                except TimeoutError:
                    raise StalledReader(f"the client read nothing for {self.config.stall_seconds:g} s "
                                        "(--stall-seconds); the stream was ended") from None
                except Exception:  # grpc fails the write of a call that has ended: its client cancelled or left
                    raise asyncio.CancelledError from None

    async def Tokenize(self, data: bytes, context) -> pb.TokenizeResponse:
        async with self._rpc("Tokenize", context):
            backend = self._ready()
            ids, text = await asyncio.to_thread(
                parse_input, read_message(pb.TokenizeRequest, data), backend.engine.tokenizer, backend.limits)
            return pb.TokenizeResponse(token_ids=ids, rendered_prompt=text)

    async def GetModelInfo(self, data: bytes, context) -> pb.ModelInfo:
        async with self._rpc("GetModelInfo", context):
            read_message(pb.GetModelInfoRequest, data)
            backend = self._ready()
            engine, scheduler, manifest = backend.engine, backend.scheduler, backend.engine.manifest
            return pb.ModelInfo(
                model_name=manifest.model.name,
                architecture=manifest.model.config.architecture,
                context_length=engine.context_length,
                vocab_size=engine.vocab_size,
                precision=manifest.precision,
                execution_provider=engine.execution_provider,
                parity_report=format_report(manifest.parity),
                parity_passed=manifest.parity.passed,
                max_batch_size=scheduler.max_batch_size,
                max_queue=scheduler.max_queue,
                default_max_new_tokens=backend.limits.default_max_new_tokens,
                max_stop_strings=backend.limits.max_stop_strings,
                active_sequences=scheduler.active_count,
                queued_requests=scheduler.queued_count,
            )


def log_call(fields: dict[str, object]) -> None:
    """One line per call, of either API: its method, status, request id and figures (service/logs.py)."""
    request_log.info("%s %s", fields["method"], fields["code"], extra={"fields": fields})


def _finish_reason(handle: RequestHandle) -> pb.FinishReason:
    finish_reason = handle.sequence.finish_reason
    assert finish_reason is not None  # a sequence that ended without an error has finished
    return FINISH_REASONS[finish_reason]


def add_generation_service(servicer: GenerationServicer, server: grpc.aio.Server) -> None:
    """Registers the TextGeneration methods with no request deserializer: gRPC hands the servicer the request's
    bytes, so a malformed message is the servicer's INVALID_ARGUMENT (not a traceback in gRPC's own code), and
    a request refused for its token is never parsed at all."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in pb.DESCRIPTOR.services_by_name["TextGeneration"].methods:
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        response = getattr(pb, method.output_type.name)
        handlers[method.name] = make(getattr(servicer, method.name), request_deserializer=None,
                                     response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every RPC but health checks unless its metadata carries `authorization: Bearer TOKEN`. The check
    comes before the request is parsed: the refusal reads nothing of it."""

    def __init__(self, token: str, metrics: Metrics) -> None:
        self.token, self.metrics = BearerToken(token), metrics

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(f"/{HEALTH_SERVICE}/"):
            return handler
        if self.token.admits(str(dict(details.invocation_metadata or ()).get("authorization", ""))):
            return handler
        method, refusal = details.method.rsplit("/", 1)[-1], Unauthenticated(
            "missing or wrong bearer token: send metadata 'authorization: Bearer TOKEN'")
        self.metrics.requests.labels(method, "UNAUTHENTICATED").inc()
        log_call({"method": method, "code": "UNAUTHENTICATED", "error": str(refusal)})
        return _refusal(handler, refusal)


def _refusal(handler: grpc.RpcMethodHandler, error: Exception) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that only fails with `error`'s status, without deserializing the
    request (an unauthenticated caller's bytes are never parsed)."""
    code, message = status_for(error)

    async def refuse(request, context):
        await context.abort(code, message)

    async def refuse_stream(request, context):
        await context.abort(code, message)
        yield  # never reached; makes this an async generator, as streaming handlers are

    serialization = {"request_deserializer": None, "response_serializer": None}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream, **serialization)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **serialization)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **serialization)
    return grpc.unary_unary_rpc_method_handler(refuse, **serialization)


class GenerationServer:
    """One server's life: start (listening at once, NOT_SERVING), load the model off the event loop, serve,
    stop gracefully. `load_engine` returns a loaded `service.engine.Engine` (or anything with its interface)."""

    def __init__(self, config: ServerConfig, load_engine: Callable[[], ServedEngine], metrics: Metrics | None = None,
                 tracer_provider=None) -> None:
        """`tracer_provider`: an OpenTelemetry TracerProvider for request traces (else one exporting to
        config.otlp_endpoint, if set)."""
        self.config, self.load_engine = config, load_engine
        self.metrics = metrics or Metrics()
        if tracer_provider is None and config.otlp_endpoint:
            tracer_provider = otlp_provider(config.otlp_endpoint)
        self.tracer = RequestTracer(tracer_provider) if tracer_provider is not None else None
        self.servicer = GenerationServicer(self.metrics, config, self.tracer)
        self.port: int | None = None
        self.http_port: int | None = None
        self.metrics_port: int | None = None
        self.serving = False  # what the health service says: loaded and not draining
        self._http: tuple[HttpServer, asyncio.Task] | None = None
        self._stats: asyncio.Task | None = None
        self._metrics_http: WSGIServer | None = None
        self._loading: asyncio.Task | None = None
        self._hurry = asyncio.Event()

    def hurry(self) -> None:
        """Cut a graceful shutdown's grace period short (a second Ctrl-C)."""
        self._hurry.set()

    @property
    def backend(self) -> Backend | None:
        return self.servicer.backend

    async def start(self) -> None:
        config = self.config
        self.health = HealthServicer()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        interceptors = [BearerTokenInterceptor(config.auth_token, self.metrics)] if config.auth_token else []
        self.server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a silently shared port
        ])
        add_generation_service(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([SERVICE_NAME, HEALTH_SERVICE, reflection.SERVICE_NAME], self.server)
        address = f"{config.host}:{config.port}"
        try:
            if config.tls_cert_file:
                assert config.tls_key_file is not None  # ServerConfig refuses one without the other
                credentials = grpc.ssl_server_credentials(
                    [(Path(config.tls_key_file).read_bytes(), Path(config.tls_cert_file).read_bytes())])
                self.port = self.server.add_secure_port(address, credentials)
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError as error:  # gRPC says only "Failed to bind"; service/startup.py says why, up front
            raise ConfigError("port", f"cannot listen on {address}") from error
        await self.server.start()
        if config.http_port:
            tls = (Path(config.tls_cert_file), Path(config.tls_key_file)) if config.tls_cert_file and \
                config.tls_key_file else None
            http_server, task, self.http_port = start_http(OpenAIFrontend(self.servicer, lambda: self.serving),
                                                           config.host, config.http_port, tls)
            self._http = (http_server, task)
        if config.metrics_port is not None:
            self._metrics_http = self.metrics.serve_http(config.metrics_port, config.metrics_host)
            self.metrics_port = self._metrics_http.server_port
        self._loading = asyncio.create_task(self._load())

    async def _load(self) -> None:
        config = self.config
        engine = await _on_daemon_thread(self.load_engine)  # seconds of file hashing and the canary
        speculator = await _on_daemon_thread(lambda: create_speculator(config.speculative, engine))
        scheduler = Scheduler(engine, self.metrics, config.max_batch_size, config.max_queue, config.max_unread_tokens,
                              config.max_paused, config.prefill_chunk_tokens, config.prefill_step_seconds,
                              PrefixCache(config.prefix_cache_mb << 20) if config.prefix_cache_mb else None,
                              speculator)
        scheduler.start()
        limits = Limits(engine.context_length, engine.vocab_size, config.default_max_new_tokens,
                        config.max_stop_strings, engine.context_length * engine.tokenizer.longest_token_characters,
                        max_n=config.max_batch_size)
        self.servicer.backend = Backend(engine, scheduler, limits, GrammarCompiler(engine.tokenizer, engine.vocab_size))
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.serving = True
        self.metrics.name_model(engine.manifest.model.name)
        if config.stats_seconds:
            self._stats = asyncio.create_task(self._log_stats(config.stats_seconds))
        log.info("serving %s on %s (%s)", engine.manifest.model.name, engine.execution_provider,
                 f"{config.host}:{self.port}")

    async def _log_stats(self, every: float) -> None:
        """Every `every` seconds while there is work: generation throughput, load and KV use."""
        value = self.metrics.value
        generated, prompt = value("gptserve_generated_tokens_total"), value("gptserve_prompt_tokens_total")
        while True:
            await asyncio.sleep(every)
            now_generated, now_prompt = value("gptserve_generated_tokens_total"), value("gptserve_prompt_tokens_total")
            running, waiting = value("gptserve_active_sequences"), value("gptserve_queue_depth")
            if now_generated > generated or now_prompt > prompt or running or waiting:
                fields = {"generation_tokens_per_s": round((now_generated - generated) / every, 1),
                          "prompt_tokens_per_s": round((now_prompt - prompt) / every, 1),
                          "running": int(running), "waiting": int(waiting),
                          "kv_cache_tokens": int(value("gptserve_kv_cache_tokens")),
                          "kv_cache_usage": round(value("gptserve_kv_cache_usage_ratio"), 4)}
                stats_log.info("stats", extra={"fields": fields})
            generated, prompt = now_generated, now_prompt

    async def wait_ready(self) -> None:
        """Returns once the model is loaded; raises what loading it raised."""
        assert self._loading is not None  # start() began the load
        await self._loading

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new requests, let generations in flight finish within `grace` seconds, then end."""
        grace = self.config.grace_seconds if grace is None else grace
        self.serving = False
        await self.health.enter_graceful_shutdown()
        backend = self.backend
        if backend is not None:
            backend.scheduler.close()  # new generation requests get UNAVAILABLE from here on
        # Waiting on our own generation calls, not on every RPC as grpc's stop(grace) does: a health Watch
        # stream never ends by itself and would hold every shutdown for the whole grace period.
        waits = [asyncio.create_task(event.wait()) for event in (self.servicer.idle, self._hurry)]
        await asyncio.wait(waits, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()
        self.servicer.closing = True
        await self.server.stop(0)
        if self._http is not None:
            http_server, task = self._http
            http_server.should_exit = True
            await task
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        if self._stats is not None:
            self._stats.cancel()
        backend = self.backend  # again: the model may have finished loading during the grace period
        if backend is not None:
            await asyncio.to_thread(backend.scheduler.stop)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.provider.force_flush)


async def _cancel_the_rest() -> None:
    """Ends the tasks libraries left on a loop that is about to close (sse-starlette's shutdown watcher)."""
    rest = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)


async def _on_daemon_thread(function: Callable[[], T]) -> T:
    """`function()` on a daemon thread of its own. asyncio.to_thread's executor is joined when asyncio.run ends,
    so a SIGTERM during a long model load would wait for the load; nothing waits for a daemon thread."""
    loop = asyncio.get_running_loop()
    outcome = loop.create_future()

    def settle(result, error) -> None:
        if not outcome.done():  # the load was cancelled meanwhile
            outcome.set_exception(error) if error is not None else outcome.set_result(result)

    def run() -> None:
        try:
            result, error = function(), None
        except BaseException as caught:
            result, error = None, caught
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits for this any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="gptserve-load", daemon=True).start()
    return await outcome


async def serve(config: ServerConfig, load_engine: Callable[[], ServedEngine]) -> int:
    """The `gptserve serve` process: runs until SIGTERM or SIGINT, then shuts down gracefully. Its exit status."""
    server = GenerationServer(config, load_engine)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Before the server starts: a signal the moment it listens is already a graceful stop.
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stopping.set)
    await server.start()
    assert server._loading is not None  # start() began the load
    secure = "s" if config.tls_cert_file else ""
    log.info("listening on grpc%s://%s:%d%s (NOT_SERVING until the model is loaded)%s", secure, config.host,
             server.port, f" and http{secure}://{config.host}:{server.http_port}/v1" if server.http_port else "",
             f"; metrics on http://{config.metrics_host}:{server.metrics_port}/metrics" if server.metrics_port else "")
    stop_requested = asyncio.create_task(stopping.wait())
    await asyncio.wait([server._loading, stop_requested], return_when=asyncio.FIRST_COMPLETED)
    if server._loading.done() and server._loading.exception() is not None:
        log.error("could not load the model: %s", server._loading.exception())
        stop_requested.cancel()
        await server.stop(0)
        return 1
    await stop_requested
    log.info("shutting down: NOT_SERVING, refusing new requests, up to %.0f s for streams in flight "
             "(signal again to stop now)", config.grace_seconds)
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, server.hurry)
    await server.stop()
    log.info("stopped")
    return 0


class BackgroundServer:
    """A GenerationServer on its own event loop in a thread, for programs and tests that are not asyncio."""

    def __init__(self, config: ServerConfig, load_engine: Callable[[], ServedEngine], tracer_provider=None) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="gptserve-server", daemon=True)
        self.server = GenerationServer(config, load_engine, tracer_provider=tracer_provider)

    @property
    def port(self) -> int | None:
        return self.server.port

    @property
    def http_port(self) -> int | None:
        return self.server.http_port

    @property
    def metrics(self) -> Metrics:
        return self.server.metrics

    def _run(self, coroutine, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def start(self, timeout: float = 300.0, wait_ready: bool = True) -> BackgroundServer:
        """Listening on return; with `wait_ready`, also serving (or raising what loading the model raised)."""
        self._thread.start()
        self._run(self.server.start(), timeout)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 300.0) -> None:
        self._run(self.server.wait_ready(), timeout)

    def stop(self, grace: float = 0.0) -> None:
        if self.loop.is_running():
            self._run(self.server.stop(grace))
            self._run(_cancel_the_rest())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self.loop.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
