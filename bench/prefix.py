"""Prefix caching, measured through a real `gptserve serve` child process over gRPC, with the cache on (the
default --prefix-cache-mb) and off (0), alternating rounds on the same machine:

  multi-turn chat  one conversation whose every turn resends the whole history (the chat template's) with a new
                   user message of --message-tokens, until the history passes --history-tokens: the time to first
                   token of each follow-up turn, and of the last (longest) one.
  system prompt    8 users share a system prompt of --system-tokens; each arrives alone with its own question, then
                   all 8 send a follow-up turn at once: the time to first token of a user after the first, and the
                   median of the 8 follow-ups.

Greedy replies of --reply-tokens, so both settings see the same conversations (the tests certify the tokens are
the same). Also: the bytes and positions the cache holds at the end, and its hit rate.

    python -m gptserve.bench.prefix --artifacts DIR
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
import urllib.request
from importlib.metadata import version

import numpy as np

from gptserve.export.parity import CANARY_TEXT
from gptserve.service.bench import start_server
from gptserve.service.client import GenerationClient


class Words:
    """Text of about a given number of tokens: the canary text's words in a seeded random order (filler whose
    length is what matters; the same in every round)."""

    def __init__(self, seed: int) -> None:
        self.words = CANARY_TEXT.read_text().split()
        self.rng = np.random.default_rng(seed)

    def text(self, tokens: int) -> str:
        return " ".join(self.rng.choice(self.words, int(tokens * 0.9)))  # 1.1 tokens a word (the default model)


def turn(client: GenerationClient, messages: list[dict], reply_tokens: int) -> tuple[float, str, int, int]:
    """(time to first token as the client sees it, the reply, prompt tokens, cached tokens)."""
    sent = time.perf_counter()
    first, reply, usage = None, "", None
    for message in client.stream(messages=messages, max_new_tokens=reply_tokens, ignore_eos=True):
        first = first or time.perf_counter()
        reply += "".join(token.text for token in message.tokens)
        usage = message.usage if message.HasField("usage") else usage
    assert first is not None and usage is not None
    return first - sent, reply, usage.prompt_tokens, usage.cached_tokens


def multi_turn(client: GenerationClient, args) -> list[tuple[float, int, int]]:
    """Each follow-up turn's (time to first token, prompt tokens, cached tokens)."""
    words = Words(1)
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    turns, prompt_tokens = [], 0
    while prompt_tokens < args.history_tokens:
        messages.append({"role": "user", "content": words.text(args.message_tokens)})
        ttft, reply, prompt_tokens, cached = turn(client, messages, args.reply_tokens)
        messages.append({"role": "assistant", "content": reply})
        turns.append((ttft, prompt_tokens, cached))
    return turns[1:]


def system_prompt(client: GenerationClient, args) -> tuple[list[float], list[float]]:
    """(each user's first turn, alone, after the first user's; the 8 follow-up turns sent together)."""
    words = Words(2)
    system = {"role": "system", "content": words.text(args.system_tokens)}
    chats = [[system, {"role": "user", "content": words.text(20)}] for _ in range(8)]
    alone = []
    for chat in chats:
        ttft, reply, _, _ = turn(client, chat, args.reply_tokens)
        chat += [{"role": "assistant", "content": reply}, {"role": "user", "content": words.text(20)}]
        alone.append(ttft)
    together = [0.0] * len(chats)

    def follow_up(user: int) -> None:
        together[user] = turn(client, chats[user], args.reply_tokens)[0]

    threads = [threading.Thread(target=follow_up, args=(user,)) for user in range(len(chats))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return alone[1:], together


def metric(metrics_url: str, name: str) -> float:
    lines = urllib.request.urlopen(metrics_url).read().decode().splitlines()
    return float(next((line.split()[-1] for line in lines if line.startswith(name)), 0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--history-tokens", type=int, default=1500)
    parser.add_argument("--message-tokens", type=int, default=150)
    parser.add_argument("--system-tokens", type=int, default=500)
    parser.add_argument("--reply-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per setting (medians)")
    parser.add_argument("--port", type=int, default=50081)
    args = parser.parse_args()
    target, metrics_url = f"127.0.0.1:{args.port}", f"http://127.0.0.1:{args.port + 1}/metrics"
    settings = {"cache on": [], "cache off": ["--prefix-cache-mb", "0"]}
    chats: dict[str, list] = {name: [] for name in settings}
    shared: dict[str, list] = {name: [] for name in settings}
    held: list[tuple[float, float, float]] = []
    for _ in range(args.rounds):  # alternating, so both settings see the same machine
        for name, flags in settings.items():
            server = start_server(args.artifacts, args.port, "--metrics-port", str(args.port + 1), *flags)
            try:
                with GenerationClient(target, timeout=600) as client:
                    chats[name].append(multi_turn(client, args))
                    shared[name].append(system_prompt(client, args))
                if name == "cache on":
                    held.append((metric(metrics_url, "gptserve_prefix_cache_bytes"),
                                 metric(metrics_url, "gptserve_prefix_cache_tokens"),
                                 metric(metrics_url, "gptserve_prefix_cache_hit_ratio")))
            finally:
                server.terminate()
                server.wait(60)
    print(f"machine: {os.cpu_count()} cores, {platform.platform()}; python {platform.python_version()}, "
          f"onnxruntime {version('onnxruntime')}; artifact {args.artifacts}; medians of {args.rounds} rounds")
    median = statistics.median
    figures = {}
    for name in settings:
        follow_ups = [ttft for rounds in chats[name] for ttft, _, _ in rounds]
        last = [rounds[-1][0] for rounds in chats[name]]
        alone = [ttft for first, _ in shared[name] for ttft in first]
        together = [median(second) for _, second in shared[name]]
        figures[name] = (median(follow_ups), median(last), median(alone), median(together))
    turns = chats["cache on"][0]
    print(f"multi-turn chat: {len(turns)} follow-up turns, prompts of {turns[0][1]} to {turns[-1][1]} tokens, "
          f"cached {turns[0][2]} to {turns[-1][2]}; replies of {args.reply_tokens} tokens")
    print(f"system prompt: 8 users, a system prompt of about {args.system_tokens} tokens")
    print(f"  {'time to first token, s':<44} {'cache on':>9} {'cache off':>9} {'off/on':>7}")
    labels = ("chat: a follow-up turn (median)", f"chat: the last turn ({turns[-1][1]} tokens)",
              "system prompt: a user alone, after the first", "system prompt: 8 follow-ups at once (median)")
    for index, label in enumerate(labels):
        on, off = figures["cache on"][index], figures["cache off"][index]
        print(f"  {label:<44} {on:>9.3f} {off:>9.3f} {off / on:>6.1f}x")
    nbytes, tokens, ratio = (median(values) for values in zip(*held))
    print(f"prefix cache at the end: {nbytes / 2**20:.1f} MiB, {tokens:.0f} positions; hit rate {ratio:.2f}")
    return 0


if __name__ == "__main__":
    from gptserve.cli import restart_with_huge_pages

    restart_with_huge_pages()  # measured as `gptserve` runs: on huge pages
    sys.exit(main())
