"""Prometheus metrics of one server, in a registry of its own (two servers in one process never mix figures).

Every sample carries the served model's name as `model_name` (once it is loaded), as vLLM's do, so one dashboard
tells models apart; the process collector adds RSS, CPU time and open files. README.md lists every family.
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# No `_created` series beside every counter and histogram: they double the output and no dashboard reads them.
disable_created_metrics()

# Seconds; decode steps of small models on CPU take milliseconds, whole replies on a CPU minutes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                   40.96, 81.92, 163.84, 327.68, 655.36)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LENGTH_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 131072)


class _ModelNamed(Collector):
    """The families of `source` with `model_name` added to every sample (none until the model is known)."""

    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source
        self.model_name: str | None = None

    def collect(self):
        for family in self.source.collect():
            if self.model_name is None:
                yield family
                continue
            named = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                named.add_sample(sample.name, {**sample.labels, "model_name": self.model_name}, sample.value,
                                 sample.timestamp, sample.exemplar)
            yield named


class Metrics:
    def __init__(self) -> None:
        # The families are made in `own`; `registry`, which is exposed, shows them with the model's name added.
        own = CollectorRegistry(auto_describe=True)
        self._named = _ModelNamed(own)
        self.registry = CollectorRegistry()
        self.registry.register(self._named)
        ProcessCollector(registry=self.registry)
        self.requests = Counter("gptserve_requests", "Finished calls (gRPC methods and HTTP routes) by gRPC status "
                                "code", ["method", "code"], registry=own)
        self.finished = Counter("gptserve_request_finished", "Sequences that ended, by finish reason (eos, stop, "
                                "length; cancelled: their client left; failed)", ["finish_reason"], registry=own)
        self.prompt_tokens = Counter("gptserve_prompt_tokens", "Prompt tokens read by the engine (not those taken "
                                     "from the prefix cache)", registry=own)
        self.generated_tokens = Counter("gptserve_generated_tokens", "Tokens generated", registry=own)
        self.prompt_length = Histogram("gptserve_request_prompt_tokens", "Prompt tokens per admitted request",
                                       buckets=LENGTH_BUCKETS, registry=own)
        self.generation_length = Histogram("gptserve_request_generation_tokens", "Tokens generated per sequence "
                                           "that ended", buckets=LENGTH_BUCKETS, registry=own)
        self.queue_time = Histogram("gptserve_request_queue_time_seconds", "From receiving a request to its "
                                    "admission into the batch", buckets=LATENCY_BUCKETS, registry=own)
        self.time_to_first_token = Histogram("gptserve_time_to_first_token_seconds",
                                             "From receiving a request to its first token",
                                             buckets=LATENCY_BUCKETS, registry=own)
        self.inter_token_latency = Histogram("gptserve_inter_token_latency_seconds",
                                             "Between consecutive tokens of one request",
                                             buckets=LATENCY_BUCKETS, registry=own)
        self.request_duration = Histogram("gptserve_request_duration_seconds",
                                          "From receiving a generation request to its end",
                                          buckets=LATENCY_BUCKETS, registry=own)
        self.queue_depth = Gauge("gptserve_queue_depth", "Requests waiting for a batch slot", registry=own)
        self.active_sequences = Gauge("gptserve_active_sequences",
                                      "Sequences holding a batch slot (running or paused for a slow reader)",
                                      registry=own)
        self.kv_cache_tokens = Gauge("gptserve_kv_cache_tokens", "Positions held in KV caches (running, paused "
                                     "and half-read prompts)", registry=own)
        self.kv_cache_usage = Gauge("gptserve_kv_cache_usage_ratio", "KV cache positions held over the budget "
                                    "(max batch size x context length)", registry=own)
        # The prefix cache's hit rate is hits over queries (vLLM's pair of counters): rate() of both over a window.
        self.prefix_cache_queries = Counter("gptserve_prefix_cache_queries", "Prompt tokens of requests admitted "
                                            "while the prefix cache is on", registry=own)
        self.prefix_cache_hits = Counter("gptserve_prefix_cache_hits", "Of those, the tokens taken from the "
                                         "prefix cache (cached_tokens in usage)", registry=own)
        self.prefix_cache_hit_ratio = Gauge("gptserve_prefix_cache_hit_ratio", "Hits over queries since the "
                                            "server started", registry=own)
        self.prefix_cache_bytes = Gauge("gptserve_prefix_cache_bytes", "Bytes of KV the prefix cache holds (at "
                                        "most --prefix-cache-mb)", registry=own)
        self.prefix_cache_tokens = Gauge("gptserve_prefix_cache_tokens", "Positions the prefix cache holds",
                                         registry=own)
        # Speculative decoding (--speculative): the acceptance rate is accepted over drafted.
        self.speculative_drafted = Counter("gptserve_speculative_draft_tokens", "Tokens guessed by the drafter "
                                           "and verified by the model", registry=own)
        self.speculative_accepted = Counter("gptserve_speculative_accepted_tokens", "Of those, the tokens the "
                                            "model's own sampling confirmed", registry=own)
        self.speculative_acceptance = Gauge("gptserve_speculative_acceptance_ratio", "Accepted over drafted since "
                                            "the server started", registry=own)
        self.batch_size = Histogram("gptserve_batch_size", "Sequences stepped together per decode step",
                                    buckets=BATCH_BUCKETS, registry=own)
        self.prefill_batch_size = Histogram("gptserve_prefill_batch_size",
                                            "Prompts (or chunks of one) prefilled together per pass",
                                            buckets=BATCH_BUCKETS, registry=own)
        self.paused_sequences = Counter("gptserve_paused_sequences",
                                        "Times a sequence was paused because its client read too slowly",
                                        registry=own)

    def name_model(self, model_name: str) -> None:
        """From now on every sample says which model it is about."""
        self._named.model_name = model_name

    def serve_http(self, port: int, host: str = "127.0.0.1") -> WSGIServer:
        """Exposes /metrics; port 0 picks a free one. Returns the HTTP server (its server_port, its shutdown())."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """One sample's current value (0 when absent), for ModelInfo, logs and tests; labels without model_name."""
        return self._named.source.get_sample_value(name, labels or {}) or 0.0
