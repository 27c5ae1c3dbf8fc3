"""Speculative decoding, measured through real `gptserve serve` children over gRPC: one stream at a time, greedy,
exactly --new-tokens tokens each (EOS ignored), on chat prompts that copy from their input and on one that does not:

  rewrite      rewrite a ~500-token passage (the canary story and a history of bread) in plain words
  summarize    summarize the same passage
  code-edit    rename a class in a 200-line Python file (the start of gptserve's scheduler), returning the whole file
  document-qa  answer a question about the passage, quoting the sentences that answer it
  story        an open-ended story: nothing to copy, so speculation must not lose (target: at least 0.97x off)

The systems, each started once and kept running; every round runs each of them once per workload, in turn (in the
opposite order every other round), and the figures are medians over --rounds:

  off          `gptserve serve --speculative off`
  ngram        `--speculative ngram`: prompt lookup
  draft        `--speculative draft:DIR`, with --draft DIR
  genai-fp32   onnxruntime-genai in this process, on its model builder's export at the artifact's precision (fp32,
               or genai-int4 for an int4 artifact; built once into --cache)
  llama.cpp    llama-cpp-python's prompt lookup decoding on the default Q4_1 GGUF, where llama_cpp imports (from
               this environment, or where `gptserve bench` compiled it into --cache)

Decode tok/s is the client's: the tokens after the first over the time after the first arrived; end-to-end tok/s
counts every token over the time since the request was sent (prompt included: the servers run without a prefix
cache, so every run prefills). The token ids of ngram and draft must be those of off (exit 1 where not); the
acceptance ratio is a server's accepted over drafted tokens (its /metrics) during the workload's runs.

    python -m gptserve.bench.speculative --artifacts DIR [--draft DIR] [--new-tokens 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np

from gptserve.bench import prepare
from gptserve.bench.prefix import metric
from gptserve.bench.run import machine, versions
from gptserve.bench.runners import GenaiRunner
from gptserve.bench.workload import LONG_TEXT
from gptserve.export.parity import CANARY_TEXT
from gptserve.model.tokenizer import Tokenizer
from gptserve.service import scheduler
from gptserve.service.bench import free_port, start_server
from gptserve.service.client import GenerationClient

CODE_LINES = 200
RENAMED = ("RequestHandle", "StreamHandle")  # a class the first CODE_LINES lines of the scheduler define and use
QUESTION = "What did the letter from the harbour office say, and what did the keeper do with it?"
STORY_TARGET = 0.97  # ngram over off's decode tok/s where there is nothing to copy
# Between runs: the last system's idle threads (ONNX Runtime's and llama.cpp's spin a while) must not take the
# next one's cores.
SETTLE_SECONDS = 0.5
COUNTERS = ("gptserve_speculative_draft_tokens_total", "gptserve_speculative_accepted_tokens_total")


def passage() -> str:
    """About 500 tokens of prose shipped with the package: the canary story, its line breaks undone, and the
    bench's history of bread."""
    story = [" ".join(paragraph.split()) for paragraph in CANARY_TEXT.read_text().split("\n\n")]
    return "\n\n".join([*story, LONG_TEXT])


def code_file() -> str:
    """The first CODE_LINES lines of gptserve's scheduler module, as installed."""
    lines = Path(scheduler.__file__).read_text().splitlines(keepends=True)
    return "".join(lines[:CODE_LINES])


def workloads(tokenizer: Tokenizer) -> dict[str, list[int]]:
    """Each workload's prompt token ids: one user message through the model's chat template."""
    text = passage()
    messages = {
        "rewrite": "Rewrite the following passage in simple, plain English. Keep every detail and the order of "
                   f"events, and return only the rewritten passage.\n\n{text}",
        "summarize": f"Summarize the following passage in one paragraph.\n\n{text}",
        "code-edit": f"Rename the class {RENAMED[0]} to {RENAMED[1]} everywhere in the following Python file. "
                     f"Return the whole file with the change, and nothing else.\n\n```python\n{code_file()}```",
        "document-qa": "Answer the question from the document below. First quote, word for word, the sentences of "
                       "the document that answer it, then give the answer in one sentence.\n\n"
                       f"Document:\n{text}\n\nQuestion: {QUESTION}",
        "story": "Write an original story about a clockmaker who finds that one of her clocks runs backwards.",
    }
    return {name: tokenizer.encode_chat([{"role": "user", "content": content}])[0]
            for name, content in messages.items()}


@dataclass(frozen=True)
class Run:
    sent: float  # when the request left the caller
    stamps: list[float]  # when each token reached it
    tokens: list[int]

    def decode_rate(self) -> float:
        return (len(self.stamps) - 1) / (self.stamps[-1] - self.stamps[0])

    def end_to_end_rate(self) -> float:
        return len(self.stamps) / (self.stamps[-1] - self.sent)


Generate = Callable[[list[int], int], Run]  # (prompt ids, new tokens) -> the run


@dataclass(frozen=True)
class System:
    name: str
    generate: Generate
    metrics_url: str | None = None  # a speculative server's /metrics
    ours: bool = False


def served(client: GenerationClient) -> Generate:
    def generate(ids: list[int], new_tokens: int) -> Run:
        sent, stamps, tokens = time.perf_counter(), [], []
        for message in client.stream(prompt_token_ids=ids, max_new_tokens=new_tokens, temperature=0.0,
                                     ignore_eos=True):
            stamps += [time.perf_counter()] * len(message.tokens)  # several at once where guesses held
            tokens += [token.id for token in message.tokens]
        return Run(sent, stamps, tokens)

    return generate


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(60)


def start_ours(args, stack: ExitStack) -> list[System]:
    """A server per --speculative mode, and a client of it; `stack` closes the client, then stops the server."""
    modes = {"off": "off", "ngram": "ngram", **({"draft": f"draft:{args.draft}"} if args.draft else {})}
    systems = []
    for name, mode in modes.items():
        port, metrics_port = free_port(), free_port()
        # No prefix cache: every round prefills its prompt, as the baselines do.
        stack.callback(stop, start_server(args.artifacts, port, "--metrics-port", str(metrics_port),
                                          "--prefix-cache-mb", "0", "--speculative", mode))
        client = stack.enter_context(GenerationClient(f"127.0.0.1:{port}", timeout=600))
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics" if mode != "off" else None
        systems.append(System(name, served(client), metrics_url, ours=True))
    return systems


def genai(cache: Path, threads: int, precision: str) -> System | None:
    """onnxruntime-genai on its own build at the artifact's precision (fp32, or int4 for an int4 artifact)."""
    precision = "int4" if precision == "int4" else "fp32"
    try:
        runner = GenaiRunner(str(prepare.genai_model(cache, precision)), threads)
    except Exception as error:  # not built or not loadable: the bench goes on without it
        first_line = str(error).partition("\n")[0]  # a failed build's message goes on with its log's tail
        print(f"genai-{precision}: left out ({type(error).__name__}: {first_line})", flush=True)
        return None

    def generate(ids: list[int], new_tokens: int) -> Run:
        sent = time.perf_counter()
        stamps, tokens = runner.decode(np.array([ids], dtype=np.int64), new_tokens)
        return Run(sent, stamps, tokens[0].tolist())

    return System(f"genai-{precision}", generate)


def llama_cpp(cache: Path, threads: int) -> System | None:
    """llama-cpp-python's Llama.generate with LlamaPromptLookupDecoding as its draft model, if it imports."""
    compiled = cache / "llama-cpp-python"  # where `gptserve bench` compiles it; never built here
    if compiled.is_dir():
        sys.path.append(str(compiled))  # after the environment's own packages
    try:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    except ImportError as error:
        print(f"llama.cpp: not installed ({error})", flush=True)
        return None
    from gptserve.model.fetch import fetch_default_gguf

    # No repacked weight buffers where the binding lets us say so: see runners.LlamaCppRunner.
    options = {"use_extra_bufts": False} if "use_extra_bufts" in inspect.signature(Llama).parameters else {}
    # logits_all: verifying guesses reads every position's logits (its scores buffer is otherwise n_batch rows).
    llm = Llama(str(fetch_default_gguf()), n_ctx=8192, n_threads=threads, n_threads_batch=threads, verbose=False,
                logits_all=True, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10), **options)

    def generate(ids: list[int], new_tokens: int) -> Run:
        llm.reset()  # no reuse of the last run's prompt: every run prefills, as ours do
        sent, stamps, tokens = time.perf_counter(), [], []
        # generate() never stops by itself, EOS included: exactly new_tokens greedy tokens.
        for token in itertools.islice(llm.generate(ids, temp=0.0, repeat_penalty=1.0), new_tokens):
            stamps.append(time.perf_counter())
            tokens.append(int(token))
        return Run(sent, stamps, tokens)

    return System("llama.cpp", generate)


def speculation_counts(system: System) -> np.ndarray:
    """(drafted, accepted) tokens since the server started; zeros for a system that does not speculate."""
    return np.array([metric(system.metrics_url, name) for name in COUNTERS] if system.metrics_url else [0.0, 0.0])


def table(workload: str, prompt: int, systems: list[System], runs: dict,
          counts: dict) -> tuple[list[str], str, list[str]]:
    """The workload's table, its summary line, and a MISMATCH line per system of ours whose tokens are not off's."""
    median = lambda name, rate: statistics.median(getattr(run, rate)() for run in runs[name, workload])
    decode = {system.name: median(system.name, "decode_rate") for system in systems}
    genai_rate = next((rate for name, rate in decode.items() if name.startswith("genai-")), None)
    lines = [f"{workload} ({prompt}-token prompt)",
             f"  {'system':<11} {'decode tok/s':>12} {'e2e tok/s':>9} {'vs off':>7} {'vs genai':>8} "
             f"{'accepted':>8} {'same tokens':>11}"]
    mismatches, speedups = [], []
    for system in systems:
        name = system.name
        drafted, accepted = counts[name, workload]
        same = all(run.tokens == off.tokens for run, off in zip(runs[name, workload], runs["off", workload]))
        acceptance = f"{accepted / drafted:.2f}" if drafted else "-"
        versus_genai = f"{decode[name] / genai_rate:.2f}x" if genai_rate else "-"
        lines.append(f"  {name:<11} {decode[name]:>12.1f} {median(name, 'end_to_end_rate'):>9.1f} "
                     f"{decode[name] / decode['off']:>6.2f}x {versus_genai:>8} {acceptance:>8} "
                     f"{'-' if name == 'off' else 'yes' if same else 'no':>11}")
        if system.ours and not same:
            mismatches.append(f"MISMATCH: {name}'s greedy tokens on {workload} are not those of off")
        if system.metrics_url:
            speedups.append(f"{name} {decode[name] / decode['off']:.2f}x " +
                            (f"(acceptance {acceptance})" if drafted else "(nothing drafted)"))
    summary = f"{workload}: decode tok/s vs off: {', '.join(speedups)}"
    if workload == "story":
        summary += f"; ngram's target, at least {STORY_TARGET}x: " + \
            ("met" if decode["ngram"] / decode["off"] >= STORY_TARGET else "MISSED")
    summary += "; greedy tokens identical" if not mismatches else "; GREEDY TOKENS DIFFER"
    return lines, summary, mismatches


def artifact_folder(value: str) -> Path:
    """An argparse type: a `gptserve export` folder."""
    if not (Path(value) / "manifest.json").is_file():
        raise argparse.ArgumentTypeError(f"{value} holds no manifest.json; is it a `gptserve export` folder?")
    return Path(value)


def at_least_two(value: str) -> int:
    if not value.isdigit() or int(value) < 2:  # the decode rate needs a token after the first
        raise argparse.ArgumentTypeError(f"{value!r}: expected an integer of at least 2")
    return int(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", required=True, type=artifact_folder, help="the served model's artifact")
    parser.add_argument("--draft", type=artifact_folder, help="a draft model's artifact: adds --speculative draft:DIR")
    parser.add_argument("--new-tokens", type=at_least_two, default=128, help="greedy tokens per run (EOS ignored)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per system and workload (medians)")
    parser.add_argument("--cache", type=Path, default=Path("bench-results/cache"),
                        help="where onnxruntime-genai's export is built once (`gptserve bench`'s cache)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompts = workloads(Tokenizer.from_folder(args.artifacts))
    threads, load_before, started = os.cpu_count() or 1, os.getloadavg()[0], time.perf_counter()
    manifest = json.loads((args.artifacts / "manifest.json").read_text())
    about = machine()
    print(f"machine: {about['cpu']}, {about['cores']} cores, {about['platform']}, python {about['python']}; "
          f"load average {load_before:.2f}")
    print("versions: " + ", ".join(f"{name} {number}" for name, number in
                                   {**versions(), "gptserve": version("gptserve")}.items()))
    print(f"artifact: {args.artifacts} ({manifest['model']['name']}, {manifest['precision']})"
          f"{f'; draft {args.draft}' if args.draft else ''}; batch 1, greedy, {args.new_tokens} new tokens "
          f"(EOS ignored); medians of {args.rounds} rounds", flush=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        systems = start_ours(args, stack)
        peers = (genai(args.cache, threads, manifest["precision"]), llama_cpp(args.cache, threads))
        systems += [system for system in peers if system]
        for system in systems:  # warm-up: first allocations and lazy initialisation are not timed
            system.generate(prompts["story"], 8)
        runs: dict[tuple[str, str], list[Run]] = defaultdict(list)
        counts: dict[tuple[str, str], np.ndarray] = defaultdict(lambda: np.zeros(2))
        for round_number in range(args.rounds):
            for workload, ids in prompts.items():
                for system in systems if round_number % 2 == 0 else systems[::-1]:
                    time.sleep(SETTLE_SECONDS)
                    before = speculation_counts(system)
                    runs[system.name, workload].append(system.generate(ids, args.new_tokens))
                    counts[system.name, workload] += speculation_counts(system) - before
            print(f"[bench] round {round_number + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    summaries, mismatches = [], []
    for workload, ids in prompts.items():
        lines, summary, wrong = table(workload, len(ids), systems, runs, counts)
        print("\n".join(lines + wrong))
        summaries.append(summary)
        mismatches += wrong
    print("\n".join(summaries))
    print(f"load average {os.getloadavg()[0]:.2f} after ({(time.perf_counter() - started) / 60:.1f} minutes)")
    return 1 if mismatches else 0


if __name__ == "__main__":
    from gptserve.cli import restart_with_huge_pages

    restart_with_huge_pages()  # measured as `gptserve` runs: on huge pages
    sys.exit(main())
