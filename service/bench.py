"""`gptserve bench-serve`: the gRPC server under 1, 4, 8, 16 concurrent greedy streams, side by side with the
same engine driven in this process, in one run.

Three ways to run the same requests, one after the other so they never share the CPU:
  engine     the bare generate loop on the engine (one stream only): the ceiling for one stream
  scheduler  the server's own scheduler in this process, without gRPC: what batching gives
  grpc       a real `gptserve serve` child process, called over a local gRPC channel: what clients see
Each request ignores EOS, so every stream produces exactly --max-new-tokens tokens.
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
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import grpc
import numpy as np

from gptserve.model.generation import Sequence, StoppingParams, generate
from gptserve.model.sampling import SamplingParams
from gptserve.service.api import GenerationRequest
from gptserve.service.client import GenerationClient
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


def bench_engine_loop(engine, rounds: int, max_new_tokens: int) -> Figures:
    records = []
    started = time.perf_counter()
    for round_number in range(rounds):
        ids = engine.tokenizer.encode(prompt_for(0, round_number, 1))
        record = StreamRecord(time.perf_counter(), [])
        sequence = Sequence(engine.tokenizer, ids, SamplingParams(), StoppingParams(max_new_tokens, (), True))
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


async def _grpc_streams(target: str, streams: int, rounds: int, max_new_tokens: int) -> Figures:
    import grpc

    from gptserve.service.client import build_request
    from gptserve.v1 import generation_pb2_grpc as pb_grpc

    records: list[StreamRecord] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.TextGenerationStub(channel)

        async def one_stream(stream: int) -> None:
            for round_number in range(rounds):
                request = build_request(prompt_for(stream, round_number, streams), max_new_tokens=max_new_tokens,
                                        ignore_eos=True)
                record = StreamRecord(time.perf_counter(), [])
                async for message in stub.GenerateStream(request):
                    record.arrivals.extend([time.perf_counter()] * len(message.tokens))
                records.append(record)

        await one_stream(0)  # warm-up: connection, first allocations
        records.clear()
        started = time.perf_counter()
        await asyncio.gather(*(one_stream(stream) for stream in range(streams)))
    return summarise("grpc", streams, records, time.perf_counter() - started)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(folder: Path | str, port: int, *flags: str) -> subprocess.Popen:
    """A `gptserve serve` child process on 127.0.0.1:port, returned once it is SERVING (its exit is an error)."""
    server = subprocess.Popen([sys.executable, "-m", "gptserve", "serve", "--artifacts", str(folder), "--port",
                               str(port), "--log-level", "warning", *flags])
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


def run_bench(folder: Path, args) -> int:
    from gptserve.service.engine import Engine

    engine = Engine.load(folder, "auto", args.threads)
    print("\n".join(machine_description(engine)), flush=True)
    print(f"requests: greedy, EOS ignored, {args.max_new_tokens} new tokens each, {args.rounds} per stream, "
          f"prompts of {min(map(len, PROMPTS))}-{max(map(len, PROMPTS))} characters", flush=True)
    figures = []
    bench_engine_loop(engine, 1, 8)  # warm-up
    figures.append(bench_engine_loop(engine, args.rounds, args.max_new_tokens))
    for streams in args.concurrency:
        figures.append(asyncio.run(_scheduler_streams(engine, streams, args.rounds, args.max_new_tokens)))

    port, slots = free_port(), str(max(args.concurrency))
    server = start_server(folder, port, "--max-batch-size", slots, "--max-queue", slots,
                          *(["--threads", str(args.threads)] if args.threads else []))
    try:
        for streams in args.concurrency:
            figures.append(asyncio.run(_grpc_streams(f"127.0.0.1:{port}", streams, args.rounds, args.max_new_tokens)))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)

    order = {"engine": 0, "scheduler": 1, "grpc": 2}
    figures.sort(key=lambda item: (item.streams, order[item.path]))
    print(format_table(figures))
    by_key = {(item.path, item.streams): item for item in figures}
    if ("grpc", 1) in by_key:
        one = by_key[("grpc", 1)].tokens_per_second
        print(f"one stream over gRPC: {one / by_key[('engine', 1)].tokens_per_second:.1%} of the bare engine loop's "
              f"tokens/s, {one / by_key[('scheduler', 1)].tokens_per_second:.1%} of the in-process scheduler's "
              "(target: within 10%)")
        if ("grpc", 8) in by_key:
            print(f"8 streams over gRPC: {by_key[('grpc', 8)].tokens_per_second / one:.2f}x the aggregate tokens/s "
                  "of one (target: at least 4x)")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(item) for item in figures], indent=2) + "\n")
    return 0
