"""The files each system reads, made once and cached under RESULTS/cache: our fp32 artifact, a Hugging Face folder
written from the default GGUF (what transformers and onnxruntime-genai's model builder read), and the builder's
exports of that folder. Each is made in a child process, written aside and moved into place when complete."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


class PrepareError(RuntimeError):
    pass


def _run_logged(description: str, command: list[str], log: Path) -> None:
    print(f"[bench] {description} (once; log in {log})", file=sys.stderr, flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        returncode = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode
    if returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise PrepareError(f"{description} failed (exit {returncode}); the end of {log}:\n{tail}")


def _make_once(folder: Path, marker: str, description: str, command: list[str]) -> Path:
    """Runs command with {out} replaced by a scratch folder, then moves that folder into place."""
    if (folder / marker).is_file():
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    command = [part.replace("{out}", str(partial)) for part in command]
    _run_logged(description, command, folder.parent / "logs" / f"{folder.name}.log")
    if not (partial / marker).is_file():
        raise PrepareError(f"{description}: finished without writing {marker}")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def write_hf_folder(out: str) -> None:
    """The default GGUF as a Hugging Face folder, dequantized to fp32 by transformers (runs in a child)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from gptserve.model.fetch import fetch_default_gguf

    gguf = fetch_default_gguf()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model (it counts as quantized): the same weights go
    # into a plain model built from the config without its quantization_config.
    config = copy.deepcopy(loaded.config)
    del config.quantization_config
    assert isinstance(config, LlamaConfig)  # SmolLM2 is a Llama
    plain = LlamaForCausalLM(config).to(torch.float32)  # type: ignore[arg-type]  # transformers' @wraps loses self
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.save_pretrained(out)
    PreTrainedTokenizerFast.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def hf_folder(cache: Path) -> Path:
    script = "import sys; from gptserve.bench.prepare import write_hf_folder; write_hf_folder(sys.argv[1])"
    return _make_once(cache / "hf", "config.json", "writing a Hugging Face folder from the GGUF",
                      [sys.executable, "-c", script, "{out}"])


def genai_model(cache: Path, precision: str) -> Path:
    """onnxruntime-genai's own export of the Hugging Face folder, by its model builder."""
    source = hf_folder(cache)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        return _make_once(
            cache / f"genai-{precision}", "genai_config.json", f"building the onnxruntime-genai {precision} model",
            [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", "{out}",
             "-p", precision, "-e", "cpu", "-c", scratch])


LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"


def llama_cpp(cache: Path) -> Path:
    """llama.cpp's Python binding, compiled from source for this CPU (about 7 minutes on 2 cores) into a folder
    of its own: kept out of the project's environment, which CI builds from scratch."""
    return _make_once(cache / "llama-cpp-python", "llama_cpp/__init__.py", f"compiling {LLAMA_CPP_PYTHON}",
                      [sys.executable, "-m", "pip", "install", "--no-input", "--target", "{out}", LLAMA_CPP_PYTHON])


def exporter_fingerprint() -> str:
    """A hash of the code an export runs (the export and model packages), so that an artifact cached by older
    code is never measured as today's."""
    digest = hashlib.sha256()
    for package in ("gptserve.export", "gptserve.model"):
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.submodule_search_locations  # our own packages, installed with this one
        folder = Path(spec.submodule_search_locations[0])
        for path in sorted(folder.rglob("*.py")):
            digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def our_artifact(cache: Path, precision: str = "fp32") -> Path:
    """Our artifact of the default model at this precision, exported (and certified) by today's exporter;
    artifacts of earlier exporter code are deleted."""
    folder = cache / f"onnx-{precision}-{exporter_fingerprint()}"
    for stale in cache.glob(f"onnx-{precision}-*"):
        if stale != folder:
            shutil.rmtree(stale)
    script = ("import sys; from gptserve.export.exporter import export; from gptserve.model.spec import DEFAULT_MODEL; "
              "export(DEFAULT_MODEL, sys.argv[1], precision=sys.argv[2])")
    return _make_once(folder, "manifest.json", f"exporting the default model to an {precision} artifact",
                      [sys.executable, "-c", script, "{out}", precision])
