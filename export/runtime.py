"""ONNX Runtime sessions for artifacts, with execution providers chosen at run time. Torch-free."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger("gptserve.runtime")


def choose_providers(requested: str = "auto", available: list[str] | None = None) -> list[str]:
    """CUDA when present and asked for (or 'auto'), else CPU; asking for CUDA without it falls back loudly."""
    available = ort.get_available_providers() if available is None else available
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown execution provider {requested!r}; expected auto, cpu or cuda")
    if requested != "cpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if requested == "cuda":
        log.warning("CUDA was asked for but this onnxruntime has no CUDAExecutionProvider (has %s); "
                    "running on CPU", ", ".join(available))
    return ["CPUExecutionProvider"]


def provider_options(providers: list[str], device_id: int, gpu_mem_limit: int | None) -> list[dict]:
    """Per-provider settings: CUDA gets its device and a bounded, on-demand arena (replicas can share a GPU)."""
    cuda = {"device_id": str(device_id), "arena_extend_strategy": "kSameAsRequested"}
    if gpu_mem_limit:
        cuda["gpu_mem_limit"] = str(gpu_mem_limit)
    return [cuda if name == "CUDAExecutionProvider" else {} for name in providers]


_shared_threads = False


def share_threads(threads: int | None) -> None:
    """Every session this process creates from now on runs on one intra-op thread pool of `threads` (default: the
    cores). For a draft model beside the served one: two sessions taking turns on the same cores with a pool each
    steal each other's cores (idle pool threads spin), which doubled a draft step and a verification here. Call it
    before the process's first session: ONNX Runtime sizes its global pools when it creates its environment."""
    global _shared_threads
    from onnxruntime.capi import _pybind_state

    _pybind_state.set_global_thread_pool_sizes(threads or os.cpu_count() or 1, 1)
    _shared_threads = True


def create_session(
    graph_path: str | Path,
    provider: str = "auto",
    threads: int | None = None,
    device_id: int = 0,
    gpu_mem_limit: int | None = None,
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if _shared_threads:
        options.use_per_session_threads = False  # the process's pool (share_threads), sized there
    else:
        # One decode step is small: threads equal to the cores, no spinning between ops of different sizes.
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
    # ALL adds the layout and fusion passes that measurably speed up the CPU decode step; parity is checked
    # on this same setting by the certification and the engine's start-up canary.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    providers = choose_providers(provider)
    return ort.InferenceSession(str(graph_path), options, providers=providers,
                                provider_options=provider_options(providers, device_id, gpu_mem_limit))
