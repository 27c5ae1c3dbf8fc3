"""What a JSON-schema constraint costs: decode tokens/s with and without one, at batch 1 and 8, side by side.

The engine's own batched prefill and decode steps, each row's Sequence.step as the scheduler calls it, so the
figure is the model's step plus sampling plus (constrained) the grammar's mask and advance. The schema (an array of
records, at least 32 of them) does not complete, so both runs decode exactly --new-tokens per sequence.

    python -m gptserve.bench.guided --artifacts DIR [--provider cpu] [--new-tokens 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from gptserve.model.generation import FinishReason, Sequence, StoppingParams
from gptserve.model.guidance import Constraint, GrammarCompiler
from gptserve.model.sampling import SamplingParams
from gptserve.service.bench import PROMPTS, machine_description
from gptserve.service.engine import Engine

SCHEMA = {"type": "array", "items": {"type": "object", "properties": {
    "name": {"type": "string"}, "city": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}}}, "required": ["name", "age"]},
    "minItems": 32}


def decode_rate(engine: Engine, sampling: SamplingParams, batch: int, new_tokens: int) -> tuple[float, float]:
    """Decode tokens/s of `batch` sequences stepped together, and the share of the time spent in Sequence.step."""
    tokenizer = engine.tokenizer
    prompts = [tokenizer.encode_chat([{"role": "user", "content": "List some people as JSON. " + PROMPTS[row]}])[0]
               for row in range(batch)]
    # ignore_eos: the unconstrained rows run their full length too.
    sequences = [Sequence(tokenizer, prompt, sampling, StoppingParams(new_tokens, ignore_eos=True), index=row)
                 for row, prompt in enumerate(prompts)]
    logits, cache = engine.prefill(prompts)  # (B, V)
    for row, sequence in enumerate(sequences):
        sequence.step(logits[row])
    stepping = 0.0
    started = time.perf_counter()
    for _ in range(new_tokens - 1):
        token_ids = np.array([sequence.token_ids[-1] for sequence in sequences], dtype=np.int64)  # (B,)
        logits = engine.decode(cache, token_ids)
        before = time.perf_counter()
        for row, sequence in enumerate(sequences):
            sequence.step(logits[row])
        stepping += time.perf_counter() - before
    elapsed = time.perf_counter() - started
    assert all(sequence.finish_reason in (None, FinishReason.LENGTH) for sequence in sequences)  # all ran in full
    return batch * (new_tokens - 1) / elapsed, stepping / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args(argv)
    engine = Engine.load(args.artifacts, provider=args.provider)
    compiler = GrammarCompiler(engine.tokenizer, engine.vocab_size)
    grammar = compiler.compile(Constraint("json_schema", json.dumps(SCHEMA)))
    print("\n".join(machine_description(engine)))
    print(f"{args.new_tokens} new tokens per sequence, greedy, median of {args.rounds} rounds (runs alternate)")
    print(f"{'batch':>5}  {'free tok/s':>10}  {'json tok/s':>10}  {'slower':>7}  {'step share free/json':>21}")
    for batch in args.batches:
        free, constrained = [], []
        for _ in range(args.rounds):
            free.append(decode_rate(engine, SamplingParams(), batch, args.new_tokens))
            constrained.append(decode_rate(engine, SamplingParams(grammar=grammar), batch, args.new_tokens))
        free_rate = statistics.median(rate for rate, _ in free)
        json_rate = statistics.median(rate for rate, _ in constrained)
        shares = (statistics.median(share for _, share in free), statistics.median(share for _, share in constrained))
        print(f"{batch:>5}  {free_rate:>10.1f}  {json_rate:>10.1f}  {1 - json_rate / free_rate:>7.1%}  "
              f"{shares[0]:>10.1%} / {shares[1]:.1%}")
    return 0


if __name__ == "__main__":
    from gptserve.cli import restart_with_huge_pages

    restart_with_huge_pages()  # measured as `gptserve` runs: on huge pages
    raise SystemExit(main())
