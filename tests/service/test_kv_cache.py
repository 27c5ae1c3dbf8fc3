"""The KV cache's verbs on ragged rows: a row's positions never move, whatever joins, leaves, shrinks or grows."""

from __future__ import annotations

import numpy as np
import pytest

from gptserve.service.kv_cache import KVCache


def cache_of(lengths: list[int], capacity: int, seed: int) -> KVCache:
    """Two layers' keys and values (B, KV=2, capacity, D=3); each row's positions past its length are zeros."""
    rng = np.random.default_rng(seed)
    buffers = [rng.standard_normal((len(lengths), 2, capacity, 3)).astype(np.float32) for _ in range(4)]
    for tensor in buffers:
        for row, length in enumerate(lengths):
            tensor[row, :, length:] = 0
    return KVCache(buffers, lengths)


def row(cache: KVCache, index: int) -> list[np.ndarray]:
    """One row's cached positions, per buffer."""
    return [tensor[index, :, :cache.lengths[index]] for tensor in cache.buffers]


def same(left: list[np.ndarray], right: list[np.ndarray]) -> bool:
    return all(np.array_equal(a, b) for a, b in zip(left, right, strict=True))


def test_join_and_select_keep_every_rows_positions():
    first, second = cache_of([5, 2], 8, seed=0), cache_of([7], 7, seed=1)
    joined = KVCache.join([first, None, second])
    # The room of the roomiest part (8 positions) is kept, as zeros past each row's cached positions.
    assert list(joined.lengths) == [5, 2, 7] and joined.buffers[0].shape == (3, 2, 8, 3)
    assert not any(tensor[row, :, length:].any() for tensor in joined.buffers for row, length in enumerate([5, 2, 7]))
    assert same(row(joined, 0), row(first, 0)) and same(row(joined, 1), row(first, 1))
    assert same(row(joined, 2), row(second, 0))
    picked = joined.select([2, 0])
    assert list(picked.lengths) == [7, 5]
    assert same(row(picked, 0), row(second, 0)) and same(row(picked, 1), row(first, 0))
    assert picked.nbytes == (7 + 5) * 4 * (2 * 3 * 4)  # positions x buffers x (KV heads x head size x 4 bytes)


def test_join_refuses_caches_of_other_shapes():
    """A cache of one KV head would broadcast into every head of the joined buffers: an error, not a wrong cache."""
    good, odd = cache_of([3], 4, seed=3), cache_of([2], 4, seed=4)
    odd = KVCache([tensor[:, :1] for tensor in odd.buffers], odd.lengths)
    with pytest.raises(ValueError, match="cannot join KV caches"):
        KVCache.join([good, odd])


def test_truncate_keeps_a_prefix_and_reserve_makes_room_without_moving_it():
    cache = cache_of([6, 3], 6, seed=2)
    prefix = cache.truncate(4)
    assert list(prefix.lengths) == [4, 3]
    assert same(row(prefix, 0), [tensor[0, :, :4] for tensor in cache.buffers]) and same(row(prefix, 1), row(cache, 1))
    before = [tensor.copy() for tensor in cache.buffers]
    cache.reserve(20)
    assert all(tensor.shape[2] == 20 for tensor in cache.buffers)
    assert same([tensor[:, :, :6] for tensor in cache.buffers], before)
    assert not any(tensor[:, :, 6:].any() for tensor in cache.buffers)
    assert list(cache.attention_mask(2).sum(-1)) == [8, 5]  # a step appending 2 tokens to rows of 6 and 3
