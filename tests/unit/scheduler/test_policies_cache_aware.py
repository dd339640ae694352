"""``cache_aware``: the SGLang router's three branches, at their thresholds' edges."""

from __future__ import annotations

import pytest

from scheduler import registry
from scheduler.policies.cache_aware import CacheAwarePolicy
from tests.unit.scheduler.policy_fakes import make_view, req, targets
from traces.errors import ConfigError


def send(policy, view, request, now_s: float = 0.0) -> int:
    return targets(policy.on_arrival(request, now_s, view))[0]


def warmed(view, **params) -> CacheAwarePolicy:
    """A policy whose record of instance 0 holds blocks 1..4 (64 tokens)."""
    p = CacheAwarePolicy(**params)
    assert send(p, view, req(0, hashes=[1, 2, 3, 4])) == 0  # empty records: the lower id
    return p


@pytest.mark.parametrize(
    ("loads", "expected"),
    [
        ((65, 0), 1),  # 65 > 64 and 65 > 1.5 * 0: imbalanced, least loaded
        ((64, 0), 0),  # difference not above 64: balanced, prefix affinity
        ((200, 130), 1),  # 70 > 64 and 200 > 195
        ((195, 130), 0),  # 65 > 64 but 195 is not above 1.5 * 130
    ],
)
def test_imbalance_needs_both_the_absolute_and_the_relative_threshold(loads, expected):
    view = make_view({}, {})
    p = warmed(view)
    view[0].waiting, view[1].running = loads
    assert send(p, view, req(1, hashes=[1, 2, 3, 4])) == expected


@pytest.mark.parametrize(("shared_blocks", "expected"), [(3, 1), (4, 0)])
def test_prefix_affinity_needs_a_match_rate_above_the_cache_threshold(shared_blocks, expected):
    view = make_view({}, {})
    p = warmed(view)
    # 10 blocks of 16 tokens: 3 matched is 48/160 = 0.3 (not above), 4 is 0.4.
    hashes = [1, 2, 3, 4][:shared_blocks] + list(range(100, 110 - shared_blocks))
    assert send(p, view, req(1, hashes=hashes)) == expected


def test_below_the_threshold_the_smallest_record_wins():
    view = make_view({}, {})
    p = CacheAwarePolicy()
    sizes = [100, 50, 10, 30, 100]  # prompts without hashes: they count, never match
    got = [send(p, view, req(i, prompt=n)) for i, n in enumerate(sizes)]
    # records after each: (100, 0) (100, 50) (100, 60) (100, 90) (100, 190)
    assert got == [0, 1, 1, 1, 1]
    assert (p.tree_tokens(0), p.tree_tokens(1)) == (100, 190)
    assert send(p, view, req(9, prompt=5)) == 0


def test_the_longest_match_wins_and_a_tie_goes_to_the_less_loaded():
    view = make_view({}, {}, {})
    p = CacheAwarePolicy(cache_threshold=0.0)
    assert send(p, view, req(0, hashes=[1, 2])) == 0
    assert send(p, view, req(1, hashes=[7])) == 1
    assert send(p, view, req(2, hashes=[7, 8])) == 1  # match 1 of 2 blocks
    assert send(p, view, req(3, hashes=[1, 2, 3, 4])) == 0
    view[0].running = 3
    assert send(p, view, req(4, hashes=[7, 8, 9])) == 1  # longest: 1 holds [7, 8]

    # The same prefix placed everywhere (imbalance spreads it), then a match tie.
    tie = make_view({}, {}, {})
    p2 = CacheAwarePolicy(cache_threshold=0.0)
    placed = [send(p2, tie, req(0, hashes=[5, 6]))]
    tie[0].waiting = 100
    placed.append(send(p2, tie, req(1, hashes=[5, 6])))
    tie[1].waiting = 100
    placed.append(send(p2, tie, req(2, hashes=[5, 6])))
    assert placed == [0, 1, 2]
    tie[0].waiting, tie[1].waiting, tie[2].waiting = 4, 2, 2
    assert send(p2, tie, req(5, hashes=[5, 6, 7])) == 1  # fewer outstanding, then lower id


def test_every_placement_is_recorded_even_an_imbalanced_one():
    view = make_view(dict(waiting=100), {})
    p = CacheAwarePolicy()
    assert send(p, view, req(0, hashes=[1, 2, 3])) == 1  # imbalanced
    view[0].waiting = 0
    view[1].running = 5
    assert send(p, view, req(1, hashes=[1, 2, 3, 4])) == 1  # balanced: 1 holds 3 of 4 blocks


def test_unhealthy_instances_are_skipped_and_left_out_of_the_balance():
    view = make_view({}, {}, dict(healthy=False, waiting=1000))
    p = warmed(view)
    assert send(p, view, req(1, hashes=[1, 2, 3, 4])) == 0  # the idle sick one is no min_load
    view[0].is_healthy = False
    assert send(p, view, req(2, hashes=[1, 2, 3, 4])) == 1


def test_the_record_is_bounded_and_evicts_a_prompts_tail_before_its_head():
    view = make_view({}, {})
    small = warmed(view, max_tree_tokens=64)
    assert send(small, view, req(1, prompt=16)) == 1  # no hashes: smallest record
    # Blocks 1, 2 matched (2 of 4: 0.5), 30 and 31 added: 3 and 4, the oldest tail, go.
    assert send(small, view, req(2, hashes=[1, 2, 30, 31])) == 0
    assert small.tree_tokens(0) == 64
    probe = req(3, hashes=[1, 2, 3, 4, 40, 41, 42, 43])  # 128 tokens
    assert send(small, view, probe) == 1  # 32 matched: 0.25, smallest record
    assert send(small, view, req(4, hashes=[1, 2, 60])) == 0  # the head stayed: 32 / 48
    big = warmed(view)
    send(big, view, req(1, prompt=16))
    send(big, view, req(2, hashes=[1, 2, 30, 31]))
    assert send(big, view, probe) == 0  # unbounded: 64 matched, 0.5


def test_reset_forgets_the_records():
    view = make_view({}, {})
    p = warmed(view)
    send(p, view, req(1, prompt=500))
    p.reset()
    assert p.tree_tokens(0) == p.tree_tokens(1) == 0
    assert send(p, view, req(2, hashes=[9])) == 0


def test_defaults_are_the_sglang_routers_and_bounds_are_checked():
    cfg = registry.create("cache_aware").config
    assert (cfg.balance_abs_threshold, cfg.balance_rel_threshold, cfg.cache_threshold) == (
        64,
        1.5,
        0.3,
    )
    with pytest.raises(ConfigError, match=r"cache_threshold: expected a number <= 1.0; got 1.5"):
        registry.create("cache_aware", cache_threshold=1.5)
    with pytest.raises(ConfigError, match="max_tree_tokens: expected a number > 0"):
        CacheAwarePolicy(max_tree_tokens=0)
