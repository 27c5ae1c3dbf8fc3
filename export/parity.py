"""Parity certification: the exported graph on ONNX Runtime CPU against the eager model, on canary inputs.

Canary inputs are slices of a fixed English text shipped with the project (export/data/canary.txt): uniformly
random token ids reach rare, barely trained embeddings and measure rounding on inputs no user sends.
The eager reference runs in float64: at fp32, eager PyTorch itself is about 1e-4 away from the exact result on
the default model (30 layers, logits up to ~40), the same size as the tolerance, so an fp32 reference would
measure the reference's own rounding. Against float64, the graph's error is its own.

The report is precision-neutral: every case records max abs logits difference and top-1 agreement; fp32 is
judged on the first (and on identical greedy tokens), reduced precisions later on agreement and perplexity.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from gptserve.export.contract import GraphContract, empty_past, feed, ragged_mask
from gptserve.export.manifest import Canary, ParityCase, ParityReport, Perplexity, Precision
from gptserve.model.gpt import GPT
from gptserve.model.greedy import greedy_tokens

DECODE_STEPS = 32
RAGGED_DECODE_STEPS = 4
CANARY_PROMPT_TOKENS = 17


CANARY_TEXT = Path(__file__).with_name("data") / "canary.txt"


def text_slice(text_ids: np.ndarray, start: int, length: int) -> np.ndarray:
    """`length` ids of the canary text from `start` (wrapping around for tokenizers that need few ids)."""
    return np.resize(np.roll(text_ids, -start), length).astype(np.int64)


def compare(case: str, eager: np.ndarray, onnx: np.ndarray, mask: np.ndarray | None = None) -> ParityCase:
    """eager/onnx: (B, T, V) logits; mask (B, T) picks the positions that hold real tokens."""
    if mask is not None:
        eager, onnx = eager[mask.astype(bool)], onnx[mask.astype(bool)]
    eager, onnx = eager.reshape(-1, eager.shape[-1]), onnx.reshape(-1, onnx.shape[-1])
    agreement = float((eager.argmax(-1) == onnx.argmax(-1)).mean())
    return ParityCase(case, len(eager), float(np.abs(eager - onnx).max()), agreement, agreement == 1.0)


class Certifier:
    def __init__(self, model: GPT, session, graph: GraphContract, text_ids: list[int]) -> None:
        self.text_ids = np.array(text_ids, dtype=np.int64)
        self.model = copy.deepcopy(model).to(torch.float64).eval()
        self.session, self.graph = session, graph

    @torch.inference_mode()
    def eager(self, input_ids, attention_mask, past):
        if past is None:
            past = self.model.empty_past(input_ids.shape[0])
        logits, present = self.model(torch.from_numpy(input_ids), torch.from_numpy(attention_mask), past)
        return logits.numpy(), present

    def onnx(self, input_ids, attention_mask, past, logits_to_keep=None):
        if past is None:
            past = empty_past(self.graph, input_ids.shape[0])
        logits, *present = self.session.run(None, feed(self.graph, input_ids, attention_mask, past, logits_to_keep))
        return logits, present

    def onnx_step(self, input_ids, attention_mask, past):
        """The graph run plainly, as a step function (last position's logits)."""
        logits, present = self.onnx(input_ids, attention_mask, past)
        return logits[:, -1], present

    def prefill_case(self, length: int) -> ParityCase:
        ids = text_slice(self.text_ids, 0, length)[None]
        mask = np.ones_like(ids)
        return compare(f"prefill_{length}", self.eager(ids, mask, None)[0], self.onnx(ids, mask, None)[0])

    def last_position_case(self, length: int) -> ParityCase:
        """The engine's prefill: logits_to_keep = 1, the last position's logits alone."""
        ids = text_slice(self.text_ids, 0, length)[None]
        mask = np.ones_like(ids)
        onnx = self.onnx(ids, mask, None, logits_to_keep=1)[0]
        return compare(f"prefill_{length}_last_only", self.eager(ids, mask, None)[0][:, -1:], onnx)

    def decode_case(self) -> ParityCase:
        """32 cached decode steps, each side feeding its own presents back; the eager greedy token drives both."""
        ids = text_slice(self.text_ids, 0, CANARY_PROMPT_TOKENS)[None]
        mask = np.ones_like(ids)
        eager_logits, eager_past = self.eager(ids, mask, None)
        onnx_logits, onnx_past = self.onnx(ids, mask, None)
        eager_steps, onnx_steps = [], []
        for _ in range(DECODE_STEPS):
            token = int(eager_logits[0, -1].argmax())
            ids = np.array([[token]], dtype=np.int64)
            mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
            eager_logits, eager_past = self.eager(ids, mask, eager_past)
            onnx_logits, onnx_past = self.onnx(ids, mask, onnx_past)
            eager_steps.append(eager_logits)
            onnx_steps.append(onnx_logits)
        return compare(f"decode_{DECODE_STEPS}", np.concatenate(eager_steps, 1), np.concatenate(onnx_steps, 1))

    def ragged_batch_case(self, lengths=(5, 11, 17), steps=RAGGED_DECODE_STEPS) -> ParityCase:
        """Prompts of unequal length batched as the engine batches them: each row's tokens first, padding after;
        then decode steps that append each row's token right after its own. Eager runs each row alone."""
        rows = len(lengths)
        prompts = [text_slice(self.text_ids, 20 * (row + 1), length) for row, length in enumerate(lengths)]
        lengths = np.array(lengths)
        mask = ragged_mask(lengths)
        ids = np.zeros_like(mask)
        for row, prompt in enumerate(prompts):
            ids[row, :len(prompt)] = prompt
        onnx_logits, onnx_past = self.onnx(ids, mask, None)
        eager_runs = [self.eager(prompt[None], np.ones((1, len(prompt)), dtype=np.int64), None) for prompt in prompts]
        eager_steps = [np.concatenate([logits[0] for logits, _ in eager_runs])]  # (real positions, V)
        onnx_steps = [onnx_logits[mask.astype(bool)]]
        for _ in range(steps):
            tokens = [int(logits[0, -1].argmax()) for logits, _ in eager_runs]  # the eager greedy token drives both
            eager_runs = [self.eager(np.array([[token]]), np.ones((1, length + 1), dtype=np.int64), past)
                          for token, length, (_, past) in zip(tokens, lengths, eager_runs)]
            lengths += 1
            onnx_logits, onnx_past = self.onnx(np.array(tokens)[:, None], ragged_mask(lengths), onnx_past)
            eager_steps.append(np.concatenate([logits[0] for logits, _ in eager_runs]))
            onnx_steps.append(onnx_logits[:, 0])
        return compare(f"batch_{rows}_ragged_{steps}_steps", np.concatenate(eager_steps)[None],
                       np.concatenate(onnx_steps)[None])


PERPLEXITY_TOKENS = 256

# Reduced precisions are judged on quality, not on bits: how often the top-1 token agrees with the eager model
# over the canaries, and how much perplexity on the canary text grows. Measured on the default model (a Q4_1
# GGUF, so int4 rounds it a second time): int8 0.977 agreement, perplexity ratio 1.008; int4 0.67 and 1.24.
# The thresholds sit a little below those, to admit other models, and far above a broken quantization
# (agreement near 1/vocabulary, perplexity many times higher).
QUALITY_CRITERIA = {
    "int8": {"min_top1_agreement": 0.95, "max_perplexity_ratio": 1.05},
    "int4": {"min_top1_agreement": 0.60, "max_perplexity_ratio": 1.30},
}


def planned_cases(certifier: Certifier) -> list[tuple[str, Callable[[], ParityCase]]]:
    """The cases, each named, to run one by one (and to count for a progress bar before any runs)."""
    lengths = [n for n in (1, 17, 128) if n <= certifier.model.config.context_length]
    return [*((f"prefill_{n}", functools.partial(certifier.prefill_case, n)) for n in lengths),
            (f"prefill_{lengths[-1]}_last_only", functools.partial(certifier.last_position_case, lengths[-1])),
            (f"decode_{DECODE_STEPS}", certifier.decode_case), ("batch_ragged", certifier.ragged_batch_case)]


def onnx_canary(certifier: Certifier, steps: int = DECODE_STEPS) -> Canary:
    """The graph's own greedy tokens on the canary prompt, which the engine re-runs at start."""
    prompt = text_slice(certifier.text_ids, 0, CANARY_PROMPT_TOKENS)
    tokens = greedy_tokens(certifier.onnx_step, prompt, steps)[0]
    return Canary(tuple(prompt.tolist()), tuple(tokens.tolist()))


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    """exp of the mean next-token negative log-likelihood; logits (T, V) for ids (T,)."""
    logits = logits[:-1].astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return float(np.exp(-log_probs[np.arange(len(ids) - 1), ids[1:]].mean()))


def perplexity_case(certifier: Certifier) -> Perplexity:
    ids = certifier.text_ids[:PERPLEXITY_TOKENS][None]
    mask = np.ones_like(ids)
    eager, onnx = certifier.eager(ids, mask, None)[0][0], certifier.onnx(ids, mask, None)[0][0]
    reference, measured = perplexity(eager, ids[0]), perplexity(onnx, ids[0])
    return Perplexity(CANARY_TEXT.name, ids.shape[1], reference, measured, measured / reference)


def certify(model: GPT, session, graph: GraphContract, precision: Precision, tolerance: float, text_ids: list[int],
            criteria: dict[str, float] | None = None,
            on_step: Callable[[str, int], None] | None = None) -> tuple[ParityReport, Canary]:
    """The parity report (passed or not) and the start-up canary, for an fp32, int8 or int4 graph.
    `criteria` overrides the quality thresholds of a reduced precision. `on_step(label, total)` follows each step:
    every case, the perplexity (reduced precisions) and the canary."""
    certifier = Certifier(model, session, graph, text_ids)
    planned = planned_cases(certifier)
    total = len(planned) + (precision != "fp32") + 1
    step = on_step or (lambda label, total: None)
    cases = []
    for label, run in planned:
        cases.append(run())
        step(label, total)
    common = functools.partial(ParityReport, precision=precision, reference="eager PyTorch float64",
                               runtime="onnxruntime CPUExecutionProvider", cases=tuple(cases), contract_mismatches=())
    if precision == "fp32":
        report = common(
            criteria={"max_abs_diff": tolerance, "greedy_match": True}, top1_agreement=None,
            perplexity=None,
            passed=all(case.max_abs_diff <= tolerance and case.greedy_match for case in cases))
    else:
        criteria = criteria or QUALITY_CRITERIA[precision]
        agreement = sum(case.top1_agreement * case.positions for case in cases) / sum(case.positions for case in cases)
        perplexity = perplexity_case(certifier)
        step("perplexity", total)
        report = common(
            criteria=dict(criteria), top1_agreement=agreement, perplexity=perplexity,
            passed=(agreement >= criteria["min_top1_agreement"]
                    and perplexity.ratio <= criteria["max_perplexity_ratio"]))
    canary = onnx_canary(certifier)
    step("canary", total)
    return report, canary
