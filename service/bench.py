"""`gptserve bench-serve`: the server under 1, 4, 8, 16 concurrent greedy streams, over gRPC and over the
OpenAI-compatible HTTP API, side by side with the same engine driven in this process, in one run.

The ways to run the same requests, one after the other so they never share the CPU:
  engine     the bare generate loop on the engine (one stream only): the ceiling for one stream
  scheduler  the server's own scheduler in this process, without gRPC: what batching gives
  grpc       a real `gptserve serve` child process (without speculative decoding, so that every path does the
             same work), called over a local gRPC channel: what clients see
  openai     the same child process, called over HTTP (streamed /v1/completions)
  genai      with --genai DIR: onnxruntime-genai in this process on its own export of the model, the streams as
             one batch (it has no continuous batching; prompts padded to the batch's longest): the peer to beat
With --target, only the served figures of a server already running elsewhere (behind nginx, over TLS, with a
token): what a deployment gives. Each request ignores EOS, so every stream produces exactly --max-new-tokens
tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import grpc
import numpy as np

from gptserve.model.generation import Sequence, StoppingParams, generate
from gptserve.model.sampling import SamplingParams
from gptserve.service.api import GenerationRequest
from gptserve.service.client import GenerationClient
from gptserve.service.errors import ConfigError
from gptserve.service.metrics import Metrics
from gptserve.service.scheduler import Scheduler

# Prompts of different lengths, so batched rows are ragged as in real traffic.
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain in simple words how a refrigerator keeps food cold, step by step.",
    "List three prime numbers:",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "def fibonacci(n):",
    "Translate to French: Good morning, how are you today?",
    "The three laws of thermodynamics are",
    "Q: What is the boiling point of water at sea level?\nA:",
    "A recipe for pancakes needs",
    "In 1969, the first humans to walk on the Moon were",
    "Why is the sky blue?",
    "Here is a list of things to pack for a camping trip:",
    "The difference between a virus and a bacterium is",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "import numpy as np\n# compute the mean of an array\n",
]


@dataclass
class StreamRecord:
    started: float
    arrivals: list[float]  # one per token, when the caller received it


@dataclass
class Figures:
    path: str
    streams: int
    requests: int
    tokens: int
    seconds: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    tokens_per_second: float


def summarise(path: str, streams: int, records: list[StreamRecord], seconds: float) -> Figures:
    ttft = [record.arrivals[0] - record.started for record in records if record.arrivals]
    itl = [later - earlier for record in records for earlier, later in zip(record.arrivals, record.arrivals[1:])]
    tokens = sum(len(record.arrivals) for record in records)
    milliseconds = lambda values, q: float(np.percentile(values, q) * 1000) if values else float("nan")
    return Figures(path, streams, len(records), tokens, seconds, milliseconds(ttft, 50), milliseconds(ttft, 99),
                   milliseconds(itl, 50), milliseconds(itl, 99), tokens / seconds)


def prompt_for(stream: int, round_number: int, streams: int) -> str:
    return PROMPTS[(stream + round_number * streams) % len(PROMPTS)]


def bench_genai(runner, tokenizer, streams: int, rounds: int, max_new_tokens: int) -> Figures:
    """onnxruntime-genai (bench/runners.py's GenaiRunner): each round one batch of `streams` rows, the prompts
    padded in front to the longest, as genai batches prompts of different lengths: it reads what we read."""
    records = []
    started = time.perf_counter()
    for round_number in range(rounds):
        ids = [tokenizer.encode(prompt_for(stream, round_number, streams)) for stream in range(streams)]
        width = max(map(len, ids))
        batch = np.array([[runner.pad_token_id] * (width - len(row)) + list(row) for row in ids], dtype=np.int64)
        sent = time.perf_counter()
        stamps, _tokens = runner.decode(batch, max_new_tokens)
        records += [StreamRecord(sent, stamps) for _ in range(streams)]
    return summarise("genai", streams, records, time.perf_counter() - started)


def bench_engine_loop(engine, rounds: int, max_new_tokens: int) -> Figures:
    records = []
    started = time.perf_counter()
    for round_number in range(rounds):
        ids = engine.tokenizer.encode(prompt_for(0, round_number, 1))
        record = StreamRecord(time.perf_counter(), [])
        # No logprobs, as the served requests ask for none: the same work per token.
        sequence = Sequence(engine.tokenizer, ids, SamplingParams(), StoppingParams(max_new_tokens, (), True),
                            with_logprobs=False)
        arrived = lambda _event, record=record: record.arrivals.append(time.perf_counter())
        generate(engine.step, sequence, on_token=arrived)
        records.append(record)
    return summarise("engine", 1, records, time.perf_counter() - started)


async def _scheduler_streams(engine, streams: int, rounds: int, max_new_tokens: int) -> Figures:
    scheduler = Scheduler(engine, Metrics(), max_batch_size=streams, max_queue=streams)
    scheduler.start()
    records: list[StreamRecord] = []

    async def one_stream(stream: int) -> None:
        for round_number in range(rounds):
            ids = tuple(engine.tokenizer.encode(prompt_for(stream, round_number, streams)))
            request = GenerationRequest(f"{stream}-{round_number}", ids, SamplingParams(),
                                        StoppingParams(max_new_tokens, (), True))
            record = StreamRecord(time.perf_counter(), [])
            async for events, _done in scheduler.submit(request).updates():
                record.arrivals.extend([time.perf_counter()] * len(events))
            records.append(record)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(one_stream(stream) for stream in range(streams)))
    finally:
        await asyncio.to_thread(scheduler.stop)
    return summarise("scheduler", streams, records, time.perf_counter() - started)


@dataclass(frozen=True)
class Target:
    """A running server: host:port, and how to reach it."""

    address: str
    token: str | None = None
    tls: bool = False
    ca_file: str | None = None


async def _measure(path: str, streams: int, rounds: int,
                   one_request: Callable[[str, StreamRecord], Awaitable[None]]) -> Figures:
    """`streams` concurrent callers, each sending `rounds` requests one after another, after one warm-up request
    (connection, first allocations)."""
    records: list[StreamRecord] = []

    async def one_stream(stream: int) -> None:
        for round_number in range(rounds):
            record = StreamRecord(time.perf_counter(), [])
            await one_request(prompt_for(stream, round_number, streams), record)
            records.append(record)

    await one_stream(0)
    records.clear()
    started = time.perf_counter()
    await asyncio.gather(*(one_stream(stream) for stream in range(streams)))
    return summarise(path, streams, records, time.perf_counter() - started)


async def _grpc_streams(target: Target, streams: int, rounds: int, max_new_tokens: int) -> Figures:
    from gptserve.service.client import build_request, channel_credentials
    from gptserve.v1 import generation_pb2_grpc as pb_grpc

    metadata = (("authorization", f"Bearer {target.token}"),) if target.token else ()
    credentials = channel_credentials(target.tls, target.ca_file)
    channel = grpc.aio.secure_channel(target.address, credentials) if credentials else \
        grpc.aio.insecure_channel(target.address)
    async with channel:
        stub = pb_grpc.TextGenerationStub(channel)

        async def one_request(prompt: str, record: StreamRecord) -> None:
            request = build_request(prompt, max_new_tokens=max_new_tokens, ignore_eos=True)
            async for message in stub.GenerateStream(request, metadata=metadata):
                record.arrivals.extend([time.perf_counter()] * len(message.tokens))

        return await _measure("grpc", streams, rounds, one_request)


async def _openai_streams(target: Target, streams: int, rounds: int, max_new_tokens: int) -> Figures:
    """Streamed /v1/completions over HTTP, read as server-sent events; vLLM's `return_token_ids` counts tokens
    even when one event carries several."""
    import httpx

    scheme = "https" if target.tls else "http"
    headers = {"Authorization": f"Bearer {target.token}"} if target.token else {}
    verify: bool | str = target.ca_file or True
    async with httpx.AsyncClient(base_url=f"{scheme}://{target.address}", headers=headers, verify=verify,
                                 timeout=None, limits=httpx.Limits(max_connections=streams + 1)) as client:
        model = (await client.get("/v1/models")).raise_for_status().json()["data"][0]["id"]

        async def one_request(prompt: str, record: StreamRecord) -> None:
            body = {"model": model, "prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "return_token_ids": True}
            async with client.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        tokens = len(json.loads(line[6:])["choices"][0]["token_ids"])
                        record.arrivals.extend([time.perf_counter()] * tokens)

        return await _measure("openai", streams, rounds, one_request)


STREAMS = {"grpc": _grpc_streams, "openai": _openai_streams}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(folder: Path | str, port: int, *flags: str) -> subprocess.Popen:
    """A `gptserve serve` child process on 127.0.0.1:port, returned once it is SERVING (its exit is an error)."""
    server = subprocess.Popen([sys.executable, "-m", "gptserve", "serve", "--artifacts", str(folder), "--port",
                               str(port), "--http-port", "0", "--log-level", "warning", *flags])
    with GenerationClient(f"127.0.0.1:{port}") as client:
        while server.poll() is None:
            try:
                client.wait_until_serving(timeout=1)
                return server
            except (grpc.FutureTimeoutError, grpc.RpcError):  # not listening, or not serving yet
                pass
    raise SystemExit(f"the server exited with status {server.returncode}")


def machine_description(engine) -> list[str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    versions = ", ".join(f"{name} {version(name)}" for name in ("onnxruntime", "grpcio", "numpy", "gptserve"))
    return [
        f"machine: {cpu or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        f"python {platform.python_version()}, {versions}",
        f"model: {engine.manifest.model.name} ({engine.manifest.precision}) on {engine.execution_provider}",
    ]


def format_table(figures: list[Figures]) -> str:
    header = (f"{'streams':>7}  {'path':<9}  {'ttft p50':>9}  {'ttft p99':>9}  {'itl p50':>8}  {'itl p99':>8}  "
              f"{'tokens/s':>9}  {'tokens':>6}")
    lines = [header, "-" * len(header)]
    for item in figures:
        lines.append(f"{item.streams:>7}  {item.path:<9}  {item.ttft_p50_ms:>7.1f}ms  {item.ttft_p99_ms:>7.1f}ms  "
                     f"{item.itl_p50_ms:>6.1f}ms  {item.itl_p99_ms:>6.1f}ms  {item.tokens_per_second:>9.1f}  "
                     f"{item.tokens:>6}")
    return "\n".join(lines)


def _served(targets: dict[str, Target], args, streams: int) -> list[Figures]:
    return [asyncio.run(STREAMS[protocol](target, streams, args.rounds, args.max_new_tokens))
            for protocol, target in targets.items()]


def median_figures(runs: list[Figures]) -> Figures:
    """One path at one concurrency over several repeats: each figure's median."""
    middle = lambda values: float(np.median(values))
    first = runs[0]
    return Figures(first.path, first.streams, sum(run.requests for run in runs), sum(run.tokens for run in runs),
                   middle([run.seconds for run in runs]),
                   *(middle([getattr(run, name) for run in runs]) for name in
                     ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "tokens_per_second")))


def run_bench_target(args) -> int:
    """Served figures only, of a server running elsewhere."""
    import httpx

    from gptserve.service.client import read_token

    target = Target(args.target, read_token(args.token_file), args.tls or bool(args.tls_ca), args.tls_ca)
    print(f"target: {args.target} over {args.protocol[0]}; greedy, EOS ignored, {args.max_new_tokens} new tokens "
          f"each, {args.rounds} per stream", flush=True)
    try:
        figures = [figure for _ in range(args.repeats) for streams in args.concurrency
                   for figure in _served({args.protocol[0]: target}, args, streams)]
    except grpc.RpcError as error:
        raise ConfigError("--target", f"{args.target}: {error.code().name}: {error.details()}") from None
    except httpx.HTTPStatusError as error:
        raise ConfigError("--target", f"{args.target}: HTTP {error.response.status_code}: "
                                      f"{error.response.text[:300]}") from None
    except (httpx.HTTPError, OSError) as error:
        raise ConfigError("--target", f"{args.target}: {error}") from None
    return report(figures, args)


def run_bench(folder: Path, args) -> int:
    """Every path in turn, repeat after repeat, so a slow spell of a shared machine falls on all of them alike;
    medians over the repeats."""
    from gptserve.service.engine import Engine

    engine = Engine.load(folder, "auto", args.threads)
    print("\n".join(machine_description(engine)), flush=True)
    print(f"requests: greedy, EOS ignored, {args.max_new_tokens} new tokens each, {args.rounds} per stream, "
          f"prompts of {min(map(len, PROMPTS))}-{max(map(len, PROMPTS))} characters", flush=True)
    bench_engine_loop(engine, 1, 8)  # warm-up
    genai = None
    if args.genai:
        from gptserve.bench.runners import GenaiRunner

        genai = GenaiRunner(args.genai, args.threads or os.cpu_count() or 1)
        bench_genai(genai, engine.tokenizer, 1, 1, 8)  # warm-up
    port, http_port, slots = free_port(), free_port(), str(max(args.concurrency))
    # No speculation: every path does the same work, so the figures say what serving costs (the speculative
    # decoding bench is bench/speculative.py).
    server = start_server(folder, port, "--http-port", str(http_port), "--max-batch-size", slots, "--max-queue",
                          slots, "--speculative", "off", *(["--threads", str(args.threads)] if args.threads else []))
    targets = {protocol: Target(address) for protocol, address in
               (("grpc", f"127.0.0.1:{port}"), ("openai", f"127.0.0.1:{http_port}")) if protocol in args.protocol}
    figures: list[Figures] = []
    try:
        for _ in range(args.repeats):
            for streams in args.concurrency:
                if streams == 1:
                    figures.append(bench_engine_loop(engine, args.rounds, args.max_new_tokens))
                figures.append(asyncio.run(_scheduler_streams(engine, streams, args.rounds, args.max_new_tokens)))
                figures += _served(targets, args, streams)
                if genai is not None:
                    figures.append(bench_genai(genai, engine.tokenizer, streams, args.rounds, args.max_new_tokens))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    return report(figures, args)


def report(runs: list[Figures], args) -> int:
    order = {"engine": 0, "scheduler": 1, "grpc": 2, "openai": 3, "genai": 4}
    grouped: dict[tuple[str, int], list[Figures]] = {}
    for run in runs:
        grouped.setdefault((run.path, run.streams), []).append(run)
    figures = sorted(map(median_figures, grouped.values()), key=lambda item: (item.streams, order[item.path]))
    print(f"medians of {args.repeats} repeats, each path in turn")
    print(format_table(figures))
    by_key = {(item.path, item.streams): item for item in figures}
    for path, name in (("grpc", "gRPC"), ("openai", "HTTP")):
        for streams in args.concurrency:
            served = by_key.get((path, streams))
            if served is None:
                continue
            # The in-process engine at the same batch: the bare loop for one stream, the scheduler for several.
            local = by_key.get(("engine", 1) if streams == 1 else ("scheduler", streams))
            if local:
                print(f"{streams} streams over {name}: {served.tokens_per_second / local.tokens_per_second:.1%} of "
                      f"the in-process {local.path}'s tokens/s (target: at least 97%)")
            if peer := by_key.get(("genai", streams)):
                print(f"{streams} streams over {name}: {served.tokens_per_second / peer.tokens_per_second:.2f}x "
                      "onnxruntime-genai in process (target: at least 1.0)")
        if (path, 1) in by_key and (path, 8) in by_key:
            scaling = by_key[(path, 8)].tokens_per_second / by_key[(path, 1)].tokens_per_second
            print(f"8 streams over {name}: {scaling:.2f}x the aggregate tokens/s of one")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(item) for item in figures], indent=2) + "\n")
    return 0
