"""Prometheus metrics of one server, in a registry of its own (two servers in one process never mix figures)."""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Seconds; decode steps of small models on CPU take milliseconds, prefills of long prompts up to seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        registry = self.registry
        self.requests = Counter("gptserve_requests", "Finished RPCs by method and gRPC status code",
                                ["method", "code"], registry=registry)
        self.prompt_tokens = Counter("gptserve_prompt_tokens", "Prompt tokens of admitted requests", registry=registry)
        self.generated_tokens = Counter("gptserve_generated_tokens", "Tokens generated", registry=registry)
        self.time_to_first_token = Histogram("gptserve_time_to_first_token_seconds",
                                             "From receiving a request to its first token",
                                             buckets=LATENCY_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram("gptserve_inter_token_latency_seconds",
                                             "Between consecutive tokens of one request",
                                             buckets=LATENCY_BUCKETS, registry=registry)
        self.request_duration = Histogram("gptserve_request_duration_seconds",
                                          "From receiving a generation request to its end",
                                          buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_depth = Gauge("gptserve_queue_depth", "Requests waiting for a batch slot", registry=registry)
        self.active_sequences = Gauge("gptserve_active_sequences",
                                      "Sequences holding a batch slot (running or paused for a slow reader)",
                                      registry=registry)
        self.batch_size = Histogram("gptserve_batch_size", "Sequences stepped together per decode step",
                                    buckets=BATCH_BUCKETS, registry=registry)
        self.prefill_batch_size = Histogram("gptserve_prefill_batch_size",
                                            "Prompts (or chunks of one) prefilled together per pass",
                                            buckets=BATCH_BUCKETS, registry=registry)
        self.paused_sequences = Counter("gptserve_paused_sequences",
                                        "Times a sequence was paused because its client read too slowly",
                                        registry=registry)

    def serve_http(self, port: int, host: str = "127.0.0.1") -> WSGIServer:
        """Exposes /metrics; port 0 picks a free one. Returns the HTTP server (its server_port, its shutdown())."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """One sample's current value (0 when absent), for ModelInfo, logs and tests."""
        return self.registry.get_sample_value(name, labels or {}) or 0.0
