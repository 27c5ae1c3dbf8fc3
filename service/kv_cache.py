"""The KV cache of a batch of sequences, owned by the engine that filled it: ragged rows that join, leave, pause
and resume. The scheduler holds it as an opaque value and calls its verbs; only the engine reads its buffers.

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


class KVCache:
    """buffers: the engine's, flat per layer [key, value, ...], each (B, KV, capacity, D), capacity >= the longest
    row (positions past a row's length are padding or room the engine fills in place). After a step the engine
    replaces them; the buffers a cache held before are spent. lengths: (B,) tokens cached per row."""

    def __init__(self, buffers: list, lengths) -> None:
        self.buffers, self.lengths = buffers, np.asarray(lengths, dtype=np.int64)

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def nbytes(self) -> int:
        """Bytes the rows' cached positions take (what a paused stream holds while it waits; host buffers)."""
        per_position = sum(tensor.shape[1] * tensor.shape[3] * tensor.itemsize for tensor in self.buffers)
        return int(self.lengths.sum()) * per_position

    def reserve(self, positions: int) -> None:
        """Room for `positions` per row in host buffers, so a prompt read in chunks grows its cache once instead of
        copying it at every doubling (zeros are not resident until written)."""
        self.buffers = [_grown(tensor, positions) if isinstance(tensor, np.ndarray) and tensor.shape[2] < positions
                        else tensor for tensor in self.buffers]  # a new list: any binding of the old one is spent

    def attention_mask(self, new_tokens: int = 1) -> np.ndarray:
        """The mask of a step that appends `new_tokens` to every row: (B, longest + new_tokens)."""
        return ragged_mask(self.lengths + new_tokens)

    def advance(self, buffers: list, new_tokens: int = 1) -> None:
        """After a step: every row gained `new_tokens` positions, now in `buffers`."""
        self.buffers, self.lengths = buffers, self.lengths + new_tokens

    def rewind(self, positions: int) -> None:
        """Takes back every row's last `positions` (drafted tokens the target rejected): room the next step
        overwrites in place."""
        self.lengths = self.lengths - positions

    @staticmethod
    def join(caches: list[KVCache | None]) -> KVCache:
        """Stacks batches. The buffers keep the room of the roomiest (a running batch's), so the next step does
        not copy the joined cache again to grow it; only cached positions are copied (the room is zeros)."""
        filled = [cache for cache in caches if cache is not None and cache.size]
        if len(filled) == 1:
            return filled[0]
        sizes = np.cumsum([0, *(cache.size for cache in filled)])
        cached = [int(cache.lengths.max()) for cache in filled]  # each part's positions to copy
        buffers = []
        for layer in zip(*(cache.buffers for cache in filled)):
            tensors = [on_host(tensor) for tensor in layer]
            _, heads, _, dim = tensors[0].shape
            if any((tensor.shape[1], tensor.shape[3], tensor.dtype) != (heads, dim, tensors[0].dtype)
                   for tensor in tensors):  # numpy would broadcast one head into all: refuse, as concatenate did
                raise ValueError(f"cannot join KV caches of shapes {[tensor.shape for tensor in tensors]}")
            joined = np.zeros((int(sizes[-1]), heads, max(tensor.shape[2] for tensor in tensors), dim),
                              dtype=tensors[0].dtype)
            for tensor, width, start, stop in zip(tensors, cached, sizes, sizes[1:]):
                joined[start:stop, :, :width] = tensor[:, :, :width]
            buffers.append(joined)
        return KVCache(buffers, np.concatenate([cache.lengths for cache in filled]))

    def select(self, rows: list[int]) -> KVCache:
        """These rows only, as a batch of their own (copied, cut to their longest row)."""
        lengths = self.lengths[rows]
        return KVCache([on_host(tensor)[rows, :, :int(lengths.max())] for tensor in self.buffers], lengths)

    def truncate(self, length: int) -> KVCache:
        """Every row cut to at most its first `length` positions (a shared prefix); it
        shares those positions with this cache, which never rewrites them."""
        lengths = np.minimum(self.lengths, length)
        return KVCache([on_host(tensor)[:, :, :length] for tensor in self.buffers], lengths)


def _grown(tensor: np.ndarray, capacity: int) -> np.ndarray:
    """The buffer with room for `capacity` positions; the new room is untouched zeros (not resident)."""
    grown = np.zeros((*tensor.shape[:2], capacity, tensor.shape[3]), dtype=tensor.dtype)
    grown[:, :, :tensor.shape[2]] = tensor
    return grown
