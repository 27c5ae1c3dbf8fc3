"""OpenTelemetry traces of generation requests (`--otlp-endpoint`, as TGI and vLLM offer): one span per request,
with a child span per phase (queue, prefill, decode), in the trace the client's `traceparent` names if it sends
one. Spans are written when the request ends, from the times the scheduler recorded, so tracing costs the engine
nothing. Needs the `otel` extra (`pip install 'gptserve[otel]'`); without `--otlp-endpoint` nothing of it loads.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gptserve.service.errors import ConfigError

if TYPE_CHECKING:
    from gptserve.service.server import _Call


def otlp_provider(endpoint: str) -> Any:
    """A TracerProvider that batches spans to an OTLP/gRPC collector at `endpoint` (http://host:4317)."""
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as error:
        raise ConfigError("otlp_endpoint", "tracing needs the otel extra: pip install 'gptserve[otel]'") from error
    provider = TracerProvider(resource=Resource.create({"service.name": "gptserve"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint,
                                                                    insecure=endpoint.startswith("http://"))))
    return provider


class RequestTracer:
    def __init__(self, provider: Any) -> None:
        from opentelemetry import propagate, trace

        self.provider = provider
        self._tracer = provider.get_tracer("gptserve")
        self._extract, self._in_context = propagate.extract, trace.set_span_in_context
        self._span_kind, self._status, self._error = trace.SpanKind.SERVER, trace.Status, trace.StatusCode.ERROR

    def record(self, call: _Call, carrier: Mapping[str, str]) -> None:
        """The spans of a finished generation call; `carrier` holds its headers or metadata (for `traceparent`)."""
        handle = call.handle
        if handle is None:
            return
        # The scheduler's clock is perf_counter; spans want the epoch in nanoseconds.
        offset = time.time_ns() - time.perf_counter_ns()
        at = lambda moment: int(moment * 1e9) + offset
        end = max(member.ended or time.perf_counter() for member in handle.group)
        request = handle.request
        span = self._tracer.start_span(f"gptserve {call.method}", context=self._extract(dict(carrier)),
                                       kind=self._span_kind, start_time=at(handle.submitted), attributes={
                                           "gptserve.request_id": request.request_id,
                                           "gptserve.prompt_tokens": len(request.prompt_ids),
                                           "gptserve.completion_tokens": sum(len(member.sequence.token_ids)
                                                                             for member in handle.group),
                                           "gptserve.n": request.n,
                                           "gptserve.code": call.code.name})
        if call.code.name != "OK":
            span.set_status(self._status(self._error, call.message or call.code.name))
        phases = [("queue", handle.submitted, handle.admitted), ("prefill", handle.admitted, handle.first_token),
                  ("decode", handle.first_token, end)]
        parent = self._in_context(span)
        for name, start, stop in phases:
            if start is not None and stop is not None:
                self._tracer.start_span(name, context=parent, start_time=at(start)).end(end_time=at(stop))
        span.end(end_time=at(end))
