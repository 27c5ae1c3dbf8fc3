"""The artifact folder: everything a server needs, described by manifest.json (export/manifest.py). Torch-free
(the engine reads it).

Layout: model.onnx (+ model.onnx.data when large), tokenizer.json, tokenizer_config.json,
generation_config.json, genai_config.json (onnxruntime-genai), manifest.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gptserve.export.contract import GraphContract
from gptserve.export.manifest import Manifest, ParityReport
from gptserve.export.schema import SchemaError
from gptserve.model.config import GPTConfig
from gptserve.model.fetch import sha256_file

# 2: the fused graph (KV buffers with room are written in place; the optional logits_to_keep input).
# 3: parsed strictly: every field written, the parity report's optional ones as null.
# 4: the model config's family fields (head_size, qkv_bias, qk_norm, sliding_window, rope_scaling).
FORMAT = "gptserve-artifact/4"
MANIFEST = "manifest.json"
GRAPH_FILE = "model.onnx"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


# onnxruntime-genai's name of each family; GPT-2 runs as its generic decoder.
GENAI_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral", "phi3": "phi3"}


class ArtifactError(RuntimeError):
    """An artifact folder that cannot be served as it is."""


def read_manifest(folder: str | Path) -> Manifest:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder}: no {MANIFEST}; is this a folder written by `gptserve export`?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{path}: not valid JSON ({error})") from error
    written = data.get("format") if isinstance(data, dict) else None
    if written != FORMAT:
        raise ArtifactError(f"{path}: format {written!r}, expected {FORMAT!r}; "
                            "export it again with this version's `gptserve export`")
    try:
        return Manifest.from_json(data)
    except SchemaError as error:
        raise ArtifactError(f"{path}: {error}") from error


def write_manifest(folder: Path, manifest: Manifest) -> None:
    write_json(folder / MANIFEST, manifest.to_json())


def file_hashes(folder: Path, names: list[str]) -> dict[str, str]:
    return {name: sha256_file(folder / name) for name in sorted(names)}


def verify_files(folder: str | Path, manifest: Manifest) -> None:
    """Every file the manifest lists is present and unchanged. (The manifest cannot list itself: the engine
    checks what it says against the graph instead.)"""
    folder = Path(folder)
    unlisted = [name for name in (manifest.graph.file, manifest.graph.file + ".data", *TOKENIZER_FILES)
                if name not in manifest.files and (folder / name).exists()]
    if unlisted:
        raise ArtifactError(f"{folder}: the manifest lists no sha256 for {', '.join(unlisted)}; re-export the artifact")
    for name, expected in manifest.files.items():
        if Path(name).name != name:
            raise ArtifactError(f"{folder}: the manifest lists {name!r}, which is not a file of this folder")
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{folder}: {name} is missing; re-export the artifact")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(f"{folder}: {name} is corrupt (sha256 {actual[:12]}..., manifest says "
                                f"{expected[:12]}...); re-export the artifact")


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def genai_config(config: GPTConfig, graph: GraphContract, eos_token_ids: list[int], bos_token_id: int | None,
                 pad_token_id: int | None) -> dict:
    """onnxruntime-genai's description of the same graph, so it can load the folder unmodified."""
    return {
        "model": {
            "type": GENAI_MODEL_TYPES.get(config.architecture, "decoder"),
            "context_length": config.context_length,
            "vocab_size": graph.vocab_size,
            "bos_token_id": bos_token_id if bos_token_id is not None else eos_token_ids[0],
            "eos_token_id": eos_token_ids if len(eos_token_ids) > 1 else eos_token_ids[0],
            "pad_token_id": pad_token_id if pad_token_id is not None else eos_token_ids[0],
            "decoder": {
                "filename": graph.file,
                "head_size": graph.head_dim,
                "hidden_size": config.n_embd,
                "num_attention_heads": config.n_head,
                "num_hidden_layers": graph.n_layer,
                "num_key_value_heads": graph.n_kv_heads,
                "session_options": {"provider_options": []},
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": config.context_length,
            "min_length": 0, "early_stopping": True, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
            # Separate past and present tensors: the form the certification runs. (Our engine binds both to one
            # buffer on CPU; see service/engine.py.)
            "past_present_share_buffer": False,
        },
    }


@dataclass(frozen=True)
class Judgement:
    """One thing a verdict rests on: what was measured, the bound it had to keep, whether it did."""

    criterion: str
    measured: float | int | str
    bound: str
    met: bool


def judgements(report: ParityReport) -> list[Judgement]:
    """What the verdict was judged on, by precision: fp32 on every case's logits difference and greedy tokens;
    int8 and int4 on top-1 agreement over all cases and the perplexity ratio (their greedy tokens may differ in
    places, as quantization moves near-ties); fp16 on the graph's structure."""
    criteria = report.criteria
    if report.perplexity is not None and report.top1_agreement is not None:
        minimum, maximum = criteria["min_top1_agreement"], criteria["max_perplexity_ratio"]
        return [Judgement("top-1 agreement over all cases", round(report.top1_agreement, 4), f">= {minimum}",
                          report.top1_agreement >= float(minimum)),
                Judgement(f"perplexity ratio on {report.perplexity.text}", round(report.perplexity.ratio, 4),
                          f"<= {maximum}", report.perplexity.ratio <= float(maximum))]
    if "max_abs_diff" in criteria:
        largest = max((case.max_abs_diff for case in report.cases), default=0.0)
        matched = sum(case.greedy_match for case in report.cases)
        return [Judgement("largest max abs logits difference", float(f"{largest:.3e}"),
                          f"<= {criteria['max_abs_diff']}", largest <= float(criteria["max_abs_diff"])),
                Judgement("cases with identical greedy tokens", f"{matched} of {len(report.cases)}", "all",
                          matched == len(report.cases))]
    return [Judgement("graph inputs and outputs against the contract",
                      f"{len(report.contract_mismatches)} mismatched", "none", not report.contract_mismatches)]


def format_report(report: ParityReport) -> str:
    lines = [f"parity: {'PASSED' if report.passed else 'FAILED'} ({report.precision} vs {report.reference}, on "
             f"{report.runtime}), judged on:"]
    lines += [f"  {item.criterion}: {item.measured} ({item.bound}: {'met' if item.met else 'NOT met'})"
              for item in judgements(report)]
    if report.perplexity is not None:
        perplexity = report.perplexity
        lines.append(f"  (perplexity {perplexity.measured:.3f} against the reference's {perplexity.reference:.3f}, "
                     f"over {perplexity.tokens} tokens)")
    if report.contract_mismatches:
        lines.append(f"  contract mismatches: {', '.join(report.contract_mismatches)}")
    if report.cases:
        lines.append("  per case:" if report.perplexity is None else
                     "  per case (information only: rounding moves near-ties, so greedy tokens may differ):")
    for case in report.cases:
        lines.append(f"    {case.case:<24} max abs diff {case.max_abs_diff:.3e}  "
                     f"top-1 agreement {case.top1_agreement:.4f}  greedy {'match' if case.greedy_match else 'DIFFER'}")
    return "\n".join(lines)
