"""The batched KV cache of the running sequences: rows join (left-padded to a common length) and leave.

Positions come from the attention mask, so left padding changes no sequence's results: padded columns are
masked out of every softmax, and the trim on leave drops columns no row uses any more.
"""

from __future__ import annotations

import numpy as np


def on_host(tensor) -> np.ndarray:
    """KV tensors are numpy on CPU, or device OrtValues on CUDA: regrouping a batch works on host copies."""
    return tensor if isinstance(tensor, np.ndarray) else tensor.numpy()


class BatchCache:
    """past: flat per-layer [key, value, ...], each (B, KV, capacity, D); mask: (B, P), 1 where a row has a
    token. The first P positions of each buffer are the cache; any beyond are room for the engine to fill."""

    def __init__(self, past: list[np.ndarray], mask: np.ndarray) -> None:
        self.past, self.mask = past, mask

    @property
    def size(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def extend(self, present: list[np.ndarray]) -> None:
        """After a decode step: every row gained one token."""
        self.past = present
        self.mask = np.concatenate([self.mask, np.ones((self.size, 1), dtype=np.int64)], axis=1)

    @staticmethod
    def join(caches: list["BatchCache"]) -> "BatchCache":
        """Stacks batches, left-padding the shorter ones with masked zeros."""
        caches = [cache for cache in caches if cache is not None and cache.size]
        if len(caches) == 1:
            return caches[0]
        width = max(cache.length for cache in caches)
        padded = [cache._pad_left(width - cache.length) for cache in caches]
        past = [np.concatenate([on_host(tensor)[:, :, :width] for tensor in tensors], axis=0)
                for tensors in zip(*(cache.past for cache in padded))]
        return BatchCache(past, np.concatenate([cache.mask for cache in padded], axis=0))

    def select(self, rows: list[int]) -> "BatchCache":
        """Keeps these rows, dropping leading columns that are padding in all of them."""
        mask = self.mask[rows]
        used = np.flatnonzero(mask.any(axis=0))
        start = int(used[0]) if len(used) else mask.shape[1]
        return BatchCache([on_host(tensor)[rows, :, start:self.length] for tensor in self.past], mask[:, start:])

    def _pad_left(self, columns: int) -> "BatchCache":
        if not columns:
            return self
        past = [np.pad(on_host(tensor)[:, :, :self.length], ((0, 0), (0, 0), (columns, 0), (0, 0)))
                for tensor in self.past]
        return BatchCache(past, np.pad(self.mask, ((0, 0), (columns, 0))))
