"""The server under two kinds of pressure, measured through a real `gptserve serve` child process over gRPC:

  long prompt   4 streams are running when a prompt of --prompt-tokens arrives: the longest gap between two
                tokens of a running stream while that prompt is read, chunked (the defaults) and in one step
                (--prefill-chunk-tokens at the context length), side by side in one run.
  slow readers  8 streams (a full batch) whose clients never read, then a 9th request: its latency beside the
                same request on the idle server, and the server's RSS.

    python -m gptserve.bench.limits --artifacts DIR
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from gptserve.service.bench import start_server
from gptserve.service.client import SMALL_WINDOW, GenerationClient


def rss_mb(process: subprocess.Popen) -> float:
    line = next(line for line in Path(f"/proc/{process.pid}/status").read_text().splitlines()
                if line.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def read_stream(stream, arrivals: list[float]) -> None:
    try:
        for message in stream:
            arrivals.extend([time.perf_counter()] * len(message.tokens))
    except grpc.RpcError:
        pass


def long_prompt(target: str, prompt_tokens: int) -> tuple[float, float, float]:
    """(longest gap while the prompt is read, median gap before it, the prompt's time to first token), seconds."""
    client = GenerationClient(target)
    arrivals: list[list[float]] = [[] for _ in range(4)]
    streams = [client.stream(f"Story {index}:", max_new_tokens=4000, ignore_eos=True) for index in range(4)]
    readers = [threading.Thread(target=read_stream, args=pair) for pair in zip(streams, arrivals)]
    for reader in readers:
        reader.start()
    while min(map(len, arrivals)) < 20:
        time.sleep(0.01)
    ids = np.random.default_rng(0).integers(100, 40000, prompt_tokens).tolist()
    sent = time.perf_counter()
    next(client.stream(prompt_token_ids=ids, max_new_tokens=1))
    first_token = time.perf_counter()
    for stream in streams:
        stream.cancel()
    for reader in readers:
        reader.join()
    during, before = [], []
    for times in arrivals:
        gaps = np.diff([sent, *[moment for moment in times if sent < moment < first_token], first_token])
        during.append(gaps.max())
        before += np.diff([moment for moment in times if moment < sent]).tolist()
    client.close()
    return max(during), statistics.median(before), first_token - sent


def slow_readers(target: str, server: subprocess.Popen, metrics: str) -> dict[str, float]:
    client = GenerationClient(target, timeout=300)
    request: dict[str, Any] = {"prompt": "The capital of France is", "max_new_tokens": 32, "ignore_eos": True}
    started = time.perf_counter()
    client.generate(**request)
    idle = time.perf_counter() - started
    rss_before = rss_mb(server)
    stalled = [GenerationClient(target, options=SMALL_WINDOW) for _ in range(8)]
    streams = [item.stream(f"Story {index}:", max_new_tokens=4000, ignore_eos=True)
               for index, item in enumerate(stalled)]
    for stream in streams:
        next(stream)
    paused = lambda: float(next((line.split()[-1] for line in urllib.request.urlopen(metrics).read().decode()
                                 .splitlines() if line.startswith("gptserve_paused_sequences_total")), 0))
    started = time.perf_counter()
    while paused() < 8:  # their writes back up; once max_unread_tokens more are made, they pause
        time.sleep(0.05)
    pausing = time.perf_counter() - started
    started = time.perf_counter()
    client.generate(**request)
    ninth = time.perf_counter() - started
    rss_paused = rss_mb(server)
    for stream, item in zip(streams, stalled):
        stream.cancel()
        item.close()
    client.close()
    return {"idle_s": idle, "ninth_s": ninth, "pausing_s": pausing, "rss_before_mb": rss_before,
            "rss_paused_mb": rss_paused}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--prompt-tokens", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=3, help="long-prompt rounds per setting (medians)")
    parser.add_argument("--port", type=int, default=50071)
    args = parser.parse_args()
    target = f"127.0.0.1:{args.port}"
    settings = {"chunked (defaults)": [], "one step": ["--prefill-chunk-tokens", "8192", "--prefill-step-seconds",
                                                       "1000"]}
    results: dict[str, list] = {name: [] for name in settings}
    for _ in range(args.rounds):  # alternating, so both settings see the same machine
        for name, flags in settings.items():
            server = start_server(args.artifacts, args.port, *flags)
            try:
                results[name].append(long_prompt(target, args.prompt_tokens))
            finally:
                server.terminate()
                server.wait(60)
    print(f"long prompt: {args.prompt_tokens} tokens arriving beside 4 running streams; medians of {args.rounds}")
    for name, rounds in results.items():
        longest, typical, ttft = (statistics.median(values) for values in zip(*rounds))
        print(f"  {name:<20} longest gap {longest:.3f} s (every round: {', '.join(f'{r[0]:.3f}' for r in rounds)}); "
              f"usual gap {typical * 1000:.0f} ms; the prompt's first token after {ttft:.1f} s")
    server = start_server(args.artifacts, args.port, "--max-batch-size", "8", "--stall-seconds", "600",
                          "--metrics-port", str(args.port + 1))
    try:
        figures = slow_readers(target, server, f"http://127.0.0.1:{args.port + 1}/metrics")
    finally:
        server.terminate()
        server.wait(60)
    print(f"slow readers: 8 streams stop reading (1 KiB HTTP/2 windows), all paused {figures['pausing_s']:.1f} s "
          "later; "
          f"then a 9th request of 32 tokens took {figures['ninth_s']:.2f} s (idle server: {figures['idle_s']:.2f} s); "
          f"server RSS {figures['rss_before_mb']:.0f} MB before, {figures['rss_paused_mb']:.0f} MB with the 8 paused")
    return 0


if __name__ == "__main__":
    from gptserve.cli import restart_with_huge_pages

    restart_with_huge_pages()  # measured as `gptserve` runs: on huge pages
    sys.exit(main())
