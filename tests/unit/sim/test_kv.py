"""KV pool: allocation, the radix prefix cache, LRU eviction, pinning, dedupe."""

from __future__ import annotations

import pytest

from sim.kv import KvPool, block_keys, block_sizes


def keys(*hashes: int, size: int = 50) -> list[int]:
    return block_keys(hashes, size * len(hashes), size)


def cache(kv: KvPool, blocks: list[int]) -> None:
    """What one request does: compute all blocks, cache them, finish."""
    n, _, _ = kv.match(blocks)
    node = kv.acquire(blocks, n) if n else None
    tokens = sum(k & 0xFFFFFFFF for k in blocks[n:])
    assert kv.allocate(tokens)
    node, _ = kv.insert(node, blocks[n:])
    kv.release_path(node)


def test_block_sizes_cover_the_prompt_and_ignore_extra_hashes():
    assert block_sizes(130, 64, 3) == [64, 64, 2]
    assert block_sizes(128, 64, 5) == [64, 64]
    assert block_sizes(10, 64, 0) == []


def test_a_block_held_with_another_size_is_a_different_block():
    short = block_keys([1, 2, 3], 130, 64)  # ends two tokens into block 3
    long = block_keys([1, 2, 3], 192, 64)
    assert short[:2] == long[:2] and short[2] != long[2]
    kv = KvPool(500)
    cache(kv, short)
    assert kv.match(long)[:2] == (2, 128)
    assert kv.match(short) == (3, 130, 130)
    kv.check()


def test_allocation_fails_without_changing_anything_when_even_eviction_is_short():
    kv = KvPool(100)
    assert kv.allocate(60)
    assert not kv.allocate(41)
    assert (kv.private_tokens, kv.free_tokens) == (60, 40)
    kv.release(60)
    assert kv.free_tokens == 100
    with pytest.raises(ValueError, match="max_total_tokens"):
        KvPool(0)


def test_shared_prefixes_are_stored_once_and_matched_partially():
    kv = KvPool(1000)
    cache(kv, keys(1, 2, 3))
    cache(kv, keys(1, 2, 4, 5))
    assert kv.cache_tokens == 250  # blocks 1, 2 shared
    assert kv.match(keys(1, 2, 4, 9)) == (3, 150, 150)
    assert kv.match(keys(1, 7)) == (1, 50, 50)
    assert kv.n_blocks == 5
    kv.check()


def test_least_recently_released_leaves_are_evicted_whole_and_shared_prefixes_last():
    kv = KvPool(400)
    a, b = keys(1, 2), keys(3, 4)
    cache(kv, a)
    cache(kv, b)
    assert kv.allocate(250)  # 200 free: the oldest leaf (all of a) goes
    assert kv.match(a)[:2] == (0, 0)
    assert kv.match(b)[:2] == (2, 100)
    assert kv.evicted_tokens == 100
    kv.release(250)
    x, y = keys(5, 6, 7), keys(5, 6, 8)
    cache(kv, x)
    cache(kv, y)  # blocks 5, 6 shared: b, then leaves 7 and 8, then 5-6
    assert kv.free_tokens == 400 - 100 - 200
    assert kv.allocate(101)  # evicts b (99 free after)
    assert kv.allocate(100)  # evicts leaf 7 (49 free after)
    assert kv.match(x)[:2] == (2, 100) and kv.match(y)[:2] == (3, 150)
    assert kv.allocate(50)  # evicts leaf 8
    assert kv.match(y)[:2] == (2, 100)
    assert kv.allocate(50)  # and only then the shared prefix
    assert kv.match(y)[:2] == (0, 0)
    kv.check()


def test_a_hit_refreshes_a_prefix_and_pinned_blocks_are_not_evicted():
    kv = KvPool(300)
    a, b = keys(1, 2), keys(3, 4)
    cache(kv, a)
    cache(kv, b)
    node = kv.acquire(a, 2)  # a request uses prefix a
    assert kv.evictable_tokens == 100
    assert not kv.allocate(201)
    assert kv.allocate(200)  # only b can go
    assert kv.match(b)[:2] == (0, 0)
    kv.release_path(node)  # a is now the most recently used
    assert kv.match(a) == (2, 100, 100)
    kv.check()


def test_insert_of_blocks_cached_meanwhile_frees_the_duplicate():
    kv = KvPool(300)
    blocks = keys(1, 2)
    kv.allocate(100)
    kv.allocate(100)
    first, moved = kv.insert(None, blocks)
    assert moved == 100
    second, moved = kv.insert(None, blocks)  # the second copy is freed
    assert moved == 100 and second is first
    assert (kv.private_tokens, kv.cache_tokens) == (0, 100)
    kv.release_path(first)
    assert kv.evictable_tokens == 0  # still pinned once
    kv.release_path(second)
    assert kv.evictable_tokens == 100
    kv.check()


def test_a_partial_hit_splits_a_node_and_pins_only_the_hit():
    kv = KvPool(1000)
    cache(kv, keys(1, 2, 3, 4))
    node = kv.acquire(keys(1, 2, 9), 2)
    assert kv.evictable_tokens == 100  # blocks 3 and 4
    assert kv.allocate(850)  # evicts them, keeps the pinned head
    assert kv.match(keys(1, 2, 3, 4))[:2] == (2, 100)
    kv.release_path(node)
    kv.check()
