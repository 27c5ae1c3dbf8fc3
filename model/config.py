"""The one GPT configuration: every architecture family (GPT-2, Llama, Qwen2, Qwen3, Mistral, Phi-3) is data,
not a subclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

Architecture = Literal["gpt2", "llama", "qwen2", "qwen3", "mistral", "phi3"]


@dataclass(frozen=True)
class RopeScaling:
    """Rotary frequencies stretched past the context the model was pretrained on (Hugging Face's rope_parameters,
    llama.cpp's rope_freqs). Each kind changes every frequency by a factor of its own, fixed at load, so one table
    of angles serves every position: what the export's cos/sin caches need."""

    kind: Literal["linear", "llama3", "yarn", "factors"]
    factor: float = 1.0  # linear, llama3, yarn: how far the context was stretched
    original_context: int = 0  # llama3, yarn: the pretraining context length
    low_freq_factor: float = 1.0  # llama3: wavelengths above original_context / this are divided by factor
    high_freq_factor: float = 4.0  # llama3: wavelengths below original_context / this are left alone
    beta_fast: float = 32.0  # yarn: rotations bounding the frequencies kept as they are
    beta_slow: float = 1.0  # yarn: rotations bounding the frequencies interpolated in full
    truncate: bool = True  # yarn: the ramp's bounds rounded outwards to whole dimensions
    attention_factor: float = 1.0  # yarn: cos and sin scaled by this (the paper's mscale)
    frequency_divisors: tuple[float, ...] = ()  # factors: each frequency divided by its own (llama.cpp's rope_freqs)

    def __post_init__(self) -> None:
        if self.kind in ("linear", "llama3", "yarn") and not self.factor > 0:
            raise ValueError(f"rope scaling {self.kind!r} needs a positive factor, got {self.factor}")
        if self.kind in ("llama3", "yarn") and self.original_context <= 0:
            raise ValueError(f"rope scaling {self.kind!r} needs original_context (original_max_position_embeddings)")
        if self.kind == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"llama3 rope scaling: high_freq_factor {self.high_freq_factor} must exceed "
                             f"low_freq_factor {self.low_freq_factor}")
        if self.kind == "factors" and not self.frequency_divisors:
            raise ValueError("rope scaling 'factors' needs frequency_divisors")


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
    architecture: Architecture = "gpt2"
    head_size: int | None = None  # None: n_embd // n_head; Qwen3 and Mistral Nemo set their own
    qkv_bias: bool = False  # biases on the Q, K and V projections alone (Qwen2); `bias` covers all of them
    qk_norm: bool = False  # RMSNorm of each head's queries and keys, before the rotary (Qwen3)
    sliding_window: int | None = None  # a query sees the last this many positions only (Mistral); None: all
    rope_scaling: RopeScaling | None = None

    def __post_init__(self) -> None:
        if self.head_size is None and self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head {self.n_head} is not divisible by n_kv_heads {self.kv_heads}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head size, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window {self.sliding_window}: expected a positive window or None")
        if self.rope_scaling is not None:
            if self.positions != "rope":
                raise ValueError("rope_scaling is set but positions are not rotary")
            divisors = self.rope_scaling.frequency_divisors
            if divisors and len(divisors) != self.head_dim // 2:
                raise ValueError(f"rope scaling has {len(divisors)} frequency divisors; the head size "
                                 f"{self.head_dim} has {self.head_dim // 2} frequencies")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_head

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GPTConfig:
        names = {field.name for field in dataclasses.fields(cls)}
        fields = {key: value for key, value in data.items() if key in names}
        if isinstance(fields.get("rope_scaling"), dict):
            scaling = dict(fields["rope_scaling"])
            scaling["frequency_divisors"] = tuple(scaling.get("frequency_divisors", ()))
            fields["rope_scaling"] = RopeScaling(**scaling)
        return cls(**fields)

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
    "smollm2-360m": _llama(
        vocab_size=49152, n_layer=32, n_head=15, n_kv_heads=5, n_embd=960, intermediate_size=2560,
        context_length=8192, rope_theta=100000.0, tie_embeddings=True,
    ),
    "llama-3.2-1b": _llama(
        vocab_size=128256, n_layer=16, n_head=32, n_kv_heads=8, n_embd=2048, intermediate_size=8192,
        context_length=131072, rope_theta=500000.0, tie_embeddings=True,
        rope_scaling=RopeScaling("llama3", factor=32.0, original_context=8192, low_freq_factor=1.0,
                                 high_freq_factor=4.0),
    ),
    "qwen2.5-0.5b": _llama(
        vocab_size=151936, n_layer=24, n_head=14, n_kv_heads=2, n_embd=896, intermediate_size=4864,
        context_length=32768, rope_theta=1000000.0, norm_eps=1e-6, tie_embeddings=True, qkv_bias=True,
        architecture="qwen2",
    ),
    "qwen3-0.6b": _llama(
        vocab_size=151936, n_layer=28, n_head=16, n_kv_heads=8, n_embd=1024, head_size=128, intermediate_size=3072,
        context_length=40960, rope_theta=1000000.0, norm_eps=1e-6, tie_embeddings=True, qk_norm=True,
        architecture="qwen3",
    ),
    "mistral-7b-v0.3": _llama(
        vocab_size=32768, n_layer=32, n_head=32, n_kv_heads=8, n_embd=4096, intermediate_size=14336,
        context_length=32768, rope_theta=1000000.0, tie_embeddings=False, architecture="mistral",
    ),
    "phi-3-mini-4k": _llama(
        vocab_size=32064, n_layer=32, n_head=32, n_kv_heads=32, n_embd=3072, intermediate_size=8192,
        context_length=4096, tie_embeddings=False, sliding_window=2047, architecture="phi3",
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
