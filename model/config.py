"""The one GPT configuration: both architecture families are data, not subclasses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    context_length: int
    intermediate_size: int
    n_kv_heads: int | None = None  # None: as many as n_head (plain multi-head attention)
    positions: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "swiglu"] = "gelu"
    bias: bool = True  # biases of the attention and MLP projections
    tie_embeddings: bool = True
    dropout: float = 0.0  # attention-weight dropout, active in training only
    architecture: Literal["gpt2", "llama"] = "gpt2"

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head {self.n_head} is not divisible by n_kv_heads {self.kv_heads}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head size, got {self.head_dim}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GPTConfig:
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})

    def replace(self, **changes) -> GPTConfig:
        return dataclasses.replace(self, **changes)


def _gpt2(n_layer: int, n_head: int, n_embd: int) -> GPTConfig:
    return GPTConfig(
        vocab_size=50257, n_layer=n_layer, n_head=n_head, n_embd=n_embd, context_length=1024,
        intermediate_size=4 * n_embd, norm_eps=1e-5, architecture="gpt2",
    )


def _llama(**fields) -> GPTConfig:
    defaults = dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, architecture="llama")
    return GPTConfig(**{**defaults, **fields})


PRESETS: dict[str, GPTConfig] = {
    "gpt2": _gpt2(12, 12, 768),
    "gpt2-medium": _gpt2(24, 16, 1024),
    "gpt2-large": _gpt2(36, 20, 1280),
    "gpt2-xl": _gpt2(48, 25, 1600),
    "smollm2-135m": _llama(
        vocab_size=49152, n_layer=30, n_head=9, n_kv_heads=3, n_embd=576, intermediate_size=1536,
        context_length=8192, rope_theta=100000.0, tie_embeddings=True,
    ),
    "tiny-gpt2": GPTConfig(
        vocab_size=256, n_layer=2, n_head=4, n_embd=64, context_length=256, intermediate_size=256,
    ),
    "tiny-llama": _llama(
        vocab_size=256, n_layer=2, n_head=4, n_kv_heads=2, n_embd=64, intermediate_size=160,
        context_length=256, tie_embeddings=False,
    ),
}


def preset(name: str) -> GPTConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}") from None
