"""Chained block hashes: shared prefixes share hashes, and the values never change."""

from __future__ import annotations

import pytest

from traces.hashing import block_hashes


def test_values_are_fixed_across_runs_and_machines() -> None:
    # A router and an emulator in different processes must agree: pinned values.
    assert block_hashes(list(range(20)), 16) == [5753832455673805477, 6716215964750999644]


def test_one_hash_per_block_and_a_partial_last_block() -> None:
    assert len(block_hashes(list(range(32)), 16)) == 2
    assert len(block_hashes(list(range(33)), 16)) == 3
    assert block_hashes([], 16) == []


def test_shared_prefix_shares_exactly_its_full_blocks() -> None:
    a = list(range(100))
    b = a[:40] + [7] * 60  # same first 40 tokens: 2 full blocks of 16 in common
    ha, hb = block_hashes(a, 16), block_hashes(b, 16)
    assert ha[:2] == hb[:2]
    assert all(x != y for x, y in zip(ha[2:], hb[2:], strict=True))


def test_chained_a_block_depends_on_what_came_before() -> None:
    # Same second block of tokens after a different first block: different hash.
    x = [1] * 16 + [2] * 16
    y = [3] * 16 + [2] * 16
    assert block_hashes(x, 16)[1] != block_hashes(y, 16)[1]


def test_hashes_fit_int64_and_are_non_negative() -> None:
    hs = block_hashes(list(range(5000)), 16)
    assert all(0 <= h < 2**63 for h in hs)


@pytest.mark.parametrize(
    ("ids", "block"), [([1, 2], 0), ([-1, 2], 16), ([2**64], 16)], ids=["block0", "neg", "big"]
)
def test_bad_input_is_a_value_error(ids: list[int], block: int) -> None:
    with pytest.raises(ValueError):
        block_hashes(ids, block)
