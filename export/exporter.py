"""`gptserve export`: the eager model to one ONNX graph (prefill and cached decode), certified, then moved
into place as an artifact folder."""

from __future__ import annotations

import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

import onnx
import torch
from torch.export import Dim

from gptserve.export.artifact import (
    FORMAT,
    GRAPH_FILE,
    ArtifactError,
    file_hashes,
    format_report,
    genai_config,
    write_json,
    write_manifest,
)
from gptserve.export.contract import GraphContract, graph_contract, past_names, present_names
from gptserve.export.fused import ExportedGPT, add_logits_to_keep, drop_unused_outputs
from gptserve.export.manifest import Canary, Generation, Manifest, ModelDescription, ParityReport, Precision
from gptserve.export.parity import CANARY_TEXT, certify
from gptserve.export.progress import Progress
from gptserve.export.quantize import PRECISIONS, convert
from gptserve.export.runtime import create_session
from gptserve.model.gpt import GPT
from gptserve.model.spec import Pretrained, load_pretrained
from gptserve.model.tokenizer import read_gguf_metadata

# Opset 23: the first block's norm is one RMSNormalization node (the contrib kernels come from gptserve.export.fused).
OPSET = 23
SINGLE_FILE_LIMIT = 1 << 30  # above this many bytes of weights, they go to an external data file


class CertificationFailed(ArtifactError):
    """The export ran, and its graph did not pass: not a mistake in what was asked for."""


def export_graph(model: GPT, path: Path) -> None:
    config = model.config
    batch, sequence = Dim("batch"), Dim("sequence")
    past_sequence, total_sequence = Dim("past_sequence", min=0), Dim("total_sequence")
    kv = {0: batch, 2: past_sequence}
    dynamic_shapes = {
        "input_ids": {0: batch, 1: sequence},
        "attention_mask": {0: batch, 1: total_sequence},
        "past_key_values": tuple((kv, kv) for _ in range(config.n_layer)),
    }
    # T = 2 in the example: an example with T = 1 silently fixes the sequence axis to 1.
    input_ids = torch.zeros((2, 2), dtype=torch.int64)
    attention_mask = torch.ones((2, 2), dtype=torch.int64)
    program = torch.onnx.export(
        ExportedGPT(model).eval(), (input_ids, attention_mask, model.empty_past(2)),
        dynamic_shapes=dynamic_shapes, dynamo=True, opset_version=OPSET, optimize=True,
        verbose=False,  # else it prints its own phases on stdout, which carries only results
        input_names=["input_ids", "attention_mask", *past_names(config.n_layer)],
        output_names=["logits", *present_names(config.n_layer)],
    )
    weight_bytes = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    assert program is not None  # the dynamo exporter returns its program
    proto = program.model_proto
    add_logits_to_keep(proto)
    drop_unused_outputs(proto)
    onnx.save(proto, str(path), save_as_external_data=weight_bytes > SINGLE_FILE_LIMIT,
              location=path.name + ".data", all_tensors_to_one_file=True)


def source_is_quantized(source: Path) -> bool:
    # GGUF file types 0 and 1 are all-F32 and mostly-F16; every other type holds quantized blocks.
    return source.suffix == ".gguf" and read_gguf_metadata(source).get("general.file_type", 2) not in (0, 1)


def convert_step(fp32_path: Path, graph_path: Path, precision: Precision, source: Path,
                 progress: Progress) -> dict | None:
    """The exported fp32 graph at `precision` in graph_path (the fp32 folder is then removed); the manifest's
    notes on what was quantized (None at fp32, exported in place)."""
    if precision == "fp32":
        return None
    with progress.phase(f"{'converting' if precision == 'fp16' else 'quantizing'} to {precision}"):
        notes = convert(fp32_path, graph_path, precision, source_is_quantized(source))
    shutil.rmtree(fp32_path.parent)
    return notes


def check_structure(path: Path, graph: GraphContract) -> ParityReport:
    """fp16 is meant for GPUs and none is here: check the graph itself and its contract, not its numbers."""
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path), load_external_data=False)
    dtypes = {value.name: onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
              for value in [*model.graph.input, *model.graph.output]}
    mismatches = tuple(spec.name for spec in (*graph.inputs, *graph.outputs) if dtypes.get(spec.name) != spec.dtype)
    return ParityReport(precision="fp16", reference="none: certified structurally (no GPU to run it on)",
                        runtime="onnx.checker", criteria={"structure": "valid ONNX, contract names and dtypes"},
                        cases=(), top1_agreement=None, perplexity=None, contract_mismatches=mismatches,
                        passed=not mismatches)


def certify_step(model: GPT, pretrained: Pretrained, graph_path: Path, graph: GraphContract, precision: Precision,
                 tolerance: float, criteria: dict | None, progress: Progress) -> tuple[ParityReport, Canary | None]:
    """The graph on ONNX Runtime CPU against the eager model (fp16, which needs a GPU: its structure only)."""
    if precision == "fp16":
        with progress.phase("certifying the fp16 graph's structure"):
            return check_structure(graph_path, graph), None
    with progress.phase("certifying against eager PyTorch on ONNX Runtime CPU") as steps:
        session = create_session(graph_path, provider="cpu")
        text_ids = pretrained.tokenizer.encode(CANARY_TEXT.read_text())
        return certify(model, session, graph, precision, tolerance, text_ids, criteria, on_step=steps.advance)


def write_step(staging: Path, pretrained: Pretrained, graph: GraphContract, precision: Precision,
               quantization: dict | None, report: ParityReport, canary: Canary | None) -> Manifest:
    """The tokenizer, the configs onnxruntime-genai and transformers read, and the manifest over them all."""
    config, tokenizer = pretrained.config, pretrained.tokenizer
    tokenizer.save(staging)
    eos = tokenizer.eos_token_ids
    write_json(staging / "generation_config.json", {
        "eos_token_id": eos, "bos_token_id": tokenizer.bos_token_id, "max_length": config.context_length})
    write_json(staging / "genai_config.json",
               genai_config(config, graph, eos, tokenizer.bos_token_id, tokenizer.pad_token_id))
    manifest = Manifest(
        format=FORMAT,
        model=ModelDescription(pretrained.name, str(pretrained.source), config),
        precision=precision,
        quantization=quantization,
        graph=graph,
        generation=Generation(config.context_length, tuple(eos), tokenizer.bos_token_id),
        tools={name: version(name) for name in ("torch", "onnx", "onnxruntime", "onnxscript", "gptserve")},
        files=file_hashes(staging, [path.name for path in staging.iterdir()]),
        parity=report,
        canary=canary,
    )
    write_manifest(staging, manifest)
    return manifest


def build_artifact(pretrained: Pretrained, out: Path, tolerance: float, context_length: int | None = None,
                   precision: Precision = "fp32", criteria: dict | None = None,
                   progress: Progress | None = None) -> Manifest:
    """Export, convert, certify, write (each a function above): the artifact goes into `out`, replacing what is
    there, only once it is certified."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if context_length:
        pretrained = pretrained.with_context_length(context_length)
    config = pretrained.config
    model = pretrained.build()
    progress = progress or Progress()
    graph = graph_contract(config.n_layer, config.kv_heads, config.head_dim, config.vocab_size,
                           kv_dtype="float16" if precision == "fp16" else "float32", file=GRAPH_FILE, opset=OPSET)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as scratch:
        staging = Path(scratch) / "artifact"
        staging.mkdir()
        fp32_path = staging / graph.file if precision == "fp32" else Path(scratch) / "fp32" / graph.file
        fp32_path.parent.mkdir(exist_ok=True)
        parameters = sum(p.numel() for p in model.parameters()) / 1e6
        with progress.phase(f"exporting {pretrained.name} ({parameters:.0f}M parameters) to ONNX opset {OPSET}"):
            export_graph(model, fp32_path)
        quantization = convert_step(fp32_path, staging / graph.file, precision, pretrained.source, progress)
        report, canary = certify_step(model, pretrained, staging / graph.file, graph, precision, tolerance, criteria,
                                      progress)
        progress.line(format_report(report))
        if not report.passed:
            raise CertificationFailed(f"parity certification failed (the report is above); nothing written to {out}")
        manifest = write_step(staging, pretrained, graph, precision, quantization, report, canary)
        _move_into_place(staging, out)
    progress.line(f"artifact ready: {out}")
    return manifest


def _move_into_place(staging: Path, out: Path) -> None:
    """Swap the finished folder in; the old one (if any) is removed only after the new one is in place."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    shutil.move(str(staging), str(out))
    if old:
        shutil.rmtree(old)


def export(spec: str, out: str | Path, tolerance: float = 1e-4, context_length: int | None = None,
           precision: Precision = "fp32", criteria: dict | None = None, progress: Progress | None = None) -> Manifest:
    progress = progress or Progress()
    with progress.phase(f"loading {spec}"):
        pretrained = load_pretrained(spec)
    return build_artifact(pretrained, Path(out), tolerance, context_length, precision, criteria, progress)
