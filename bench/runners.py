"""One measurement in a fresh process: load one system, warm it up, time a prefill and a greedy decode.

`gptserve bench` runs `python -m gptserve.bench.runners TASK.json RESULT.json` once per system, batch size and
repetition, so every figure, peak memory included, belongs to that system alone. Each runner loads its own libraries.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from gptserve.model.greedy import greedy_tokens

PREFILL_RUNS = 3  # timed prefills per process; the process reports their median
WARMUP_TOKENS = 8  # a short greedy run first: first-call allocations and lazy initialisation are not timed


class Runner(Protocol):
    def prefill(self, prompt: np.ndarray) -> float:
        """Seconds for one forward pass over the prompt (B, T), as the system's own generate would run it."""

    def decode(self, prompt: np.ndarray, new_tokens: int) -> tuple[list[float], np.ndarray]:
        """Greedy generation of exactly new_tokens: when each token came out, and the tokens (B, new_tokens)."""


class StepRunner:
    """Our step functions (EagerStep, Engine.step) in a plain greedy loop, with the KV cache they return."""

    def __init__(self, step, eos_token_ids: list[int]) -> None:
        self.step, self.eos_token_ids = step, eos_token_ids

    def prefill(self, prompt: np.ndarray) -> float:
        started = time.perf_counter()
        self.step(prompt, np.ones_like(prompt), None)
        return time.perf_counter() - started

    def decode(self, prompt: np.ndarray, new_tokens: int) -> tuple[list[float], np.ndarray]:
        stamps: list[float] = []
        # EOS suppressed, as min_new_tokens does for the other systems.
        tokens = greedy_tokens(self.step, prompt, new_tokens, suppress=self.eos_token_ids,
                               on_token=lambda _ids: stamps.append(time.perf_counter()))
        return stamps, tokens


class TransformersRunner:
    """Hugging Face transformers: generate() with its KV cache, greedy, EOS held off by min_new_tokens."""

    def __init__(self, folder: str, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def prefill(self, prompt: np.ndarray) -> float:
        input_ids = self.torch.from_numpy(prompt)
        with self.torch.inference_mode():
            started = time.perf_counter()
            # logits_to_keep=1: the last position only, as generate() runs its prefill.
            self.model(input_ids=input_ids, attention_mask=self.torch.ones_like(input_ids), use_cache=True,
                       logits_to_keep=1)
            return time.perf_counter() - started

    def decode(self, prompt: np.ndarray, new_tokens: int) -> tuple[list[float], np.ndarray]:
        input_ids = self.torch.from_numpy(prompt)
        stamps, criteria = _token_stamps()
        with self.torch.inference_mode():
            output = self.model.generate(
                input_ids, attention_mask=self.torch.ones_like(input_ids), do_sample=False, use_cache=True,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, stopping_criteria=criteria,
                pad_token_id=self.model.generation_config.eos_token_id)
        return stamps, output[:, prompt.shape[1]:].numpy()


def _token_stamps():
    """A list that fills with the time each new token is appended, and the stopping criteria (never stopping)
    that fill it: generate() calls them once per new token."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    stamps: list[float] = []

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    return stamps, StoppingCriteriaList([Stamp()])


class GenaiRunner:
    """onnxruntime-genai on an export made by its own model builder: append_tokens, then generate_next_token."""

    def __init__(self, folder: str, threads: int) -> None:
        import onnxruntime_genai as og

        config = og.Config(folder)
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.og, self.model = og, og.Model(config)
        # What genai takes for padding in a batch of prompts (its attention mask is input_ids != pad_token_id).
        self.pad_token_id = int(json.loads((Path(folder) / "genai_config.json").read_text())["model"]["pad_token_id"])

    def _generator(self, batch_size: int, length: int):
        params = self.og.GeneratorParams(self.model)
        # min_length = max_length: exactly that many tokens, EOS or not.
        params.set_search_options(do_sample=False, batch_size=batch_size, max_length=length, min_length=length)
        return self.og.Generator(self.model, params)

    def prefill(self, prompt: np.ndarray) -> float:
        generator = self._generator(prompt.shape[0], prompt.shape[1] + 1)
        started = time.perf_counter()
        generator.append_tokens(prompt.astype(np.int32))
        return time.perf_counter() - started

    def decode(self, prompt: np.ndarray, new_tokens: int) -> tuple[list[float], np.ndarray]:
        batch_size, prompt_length = prompt.shape
        generator = self._generator(batch_size, prompt_length + new_tokens)
        generator.append_tokens(prompt.astype(np.int32))
        stamps = []
        for _ in range(new_tokens):  # the first call only picks from the prefill's logits
            generator.generate_next_token()
            stamps.append(time.perf_counter())
        tokens = [generator.get_sequence(row)[prompt_length:] for row in range(batch_size)]
        return stamps, np.array(tokens)


class LlamaCppRunner:
    """llama.cpp on the Q4_1 GGUF itself, through its C API (llama-cpp-python's ctypes layer): each row is a
    sequence of its own in one shared batch, so B rows decode in one llama_decode call, as B rows do in ours."""

    MAX_BATCH_ROWS = 8

    def __init__(self, folder: str, threads: int, eos_token_ids: list[int]) -> None:
        sys.path.append(folder)  # after the environment's own packages (its numpy, say)
        import llama_cpp

        from gptserve.model.fetch import fetch_default_gguf

        self.api = api = llama_cpp
        self._silence = api.llama_log_callback(lambda level, text, data: None)  # kept: C holds the pointer
        api.llama_log_set(self._silence, None)
        api.llama_backend_init()
        model_params = api.llama_model_default_params()
        # No repacked weight buffers: their AMX kernels crash on this VM's CPU, which reports AMX (the default
        # CPU kernels for Q4_1 still use AVX-512 and VNNI).
        model_params.use_extra_bufts = False
        self.model = api.llama_model_load_from_file(str(fetch_default_gguf()).encode(), model_params)
        params = api.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = 4096, 2048, 2048
        params.n_seq_max, params.n_threads, params.n_threads_batch = self.MAX_BATCH_ROWS, threads, threads
        self.context = api.llama_init_from_model(self.model, params)
        self.vocab_size = api.llama_vocab_n_tokens(api.llama_model_get_vocab(self.model))
        self.eos_token_ids = eos_token_ids
        self.batch = api.llama_batch_init(2048, 0, self.MAX_BATCH_ROWS)

    def _forward(self, rows: np.ndarray, start: int) -> np.ndarray:
        """Appends rows (B, T) at positions start.. of sequences 0..B-1; the last position's logits (B, V)."""
        batch, (batch_size, length) = self.batch, rows.shape
        if batch_size > self.MAX_BATCH_ROWS:
            raise ValueError(f"llama.cpp runs at most {self.MAX_BATCH_ROWS} rows here, not {batch_size}")
        batch.n_tokens = batch_size * length
        for index, (row, column) in enumerate(np.ndindex(batch_size, length)):
            batch.token[index], batch.pos[index] = int(rows[row, column]), start + column
            batch.n_seq_id[index], batch.seq_id[index][0] = 1, row
            batch.logits[index] = column == length - 1
        if self.api.llama_decode(self.context, batch):
            raise RuntimeError("llama_decode failed")
        return np.stack([np.ctypeslib.as_array(self.api.llama_get_logits_ith(self.context, (row + 1) * length - 1),
                                               shape=(self.vocab_size,)).copy() for row in range(batch_size)])

    def _clear(self) -> None:
        self.api.llama_memory_clear(self.api.llama_get_memory(self.context), True)

    def prefill(self, prompt: np.ndarray) -> float:
        self._clear()
        started = time.perf_counter()
        self._forward(prompt, 0)
        return time.perf_counter() - started

    def decode(self, prompt: np.ndarray, new_tokens: int) -> tuple[list[float], np.ndarray]:
        self._clear()
        logits, position, stamps, tokens = self._forward(prompt, 0), prompt.shape[1], [], []
        for step in range(new_tokens):
            logits[:, self.eos_token_ids] = -np.inf  # as for our engines
            next_ids = logits.argmax(-1)  # (B,)
            stamps.append(time.perf_counter())
            tokens.append(next_ids)
            if step + 1 < new_tokens:
                logits = self._forward(next_ids[:, None], position)
                position += 1
        return stamps, np.stack(tokens, axis=1)


def load_runner(system: dict, threads: int, eos_token_ids: list[int]) -> Runner:
    kind, path = system["kind"], system["path"]
    if kind == "eager":
        import torch

        from gptserve.model.eager import EagerStep
        from gptserve.model.spec import DEFAULT_MODEL, load_pretrained

        torch.set_num_threads(threads)
        return StepRunner(EagerStep(load_pretrained(DEFAULT_MODEL).build()), eos_token_ids)
    if kind == "onnx":
        from gptserve.service.engine import Engine

        return StepRunner(Engine.load(path, "cpu", threads).step, eos_token_ids)
    if kind == "transformers":
        return TransformersRunner(path, threads)
    if kind == "genai":
        return GenaiRunner(path, threads)
    if kind == "llama.cpp":
        return LlamaCppRunner(path, threads, eos_token_ids)
    raise ValueError(f"unknown system kind {kind!r}")


def peak_rss_mb() -> float:
    """This process's peak resident memory. On Linux, VmHWM: getrusage's ru_maxrss carries the parent's
    peak over fork and exec, so it would charge every child with the memory of whoever started it."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB elsewhere


def measure(task: dict) -> dict:
    workload, batch_size = task["workload"], task["batch_size"]
    runner = load_runner(task["system"], task["threads"], workload["eos_token_ids"])
    prefill_prompt = np.tile(np.array(workload["prefill_ids"], dtype=np.int64), (batch_size, 1))  # (B, T)
    decode_prompt = np.tile(np.array(workload["decode_ids"], dtype=np.int64), (batch_size, 1))  # (B, T)

    runner.decode(decode_prompt, WARMUP_TOKENS)
    runner.prefill(prefill_prompt)
    prefill_seconds = statistics.median(runner.prefill(prefill_prompt) for _ in range(PREFILL_RUNS))
    stamps, tokens = runner.decode(decode_prompt, workload["new_tokens"])
    expected = workload["new_tokens"]
    assert tokens.shape == (batch_size, expected) and len(stamps) == expected, f"{tokens.shape}, {len(stamps)} stamps"
    # The first token comes out of the prefill; the rate counts the decode steps after it, in every row.
    decode_rate = batch_size * (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return {
        "prefill_ms": prefill_seconds * 1000,
        "decode_tokens_per_second": decode_rate,
        "peak_rss_mb": peak_rss_mb(),
        "tokens": tokens[0].tolist(),
        "rows_identical": bool((tokens == tokens[0]).all()),
        "load_average": os.getloadavg()[0],
    }


if __name__ == "__main__":
    task_path, result_path = sys.argv[1:]
    Path(result_path).write_text(json.dumps(measure(json.loads(Path(task_path).read_text()))))
