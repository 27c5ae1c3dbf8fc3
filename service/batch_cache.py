"""The batched KV cache of the running sequences: ragged rows that join and leave.

Row b's cache is the first lengths[b] positions of its buffers; each decode step appends its token right after
them (the graph's layout, export/fused.py). A row's positions never move, so joining and leaving only stack and
pick rows: no shifting, no padding in front.
"""

from __future__ import annotations

import numpy as np

from gptserve.export.contract import ragged_mask


def on_host(tensor) -> np.ndarray:
    """KV tensors are numpy on CPU, or device OrtValues on CUDA: regrouping a batch works on host copies."""
    return tensor if isinstance(tensor, np.ndarray) else tensor.numpy()


class BatchCache:
    """past: flat per-layer [key, value, ...], each (B, KV, capacity, D); lengths: (B,) tokens cached per row.
    Positions beyond a row's length are padding or room for the engine to fill."""

    def __init__(self, past: list, lengths: np.ndarray) -> None:
        self.past, self.lengths = past, np.asarray(lengths, dtype=np.int64)

    @property
    def size(self) -> int:
        return len(self.lengths)

    def decode_mask(self) -> np.ndarray:
        """The attention mask of the next decode step, its new token included: (B, longest + 1)."""
        return ragged_mask(self.lengths + 1)

    def extend(self, present: list) -> None:
        """After a decode step: every row gained one token."""
        self.past, self.lengths = present, self.lengths + 1

    @staticmethod
    def join(caches: list["BatchCache | None"]) -> "BatchCache":
        """Stacks batches (their buffers cut or zero-extended to the longest row)."""
        caches = [cache for cache in caches if cache is not None and cache.size]
        if len(caches) == 1:
            return caches[0]
        width = max(int(cache.lengths.max()) for cache in caches)
        past = [np.concatenate([_width(on_host(tensor), width) for tensor in tensors], axis=0)
                for tensors in zip(*(cache.past for cache in caches))]
        return BatchCache(past, np.concatenate([cache.lengths for cache in caches]))

    def select(self, rows: list[int]) -> "BatchCache":
        """These rows only, as a batch of their own (copied, cut to their longest row)."""
        lengths = self.lengths[rows]
        return BatchCache([on_host(tensor)[rows, :, :int(lengths.max())] for tensor in self.past], lengths)


def _width(tensor: np.ndarray, width: int) -> np.ndarray:
    """(B, KV, width, D): the first `width` positions, zeros where the buffer is shorter."""
    if tensor.shape[2] >= width:
        return tensor[:, :, :width]
    return np.pad(tensor, ((0, 0), (0, 0), (0, width - tensor.shape[2]), (0, 0)))
