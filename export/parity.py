"""Parity certification: the exported graph on ONNX Runtime CPU against the eager model, on canary inputs.

The eager reference runs in float64: at fp32, eager PyTorch itself is about 1e-4 away from the exact result on
the default model (30 layers, logits up to ~40), the same size as the tolerance, so an fp32 reference would
measure the reference's own rounding. Against float64, the graph's error is its own.

The report is precision-neutral: every case records max abs logits difference and top-1 agreement; fp32 is
judged on the first (and on identical greedy tokens), reduced precisions later on agreement and perplexity.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from export.contract import empty_past, feed
from model.gpt import GPT

DECODE_STEPS = 32
CANARY_PROMPT_TOKENS = 17
SEED = 1234


def canary_ids(vocab_size: int, length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, size=length, dtype=np.int64)


def compare(case: str, eager: np.ndarray, onnx: np.ndarray, mask: np.ndarray | None = None) -> dict:
    """eager/onnx: (B, T, V) logits; mask (B, T) picks the positions that hold real tokens."""
    if mask is not None:
        eager, onnx = eager[mask.astype(bool)], onnx[mask.astype(bool)]
    eager, onnx = eager.reshape(-1, eager.shape[-1]), onnx.reshape(-1, onnx.shape[-1])
    agreement = float((eager.argmax(-1) == onnx.argmax(-1)).mean())
    return {"case": case, "positions": len(eager), "max_abs_diff": float(np.abs(eager - onnx).max()),
            "top1_agreement": agreement, "greedy_match": agreement == 1.0}


class Certifier:
    def __init__(self, model: GPT, session, graph: dict) -> None:
        self.model = copy.deepcopy(model).to(torch.float64).eval()
        self.session, self.graph = session, graph
        self.vocab_size = graph["vocab_size"]

    @torch.inference_mode()
    def eager(self, input_ids, attention_mask, past):
        if past is None:
            past = self.model.empty_past(input_ids.shape[0])
        logits, present = self.model(torch.from_numpy(input_ids), torch.from_numpy(attention_mask), past)
        return logits.numpy(), present

    def onnx(self, input_ids, attention_mask, past):
        if past is None:
            past = empty_past(self.graph, input_ids.shape[0])
        logits, *present = self.session.run(None, feed(self.graph, input_ids, attention_mask, past))
        return logits, present

    def prefill_case(self, length: int) -> dict:
        ids = canary_ids(self.vocab_size, length, SEED + length)[None]
        mask = np.ones_like(ids)
        return compare(f"prefill_{length}", self.eager(ids, mask, None)[0], self.onnx(ids, mask, None)[0])

    def decode_case(self) -> tuple[dict, dict]:
        """32 cached decode steps, each side feeding its own presents back; the eager greedy token drives both.
        Also returns the canary the engine re-runs at start: the prompt and the greedy tokens."""
        ids = canary_ids(self.vocab_size, CANARY_PROMPT_TOKENS, SEED)[None]
        mask = np.ones_like(ids)
        eager_logits, eager_past = self.eager(ids, mask, None)
        onnx_logits, onnx_past = self.onnx(ids, mask, None)
        eager_steps, onnx_steps, tokens = [], [], []
        for _ in range(DECODE_STEPS):
            token = int(eager_logits[0, -1].argmax())
            tokens.append(token)
            ids = np.array([[token]], dtype=np.int64)
            mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
            eager_logits, eager_past = self.eager(ids, mask, eager_past)
            onnx_logits, onnx_past = self.onnx(ids, mask, onnx_past)
            eager_steps.append(eager_logits)
            onnx_steps.append(onnx_logits)
        report = compare(f"decode_{DECODE_STEPS}", np.concatenate(eager_steps, 1), np.concatenate(onnx_steps, 1))
        canary = {"prompt_ids": canary_ids(self.vocab_size, CANARY_PROMPT_TOKENS, SEED).tolist(),
                  "greedy_tokens": tokens}
        return report, canary

    def padded_batch_case(self, lengths=(5, 11, 17)) -> dict:
        width = max(lengths)
        ids = np.zeros((len(lengths), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, length in enumerate(lengths):
            ids[row, width - length:] = canary_ids(self.vocab_size, length, SEED + 100 + row)
            mask[row, width - length:] = 1
        eager, onnx = self.eager(ids, mask, None)[0], self.onnx(ids, mask, None)[0]
        return compare(f"batch_{len(lengths)}_left_padded", eager, onnx, mask)


def certify_fp32(model: GPT, session, graph: dict, tolerance: float) -> tuple[dict, dict]:
    """The parity report (passed or not) and the start-up canary."""
    certifier = Certifier(model, session, graph)
    lengths = [n for n in (1, 17, 128) if n <= model.config.context_length]
    cases = [certifier.prefill_case(n) for n in lengths]
    decode, canary = certifier.decode_case()
    cases += [decode, certifier.padded_batch_case()]
    passed = all(case["max_abs_diff"] <= tolerance and case["greedy_match"] for case in cases)
    report = {
        "precision": "fp32",
        "reference": "eager PyTorch float64",
        "runtime": "onnxruntime CPUExecutionProvider",
        "criteria": {"max_abs_diff": tolerance, "greedy_match": True},
        "cases": cases,
        "passed": passed,
    }
    return report, canary

