"""The exported form of the GPT: the same weights and the same function, arranged for ONNX Runtime's fused kernels.

Per block the graph holds one norm that also adds the residual (Skip[Simplified]LayerNormalization), one MatMul
for Q, K and V together, one GroupQueryAttention (rotary positions, grouped heads, the causal mask and the KV
cache append in a single kernel) and the MLP: ten kernels a block where the traced textbook module makes forty.

Rows are ragged, as the kernel wants them: row b's tokens are the first sum(attention_mask[b]) positions of its
cache, padding (if any) after them, and each step's new tokens go right after the row's own tokens. A past with
more positions than that is a buffer with room: bound as both past and present, the kernel writes the new
positions into it in place, and the cache is never copied (service/engine.py does this on CPU).

This module is only traced for export, never run: the ONNX Runtime contrib ops exist in the trace as
`torch.onnx.ops.symbolic` placeholders. That it computes exactly what `model.gpt.GPT` computes is what the
parity certification proves, against the textbook model in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from gptserve.model.gpt import GPT, Block, PastKeyValues, RMSNorm, rope_angles, rope_attention_factor

MICROSOFT = "com.microsoft::"
LOGITS_TO_KEEP = "logits_to_keep"


def blocks_of(model: GPT) -> Sequence[Block]:
    return cast("Sequence[Block]", model.blocks)  # torch's stubs: a ModuleList holds plain Modules


def skip_norm(x: torch.Tensor, skip: torch.Tensor, norm: RMSNorm | nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """norm(x + skip) and x + skip, in one kernel."""
    rms = not isinstance(norm, nn.LayerNorm)
    inputs = [x, skip, norm.weight, norm.bias] if isinstance(norm, nn.LayerNorm) else [x, skip, norm.weight]
    stats = (*x.shape[:-1], 1)
    normed, _, _, total = torch.onnx.ops.symbolic_multi_out(
        MICROSOFT + ("SkipSimplifiedLayerNormalization" if rms else "SkipLayerNormalization"), inputs,
        {"epsilon": float(norm.eps)}, dtypes=[x.dtype] * 4, shapes=[x.shape, stats, stats, x.shape], version=1)
    return normed, total


class ExportedGPT(nn.Module):
    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model, self.config = model.eval(), model.config
        config = self.config
        self.H, self.KV, self.D = config.n_head, config.kv_heads, config.head_dim
        for index, block in enumerate(blocks_of(model)):
            attention = block.attn
            parts = (attention.q_proj, attention.k_proj, attention.v_proj)
            self.register_buffer(f"qkv_weight_{index}", torch.cat([part.weight for part in parts]), persistent=False)
            if config.bias or config.qkv_bias:  # Qwen2's q, k and v biases ride in the packed projection too
                self.register_buffer(f"qkv_bias_{index}", torch.cat([part.bias for part in parts]), persistent=False)
        if config.positions == "rope":
            if self.D % 16:
                raise ValueError(f"head size {self.D}: ONNX Runtime's GroupQueryAttention applies rotary "
                                 "positions to head sizes that are multiples of 16 only")
            # (context_length, D/2) angles, scaled frequencies included, computed as the eager model computes them;
            # yarn's attention factor scales cos and sin, so the kernel's rotation scales q and k as eager does.
            angles = rope_angles(torch.arange(config.context_length), config)
            factor = rope_attention_factor(config)  # 1.0 but for yarn: the same floats
            self.register_buffer("cos_cache", angles.cos() * factor, persistent=False)
            self.register_buffer("sin_cache", angles.sin() * factor, persistent=False)
        # A query sees the last sliding_window positions, its own included: GroupQueryAttention's local_window_size
        # counts the same way (the certification's 128-token prefill and 32 decode steps cross a window).
        self.local_window = {} if config.sliding_window is None else {"local_window_size": config.sliding_window}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past_key_values: PastKeyValues):
        model, config, blocks = self.model, self.config, blocks_of(self.model)
        T, total = input_ids.shape[1], attention_mask.shape[1]
        seqlens_k = (attention_mask.sum(-1) - 1).to(torch.int32)  # (B,) each row's last position
        total_length = torch.tensor(total, dtype=torch.int32)  # a scalar tensor, as the kernel wants it

        x = model.wte(input_ids)  # (B, T, C)
        if config.positions == "learned":
            # A prompt's tokens are at 0.., a decode step's token at its row's length (rotary is the kernel's).
            x = x + model.wpe((attention_mask.cumsum(-1) - 1).clamp(min=0)[:, total - T:])
        residual, hidden = x, blocks[0].norm_1(x)
        presents = []
        for index, (block, (past_key, past_value)) in enumerate(zip(blocks, past_key_values)):
            attended, present = self.attention(index, hidden, seqlens_k, total_length, past_key, past_value)
            presents.append(present)
            hidden, residual = skip_norm(attended, residual, block.norm_2)
            next_norm = blocks[index + 1].norm_1 if index + 1 < len(blocks) else model.norm_f
            hidden, residual = skip_norm(block.mlp(hidden), residual, next_norm)
        head = model.wte.weight if config.tie_embeddings else model.lm_head.weight
        return F.linear(hidden, head), tuple(presents)

    def attention(self, index, x, seqlens_k, total_length, past_key, past_value):
        H, KV, D = self.H, self.KV, self.D
        B, T, _ = x.shape
        qkv = F.linear(x, getattr(self, f"qkv_weight_{index}"), getattr(self, f"qkv_bias_{index}", None))
        attention = self.model.blocks[index].attn
        # Q, K and V packed in one tensor, which the kernel splits; with per-head norms (Qwen3) they are split here
        # and normalized first, since the kernel rotates what it is given.
        qkv_inputs: list[torch.Tensor | None] = [qkv, None, None]
        if attention.qk_norm:
            q, k, v = qkv.split([H * D, KV * D, KV * D], dim=-1)  # (B, T, H*D), (B, T, KV*D), (B, T, KV*D)
            q = attention.q_norm(q.reshape(B, T, H, D)).reshape(B, T, H * D)  # each head over its own D
            k = attention.k_norm(k.reshape(B, T, KV, D)).reshape(B, T, KV * D)
            qkv_inputs = [q, k, v]
        rope = self.config.positions == "rope"
        present_shape = (B, KV, past_key.shape[2] + T, D)
        out, present_key, present_value = torch.onnx.ops.symbolic_multi_out(
            MICROSOFT + "GroupQueryAttention",
            [*qkv_inputs, past_key, past_value, seqlens_k, total_length,
             *((self.cos_cache, self.sin_cache) if rope else ())],
            {"num_heads": H, "kv_num_heads": KV, "scale": 1.0 / math.sqrt(D), "do_rotary": int(rope),
             **self.local_window},
            dtypes=[x.dtype] * 3, shapes=[(B, T, H * D), present_shape, present_shape], version=1)
        return attention.o_proj(out), (present_key, present_value)


def add_logits_to_keep(model: onnx.ModelProto) -> None:
    """An optional scalar input: logits of the last N positions only (0, the default: of every position).
    A prefill samples from its last position alone, and the LM head over every prompt position is about a fifth
    of its work (and B x T x V floats written). Added to the ONNX graph itself: a default value for an input is
    an ONNX initializer of the same name, which torch.export cannot express. Callers that do not know the input
    (onnxruntime-genai) get every position, as before."""
    graph = model.graph
    head = next(node for node in graph.node if "logits" in node.output)
    int64 = lambda name, value: onnx.numpy_helper.from_array(np.array(value, dtype=np.int64), name)
    graph.input.append(onnx.helper.make_tensor_value_info(LOGITS_TO_KEEP, onnx.TensorProto.INT64, []))
    graph.initializer.extend([int64(LOGITS_TO_KEEP, 0), int64("logits_to_keep.axis", [0]),
                              int64("logits_to_keep.end", [np.iinfo(np.int64).max]),
                              int64("logits_to_keep.sequence_axis", [1])])
    kept = "logits_to_keep.hidden"
    nodes = [
        onnx.helper.make_node("Neg", [LOGITS_TO_KEEP], ["logits_to_keep.negated"]),
        onnx.helper.make_node("Unsqueeze", ["logits_to_keep.negated", "logits_to_keep.axis"], ["logits_to_keep.start"]),
        onnx.helper.make_node("Slice", [head.input[0], "logits_to_keep.start", "logits_to_keep.end",
                                        "logits_to_keep.sequence_axis"], [kept]),
    ]
    index = list(graph.node).index(head)
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)
    head.input[0] = kept


def drop_unused_outputs(model: onnx.ModelProto) -> None:
    """Names no node reads (the norms' mean and inverse deviation) become '': ONNX's mark of an optional output
    left out, so the kernels skip computing and writing them (about 2% of a batch-8 decode step)."""
    read = {name for node in model.graph.node for name in node.input} | {value.name for value in model.graph.output}
    for node in model.graph.node:
        for index, name in enumerate(node.output):
            if name not in read:
                node.output[index] = ""
