"""`gptserve bench`: prefill time, decode tokens/s and peak memory of the default model, our systems side by side
with Hugging Face transformers and onnxruntime-genai, in one run.

  eager          our PyTorch model (EagerStep), the reference path
  onnx-fp32      our ONNX Runtime engine on our fp32 artifact
  onnx-int4      the same on our int4 artifact (both exported into the cache; more of ours with --ours NAME=DIR)
  transformers   AutoModelForCausalLM.generate() on the same weights (fp32, from a folder written from the GGUF)
  genai-fp32     onnxruntime-genai on its model builder's fp32 export of that folder
  genai-int4     the same, int4 (its builder's own quantization)
  llama.cpp      llama.cpp on the Q4_1 GGUF itself (llama-cpp-python, compiled into the cache on first use)

Every figure comes from a fresh process (`python -m gptserve.bench.runners`), one per system, batch size and
repetition, so a system's peak memory is its own; each repetition runs the systems in the opposite order to the
last, so slow drift of the machine spreads over all of them. All systems use every core and the same token ids.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from gptserve.bench import prepare
from gptserve.bench.report import format_table, summarise, token_agreement, write_chart
from gptserve.bench.workload import Workload, default_workload

BASELINES = ("transformers", "genai-fp32", "genai-int4", "llama.cpp")
CHILD_TIMEOUT = 1800  # seconds for one measurement process, loading included


@dataclass(frozen=True)
class System:
    name: str
    kind: str  # eager | onnx | transformers | genai | llama.cpp
    path: str | None  # the folder it loads
    ours: bool


# Our systems measured by default, and the precision each is exported at when no folder is given.
OUR_EXPORTS = {"onnx-fp32": "fp32", "onnx-int4": "int4"}


def parse_ours(values: list[str], artifacts: str | None) -> dict[str, str | None]:
    """NAME=DIR pairs, after onnx-fp32 (--artifacts) and onnx-int4 (None: exported into the cache when first
    needed; NAME=DIR replaces them)."""
    ours: dict[str, str | None] = {"onnx-fp32": artifacts, "onnx-int4": None}
    for value in values:
        name, separator, folder = value.partition("=")
        if not separator or not name or not folder:
            raise SystemExit(f"--ours {value!r}: expected NAME=DIR")
        if name == "eager" or name in BASELINES:
            raise SystemExit(f"--ours {value!r}: {name!r} is already a system")
        ours[name] = folder
    for name, path in ours.items():
        if path is not None and not (Path(path) / "manifest.json").is_file():
            raise SystemExit(f"{name}: {path} holds no manifest.json; is it a `gptserve export` folder?")
    return ours


def prepare_system(name: str, ours: dict[str, str | None], cache: Path) -> System:
    if name == "eager":
        return System(name, "eager", None, True)
    if name in ours:
        return System(name, "onnx", ours[name] or str(prepare.our_artifact(cache, OUR_EXPORTS[name])), True)
    if name == "transformers":
        return System(name, "transformers", str(prepare.hf_folder(cache)), False)
    if name == "llama.cpp":
        return System(name, "llama.cpp", str(prepare.llama_cpp(cache)), False)
    return System(name, "genai", str(prepare.genai_model(cache, name.removeprefix("genai-"))), False)


def measure(system: System, batch_size: int, workload: Workload, threads: int, scratch: Path) -> dict:
    task_path, result_path = scratch / "task.json", scratch / "result.json"
    task = {"system": asdict(system), "batch_size": batch_size, "threads": threads, "workload": workload.to_json()}
    task_path.write_text(json.dumps(task))
    result_path.unlink(missing_ok=True)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}
    try:
        child = subprocess.run([sys.executable, "-m", "gptserve.bench.runners", str(task_path), str(result_path)],
                               capture_output=True, text=True, timeout=CHILD_TIMEOUT, env=environment)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {CHILD_TIMEOUT} s"}
    if child.returncode or not result_path.is_file():
        tail = "\n".join((child.stdout + child.stderr).splitlines()[-15:])
        return {"error": f"exit {child.returncode}:\n{tail}"}
    return json.loads(result_path.read_text())


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return {"cpu": names[0] if names else platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version()}


def versions() -> dict:
    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {name: installed(name) for name in ("torch", "onnxruntime", "onnxruntime-genai", "transformers")}


def choose_systems(args) -> tuple[list[str], dict[str, str | None]]:
    """The systems --systems names, in the fixed order of the table, and our artifact folders."""
    ours = parse_ours(args.ours, args.artifacts)
    known = ["eager", *ours, *BASELINES]
    asked = args.systems.split(",") if args.systems else known
    unknown = [name for name in asked if name not in known]
    if unknown:
        raise SystemExit(f"--systems: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    return [name for name in known if name in asked], ours


def run_all(systems: list[System], batch_sizes: list[int], repeats: int, workload: Workload, threads: int,
            scratch: Path) -> list[dict]:
    """Every system at every batch size, once per repetition, each repetition in the opposite order to the last."""
    order = [(system, size) for system in systems for size in batch_sizes]
    measurements = []
    try:
        for repeat in range(repeats):
            for system, batch_size in order if repeat % 2 == 0 else order[::-1]:
                result = measure(system, batch_size, workload, threads, scratch)
                measurements.append({"system": system.name, "batch_size": batch_size, "repeat": repeat, **result})
                figures = (f"error: {result['error']}" if "error" in result else
                           f"prefill {result['prefill_ms']:.1f} ms, decode {result['decode_tokens_per_second']:.1f} "
                           f"tok/s, peak RSS {result['peak_rss_mb']:.0f} MB, load average {result['load_average']:.2f}")
                print(f"[bench] {len(measurements)}/{repeats * len(order)} {system.name} batch {batch_size}: "
                      f"{figures}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see run_bench): a long run still reports what it measured
        print(f"[bench] interrupted: reporting the {len(measurements)} measurements made", file=sys.stderr)
    return measurements


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_bench(args) -> int:
    names, ours = choose_systems(args)
    try:
        batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    except ValueError:
        raise SystemExit(f"--batch-sizes {args.batch_sizes!r}: expected comma-separated integers") from None
    threads = args.threads or os.cpu_count() or 1
    results = Path(args.results)
    cache = results / "cache"
    cache.mkdir(parents=True, exist_ok=True)

    workload = default_workload(args.new_tokens)
    systems = []
    for name in list(names):
        try:
            systems.append(prepare_system(name, ours, cache))
        except prepare.PrepareError as error:
            if name != "llama.cpp":
                raise SystemExit(str(error)) from None
            # The one baseline compiled from source: where it does not build, the run goes on without it.
            print(f"[bench] leaving llama.cpp out: {error}", file=sys.stderr, flush=True)
            names.remove(name)
    load_before = os.getloadavg()[0]
    print(f"[bench] {len(systems)} systems x batch sizes {batch_sizes} x {args.repeats} repetitions, "
          f"{threads} threads each (load average now {load_before:.2f})", file=sys.stderr, flush=True)
    started = time.perf_counter()
    signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        measurements = run_all(systems, batch_sizes, args.repeats, workload, threads, Path(scratch))
    minutes = (time.perf_counter() - started) / 60
    expected = args.repeats * len(systems) * len(batch_sizes)
    interrupted = len(measurements) < expected
    load_after = os.getloadavg()[0]

    rows = summarise(measurements, names, {system.name for system in systems if system.ours}, batch_sizes)
    about = machine()
    print("\n".join([
        f"machine: {about['cpu']}, {about['cores']} cores, {about['platform']}; load average {load_before:.2f} "
        f"before, {load_after:.2f} after ({minutes:.1f} minutes)",
        "versions: " + ", ".join(f"{name} {number}" for name, number in versions().items()),
        *(f"{system.name}: {system.path}" for system in systems if system.kind == "onnx"),
        f"workload: default model; prefill {len(workload.prefill_ids)} tokens; decode {len(workload.decode_ids)}-token "
        f"chat prompt + {workload.new_tokens} greedy tokens (EOS suppressed); batch B = B copies; "
        f"{threads} threads; {args.repeats} processes per figure",
        *([f"INTERRUPTED: {len(measurements)} of {expected} measurements made"] if interrupted else []),
        format_table(rows),
        token_agreement(measurements, names),
    ]))
    report = {"command": sys.argv, "machine": about, "versions": versions(), "threads": threads,
              "load_average": {"before": load_before, "after": load_after}, "minutes": minutes,
              "interrupted": interrupted,
              "workload": workload.to_json(), "systems": [asdict(system) for system in systems],
              "summary": [asdict(row) for row in rows], "measurements": measurements}
    (results / "bench.json").write_text(json.dumps(report, indent=1) + "\n")
    chart = results / "bench.png"
    drawn = write_chart(rows, chart, f"{about['cpu']}, {threads} threads; median, min-max bars")
    print(f"figures in {results / 'bench.json'}" + (f", chart in {chart}" if drawn else
                                                    " (no chart: pip install matplotlib)"))
    return 130 if interrupted else 1 if any("error" in item for item in measurements) else 0
