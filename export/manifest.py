"""manifest.json as types: what an artifact folder holds, how it was certified, and the graph's contract.
Parsed once, strictly (export/schema.py); torch-free, since the engine reads it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gptserve.export.contract import GraphContract
from gptserve.export.schema import from_json, to_json
from gptserve.model.config import GPTConfig

Precision = Literal["fp32", "fp16", "int8", "int4"]


@dataclass(frozen=True)
class ModelDescription:
    name: str  # the model spec it was exported from
    source: str  # the file or folder that spec resolved to
    config: GPTConfig


@dataclass(frozen=True)
class Generation:
    context_length: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None


@dataclass(frozen=True)
class ParityCase:
    case: str
    positions: int
    max_abs_diff: float
    top1_agreement: float
    greedy_match: bool


@dataclass(frozen=True)
class Perplexity:
    text: str
    tokens: int
    reference: float
    measured: float
    ratio: float


@dataclass(frozen=True)
class ParityReport:
    """The certification's verdict. fp32 is judged on max_abs_diff and greedy matches; int8 and int4 on top-1
    agreement and perplexity (set for them only); fp16 on structure (contract_mismatches, no cases)."""

    precision: Precision
    reference: str
    runtime: str
    criteria: dict[str, float | bool | str]
    cases: tuple[ParityCase, ...]
    top1_agreement: float | None
    perplexity: Perplexity | None
    contract_mismatches: tuple[str, ...]
    passed: bool


@dataclass(frozen=True)
class Canary:
    """The graph's own greedy tokens on a fixed prompt, recorded at export; the engine re-runs them at start."""

    prompt_ids: tuple[int, ...]
    greedy_tokens: tuple[int, ...]


@dataclass(frozen=True)
class Manifest:
    format: str
    model: ModelDescription
    precision: Precision
    quantization: dict[str, str] | None  # notes on what was quantized, and how
    graph: GraphContract
    generation: Generation
    tools: dict[str, str]  # package versions that made it
    files: dict[str, str]  # sha256 of every other file in the folder (this one cannot hold its own)
    parity: ParityReport
    canary: Canary | None  # None only where the graph cannot run here (fp16: certified structurally)

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        return from_json(cls, data)

    def to_json(self) -> dict:
        return to_json(self)
