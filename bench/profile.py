"""Where our ONNX decode step spends its time: ONNX Runtime's profiler over the engine's greedy decode steps,
summed per op type.

  python -m gptserve.bench.profile [--artifacts DIR] [--batch-size 1] [--context 60]

The session has the engine's settings (those of export.runtime.create_session) plus the profiler; only the decode
steps whose context lies within --window of --context are counted, so the prefill and warm-up are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gptserve.bench.prepare import our_artifact
from gptserve.bench.workload import default_workload
from gptserve.export.artifact import read_manifest
from gptserve.model.greedy import greedy_tokens
from gptserve.model.tokenizer import Tokenizer
from gptserve.service.engine import Engine


def profiling_session(graph_path: Path, threads: int | None, prefix: str) -> ort.InferenceSession:
    """export.runtime.create_session's CPU settings, with ONNX Runtime's profiler writing to prefix*.json."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_profiling = True
    options.profile_file_prefix = prefix
    return ort.InferenceSession(str(graph_path), options, providers=["CPUExecutionProvider"])


def profile_decode(folder: Path, batch_size: int, context: int, window: int, threads: int | None) -> dict:
    manifest = read_manifest(folder)
    prompt = default_workload(0).decode_ids
    assert len(prompt) < context - window, f"the {len(prompt)}-token prompt is longer than the profiled contexts"
    contexts = list(range(len(prompt), context + window))  # P+T of each run: the prefill, then one per token
    with tempfile.TemporaryDirectory() as scratch:
        session = profiling_session(folder / manifest.graph.file, threads, os.path.join(scratch, "decode"))
        engine = Engine(folder, manifest, session, Tokenizer.from_folder(folder))  # its steps, on this session
        greedy_tokens(engine.step, np.tile(np.array(prompt, dtype=np.int64), (batch_size, 1)), len(contexts))
        events = json.loads(Path(session.end_profiling()).read_text())

    runs = sorted((event for event in events if event.get("name") == "model_run"), key=lambda event: event["ts"])
    assert len(runs) == len(contexts), f"{len(runs)} model_run events for {len(contexts)} runs"
    windows = [(run["ts"], run["ts"] + run["dur"]) for run, total in zip(runs, contexts)
               if context - window <= total < context + window]
    per_op: defaultdict[str, float] = defaultdict(float)
    per_node: defaultdict[str, float] = defaultdict(float)
    kernels = 0
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            if any(start <= event["ts"] <= end for start, end in windows):
                per_op[event["args"]["op_name"]] += event["dur"]
                per_node[f"{event['name'].removesuffix('_kernel_time')} ({event['args']['op_name']})"] += event["dur"]
                kernels += 1
    steps = len(windows)
    return {"steps": steps, "batch_size": batch_size, "context": context, "window": window,
            "run_ms": sum(end - start for start, end in windows) / steps / 1000, "kernels": kernels / steps,
            "op_ms": {name: micros / steps / 1000 for name, micros in sorted(per_op.items(), key=lambda x: -x[1])},
            "node_ms": {name: micros / steps / 1000
                        for name, micros in sorted(per_node.items(), key=lambda x: -x[1])[:5]}}


def format_profile(profile: dict, top: int = 12) -> str:
    kernels = sum(profile["op_ms"].values())
    lines = [f"decode step, batch {profile['batch_size']}, context {profile['context']} (+-{profile['window']}): "
             f"{profile['run_ms']:.2f} ms per session run over {profile['steps']} steps, "
             f"{kernels:.2f} ms of it in {profile['kernels']:.0f} kernel calls",
             f"{'op type':<28} {'ms/step':>8} {'share':>6}"]
    for name, milliseconds in list(profile["op_ms"].items())[:top]:
        lines.append(f"{name:<28} {milliseconds:>8.3f} {milliseconds / kernels:>6.1%}")
    lines.append("slowest nodes: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in profile["node_ms"].items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", help="our artifact folder (default: `gptserve bench`'s cached fp32 export)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--context", type=int, default=60, help="profile decode steps around this many tokens")
    parser.add_argument("--window", type=int, default=8, help="steps with context within this of --context count")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    args = parser.parse_args()
    folder = Path(args.artifacts) if args.artifacts else our_artifact(Path("bench-results") / "cache")
    profile = profile_decode(folder, args.batch_size, args.context, args.window, args.threads)
    print(format_profile(profile))


if __name__ == "__main__":
    from gptserve.cli import restart_with_huge_pages

    restart_with_huge_pages()  # measured as `gptserve` runs: on huge pages
    main()
