"""Prefix caching: the KV of prompts already read, kept in blocks of `block_tokens` positions, so that a new prompt
that starts with the same tokens (a chat's history resent, a system prompt many users share) is read from its first
uncached block on. As in vLLM's automatic prefix caching, a block is known by its tokens and the block before it
(a chain), so a match is always a whole prefix; the least recently used blocks go first when the budget is full.

Exact by construction: a block is a copy of the keys and values the engine computed for those positions after that
very prefix, and a prompt starts from a fresh copy of its blocks, so the engine's in-place appends never reach a
block. Only the engine thread uses a PrefixCache (the scheduler's).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gptserve.service.kv_cache import KVCache, on_host

# vLLM's block size: a prompt misses at most 15 cacheable positions, and a block of the default model (737 KB) is
# one copy, not thousands of small ones.
BLOCK_TOKENS = 16
# The default budget: 11,600 positions of the default model (46,080 bytes each), the 1500-token histories of
# seven conversations; a quarter of what 8 full-context sequences of the batch may take besides (1.5 GB).
PREFIX_CACHE_MB = 512


@dataclass(frozen=True, eq=False)
class Block:
    key: tuple[int, tuple[int, ...]]  # (the parent block's serial, 0 at a prompt's start; this block's tokens)
    serial: int
    kv: np.ndarray  # (2 x layers, KV, block_tokens, D): keys and values of each layer, in the engine's order


class PrefixCache:
    def __init__(self, budget_bytes: int, block_tokens: int = BLOCK_TOKENS) -> None:
        if budget_bytes < 1 or block_tokens < 1:
            raise ValueError("a prefix cache needs a budget and a block size of at least 1")
        self.budget_bytes, self.block_tokens = budget_bytes, block_tokens
        # Keys are compared by value, so a key names exactly one prefix (no hash collision can alias two).
        # Least recently used first; a block is always used after its descendants (`_touch`), so eviction takes
        # leaves and never strands a block whose parent is gone.
        self._blocks: OrderedDict[tuple[int, tuple[int, ...]], Block] = OrderedDict()
        self._serials = itertools.count(1)
        self.nbytes = 0

    @property
    def tokens(self) -> int:
        return len(self._blocks) * self.block_tokens

    def match(self, prompt: Sequence[int]) -> list[Block]:
        """The blocks of the longest cached prefix of `prompt` that leaves its last token to be read (whose logits
        give the first new token)."""
        blocks: list[Block] = []
        parent, size = 0, self.block_tokens
        for start in range(0, (len(prompt) - 1) // size * size, size):
            block = self._blocks.get((parent, tuple(prompt[start:start + size])))
            if block is None:
                break
            blocks.append(block)
            parent = block.serial
        self._touch(blocks)
        return blocks

    def cache_of(self, blocks: list[Block], capacity: int) -> KVCache:
        """A one-row cache holding these blocks' positions, in a fresh buffer with room for `capacity`."""
        layers, kv_heads, _, head_size = blocks[0].kv.shape
        buffer = np.zeros((layers, 1, kv_heads, capacity, head_size), dtype=blocks[0].kv.dtype)  # room stays lazy
        for index, block in enumerate(blocks):
            buffer[:, 0, :, index * self.block_tokens:(index + 1) * self.block_tokens] = block.kv
        return KVCache(list(buffer), [len(blocks) * self.block_tokens])  # each layer a contiguous (1, KV, C, D)

    def insert(self, prompts: list[Sequence[int]], cache: KVCache) -> None:
        """Keeps the full blocks of prompts just read (row b of `cache` holds prompts[b]) that are not cached yet,
        then evicts the least recently used blocks past the budget."""
        host: list[np.ndarray] | None = None  # device buffers are copied to the host once, and only for a miss
        for row, prompt in enumerate(prompts):
            chain: list[Block] = []
            parent, size = 0, self.block_tokens
            for start in range(0, len(prompt) // size * size, size):
                key = (parent, tuple(prompt[start:start + size]))
                block = self._blocks.get(key)
                if block is None:
                    host = host or [on_host(tensor) for tensor in cache.buffers]
                    block = Block(key, next(self._serials),
                                  np.stack([tensor[row, :, start:start + size] for tensor in host]))  # a copy
                    self._blocks[key] = block
                    self.nbytes += block.kv.nbytes
                chain.append(block)
                parent = block.serial
            self._touch(chain)
        while self.nbytes > self.budget_bytes and self._blocks:
            _, evicted = self._blocks.popitem(last=False)
            self.nbytes -= evicted.kv.nbytes

    def _touch(self, chain: list[Block]) -> None:
        """Marks a chain used, its last block first, so that every block is more recent than its descendants."""
        for block in reversed(chain):
            self._blocks.move_to_end(block.key)
