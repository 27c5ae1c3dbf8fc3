"""Execution provider choice, run here with the provider lists an onnxruntime-gpu build would report."""

import logging

import pytest

from gptserve.export.runtime import choose_providers, create_session, provider_options

GPU_BUILD = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
CPU_BUILD = ["CPUExecutionProvider"]


def test_auto_takes_cuda_when_the_build_has_it():
    assert choose_providers("auto", GPU_BUILD) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers("cuda", GPU_BUILD) == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_cpu_when_asked_or_when_there_is_no_cuda():
    assert choose_providers("cpu", GPU_BUILD) == ["CPUExecutionProvider"]
    assert choose_providers("auto", CPU_BUILD) == ["CPUExecutionProvider"]


def test_asking_for_cuda_without_it_falls_back_with_one_log_line(caplog):
    with caplog.at_level(logging.WARNING, logger="gptserve.runtime"):
        assert choose_providers("cuda", CPU_BUILD) == ["CPUExecutionProvider"]
    assert len(caplog.records) == 1 and "running on CPU" in caplog.records[0].getMessage()


def test_unknown_provider_is_refused():
    with pytest.raises(ValueError, match="expected auto, cpu or cuda"):
        choose_providers("tpu", CPU_BUILD)


def test_cuda_options_carry_device_and_memory_limit():
    options = provider_options(["CUDAExecutionProvider", "CPUExecutionProvider"], device_id=1, gpu_mem_limit=2 << 30)
    assert options[0] == {"device_id": "1", "arena_extend_strategy": "kSameAsRequested",
                          "gpu_mem_limit": str(2 << 30)}
    assert options[1] == {}


def test_this_machine_runs_on_cpu_even_when_cuda_is_asked(tiny_artifact):
    session = create_session(tiny_artifact / "model.onnx", provider="cuda")
    assert session.get_providers() == ["CPUExecutionProvider"]
