"""The router-side prefix record: leading matches, bounded LRU eviction, forgetting."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.prefix import PrefixRecord, prompt_block_keys
from tests.unit.scheduler.policy_fakes import req


def test_the_match_is_the_leading_run_of_recorded_blocks_and_stops_at_the_first_miss():
    rec = PrefixRecord(10_000)
    rec.record(0, req(0, hashes=[1, 2, 3, 4]))
    assert rec.cached_blocks(0, req(1, hashes=[1, 2, 3, 4, 5])) == 4
    assert rec.cached_blocks(0, req(2, hashes=[1, 2, 9, 4])) == 2  # 4 is recorded, but after a miss
    assert rec.cached_blocks(0, req(3, hashes=[9, 2, 3])) == 0
    assert rec.cached_blocks(1, req(4, hashes=[1, 2])) == 0  # another instance: nothing sent there


def test_the_record_holds_the_instances_capacity_and_evicts_the_least_recently_sent_tail_first():
    rec = PrefixRecord()
    rec.set_capacity(0, 64)  # four 16-token blocks
    rec.record(0, req(0, hashes=[1, 2, 3, 4]))
    rec.record(0, req(1, hashes=[1, 2, 7]))  # refreshes 1, 2; 7 needs room: 4 (the tail) goes
    assert rec.size_tokens(0) == 64
    assert rec.cached_blocks(0, req(2, hashes=[1, 2, 3, 4])) == 3
    assert rec.cached_blocks(0, req(3, hashes=[1, 2, 7])) == 3
    rec.record(0, req(4, hashes=[8, 9]))  # 3 and 7 are the oldest now
    assert rec.cached_blocks(0, req(5, hashes=[1, 2, 3])) == 2
    assert rec.cached_blocks(0, req(6, hashes=[8, 9])) == 2


def test_one_prompt_longer_than_the_capacity_keeps_its_head():
    rec = PrefixRecord(48)
    rec.record(0, req(0, hashes=list(range(10))))
    assert rec.cached_blocks(0, req(1, hashes=list(range(10)))) == 3


def test_a_partial_last_block_is_not_the_full_block_of_the_same_hash():
    rec = PrefixRecord(10_000)
    rec.record(0, req(0, prompt=40, hashes=[1, 2, 3]))  # 16 + 16 + 8 tokens
    assert rec.cached_blocks(0, req(1, prompt=48, hashes=[1, 2, 3])) == 2
    assert rec.cached_blocks(0, req(2, prompt=40, hashes=[1, 2, 3])) == 3
    assert rec.size_tokens(0) == 40


def test_keys_take_numpy_hashes_and_ignore_hashes_past_the_prompt():
    np_req = req(0, prompt=20, hashes=np.array([5, 6, 7], dtype=np.int64))
    assert prompt_block_keys(np_req) == prompt_block_keys(req(1, prompt=20, hashes=[5, 6]))
    assert len(prompt_block_keys(np_req)) == 2
    assert prompt_block_keys(req(2)) == ()


def test_prompts_without_hashes_take_room_only_when_asked():
    plain = PrefixRecord(64)
    plain.record(0, req(0, hashes=[1, 2]))
    plain.record(0, req(1, prompt=500))
    assert plain.size_tokens(0) == 32
    assert plain.cached_blocks(0, req(2, hashes=[1, 2])) == 2
    counting = PrefixRecord(64, count_unhashed=True)
    counting.record(0, req(0, hashes=[1, 2]))
    counting.record(0, req(1, prompt=40))  # 72 tokens: the oldest block, 2, goes
    assert counting.size_tokens(0) == 56
    assert counting.cached_blocks(0, req(2, hashes=[1, 2])) == 1


def test_forget_drops_one_instance_reset_drops_all_and_capacities_stay():
    rec = PrefixRecord(10_000)
    for i in (0, 1):
        rec.record(i, req(i, hashes=[1, 2]))
    rec.forget(0)
    assert (rec.cached_blocks(0, req(5, hashes=[1])), rec.cached_blocks(1, req(6, hashes=[1]))) == (
        0,
        1,
    )
    rec.reset()
    assert rec.cached_blocks(1, req(7, hashes=[1])) == 0
    rec.record(1, req(8, hashes=[3]))
    assert rec.cached_blocks(1, req(9, hashes=[3])) == 1


def test_shrinking_a_capacity_evicts_at_once_and_an_unsized_instance_is_an_error():
    rec = PrefixRecord()
    rec.set_capacity(0, 1_000)
    rec.record(0, req(0, hashes=[1, 2, 3, 4]))
    rec.set_capacity(0, 32)
    assert rec.cached_blocks(0, req(1, hashes=[1, 2, 3, 4])) == 2
    with pytest.raises(KeyError, match="no capacity set for instance 3"):
        rec.record(3, req(2, hashes=[1]))
    with pytest.raises(ValueError, match="capacity_tokens must be >= 1; got 0"):
        rec.set_capacity(0, 0)


@settings(max_examples=200, deadline=None)
@given(
    capacity_blocks=st.integers(1, 12),
    prompts=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 10)), min_size=1, max_size=30),
)
def test_the_record_stays_in_its_capacity_and_keeps_the_latest_prompts_head(
    capacity_blocks, prompts
):
    # Each prompt is the first n blocks of one of four chains: chained hashes, as traces have.
    rec = PrefixRecord(capacity_blocks * 16)
    for i, (chain, n) in enumerate(prompts):
        request = req(i, hashes=[chain * 100 + k for k in range(n)])
        rec.record(0, request)
        assert rec.size_tokens(0) <= capacity_blocks * 16
        assert rec.cached_blocks(0, request) == min(n, capacity_blocks)


class _EagerLru:
    """The record's meaning, applied send by send: the reference the lazy record must equal."""

    def __init__(self, capacity_tokens: int) -> None:
        from collections import OrderedDict

        self.keys: OrderedDict[int, int] = OrderedDict()
        self.size = 0
        self.capacity = capacity_tokens

    def record(self, request) -> None:
        for key in reversed(prompt_block_keys(request)):
            if key in self.keys:
                self.keys.move_to_end(key)
            else:
                self.keys[key] = key & 0xFFFFFFFF
                self.size += key & 0xFFFFFFFF
        while self.size > self.capacity and self.keys:
            self.size -= self.keys.popitem(last=False)[1]

    def cached_blocks(self, request) -> int:
        n = 0
        for key in prompt_block_keys(request):
            if key not in self.keys:
                break
            n += 1
        return n


@settings(max_examples=150, deadline=None)
@given(
    capacity_blocks=st.integers(1, 40),
    sends=st.lists(
        st.tuples(st.integers(0, 5), st.integers(1, 12), st.integers(1, 16), st.booleans()),
        min_size=1,
        max_size=120,
    ),
)
def test_a_record_read_late_answers_as_if_every_send_had_been_applied_at_once(
    capacity_blocks, sends
):
    """Backlogs short and long (replayed or rebuilt) give the eager LRU's answers and size."""
    rec, ref = PrefixRecord(capacity_blocks * 16), _EagerLru(capacity_blocks * 16)
    for i, (chain, n, last_block, read) in enumerate(sends):
        hashes = [chain * 1000 + k for k in range(n)]
        # A partial last block now and then: keys carry their sizes.
        request = req(i, (n - 1) * 16 + last_block, hashes=hashes)
        rec.record(0, request)
        ref.record(request)
        if read:
            probe = req(10_000 + i, hashes=[(chain + i) % 6 * 1000 + k for k in range(12)])
            assert rec.cached_blocks(0, probe) == ref.cached_blocks(probe)
    assert rec.size_tokens(0) == ref.size
    for chain in range(6):
        probe = req(-1 - chain, hashes=[chain * 1000 + k for k in range(12)])
        assert rec.cached_blocks(0, probe) == ref.cached_blocks(probe)


def test_a_long_backlog_nobody_reads_is_bounded_and_still_exact():
    rec, ref = PrefixRecord(64 * 16), _EagerLru(64 * 16)
    for i in range(40_000):
        request = req(i, hashes=[i % 997 * 100 + k for k in range(i % 9 + 1)])
        rec.record(0, request)
        ref.record(request)
    assert len(rec._records[0]._pending) < 16384
    assert rec.size_tokens(0) == ref.size
    assert list(rec._records[0].keys) == list(ref.keys)
