"""``bucket``: length ranges per instance, the load-balance override, periodic recuts."""

from __future__ import annotations

import math

import pytest

from scheduler import registry
from scheduler.policies.bucket import BucketPolicy
from tests.unit.scheduler.policy_fakes import make_view, req, targets

NO_SPILL = dict(balance_abs_threshold_tokens=10**9)


def send(policy, view, prompt: int, now_s: float) -> int:
    return targets(policy.on_arrival(req(prompt=prompt), now_s, view))[0]


def test_initial_boundaries_cut_4096_tokens_evenly_and_the_last_is_open():
    view = make_view({}, {}, {}, dict(role="decode"))
    p = BucketPolicy(**NO_SPILL)
    got = [send(p, view, n, 0.0) for n in (0, 1364, 1365, 2729, 2730, 100_000)]
    assert got == [0, 0, 1, 1, 2, 2]
    assert p.boundaries == [(0, 1364), (1365, 2729), (2730, math.inf)]


def test_a_recut_gives_each_instance_an_equal_share_of_recent_tokens():
    view = make_view({}, {}, {})
    p = BucketPolicy(balance_abs_threshold_tokens=300)
    for i, n in enumerate((5, 10, 15, 20, 24, 26)):  # 100 tokens, all in bucket 0
        assert send(p, view, n, 1.0 + i * 0.1) == 0
    # Due at 6.0 (first choice at 1.0 + 5 s): 33 tokens per instance; 5+10+15+20
    # reaches it at 20, then 24+26 at 26.
    assert [send(p, view, n, 6.0) for n in (20, 21, 26, 27)] == [0, 1, 1, 2]
    assert p.boundaries == [(0, 20), (21, 26), (27, math.inf)]


def test_load_imbalance_overrides_the_buckets_and_shapes_the_next_cut():
    view = make_view({}, {}, {})
    p = BucketPolicy()  # gateway defaults: 32 tokens and 1.0001
    # 33 > 32 over an idle instance: imbalanced, so the 34s go to the idle ones.
    assert [send(p, view, n, 0.0) for n in (33, 34, 34)] == [0, 1, 2]
    send(p, view, 0, 5.0)  # the recut runs first: 101 // 3 = 33 per instance
    # 33 reaches 33 at 33; the next, 34, is not above the range start 34: 34 + 33.
    assert p.boundaries == [(0, 33), (34, 67), (68, math.inf)]


@pytest.mark.parametrize(
    ("each", "first_upper"),
    [
        (150, 100),  # 150 per instance is within 2x of 100: boundaries kept
        (250, 250),  # 250 is more than twice 100: recut
        (45, 45),  # 45 is less than half of 100: recut
    ],
)
def test_boundaries_are_recut_only_when_the_load_per_instance_changes_twofold(each, first_upper):
    view = make_view({}, {})
    p = BucketPolicy(**NO_SPILL)
    send(p, view, 100, 0.0)
    send(p, view, 100, 0.1)
    send(p, view, 0, 5.0)  # first cut: 200 // 2 = 100 per instance
    assert p.boundaries == [(0, 100), (101, math.inf)]
    send(p, view, each, 7.0)  # by 10.0 the window holds 0, each, each
    send(p, view, each, 7.1)
    send(p, view, 0, 10.0)
    assert p.boundaries == [(0, first_upper), (first_upper + 1, math.inf)]


def test_the_load_window_forgets_old_arrivals():
    view = make_view({}, {})
    p = BucketPolicy()
    assert send(p, view, 1000, 0.0) == 0
    assert send(p, view, 10, 0.001) == 1  # 1000 tokens on 0, none on 1: imbalanced
    assert send(p, view, 10, 20.0) == 0  # both left the window: its bucket again


def test_an_unhealthy_buckets_arrivals_go_to_the_least_loaded_healthy_instance():
    view = make_view({}, dict(healthy=False), {})
    p = BucketPolicy(**NO_SPILL)
    send(p, view, 50, 0.0)  # to 0
    assert send(p, view, 2000, 0.1) == 2  # bucket 1 is down; 2 got nothing yet
    view[0].is_healthy = view[2].is_healthy = False
    d = p.on_arrival(req(prompt=10), 0.2, view)
    assert d.dispatches == () and d.wake_at_s is not None


def test_reset_and_a_changed_pool_start_from_the_initial_boundaries():
    view = make_view({}, {})
    p = BucketPolicy(**NO_SPILL)
    send(p, view, 100, 0.0)
    send(p, view, 0, 5.0)
    assert p.boundaries == [(0, 100), (101, math.inf)]
    p.reset()
    send(p, view, 100, 6.0)
    assert p.boundaries == [(0, 2047), (2048, math.inf)]
    grown = make_view({}, {}, {}, {})
    send(p, grown, 100, 7.0)
    assert p.boundaries == [(0, 1023), (1024, 2047), (2048, 3071), (3072, math.inf)]


def test_the_defaults_are_the_gateways():
    cfg = registry.create("bucket").config
    assert (cfg.balance_abs_threshold_tokens, cfg.balance_rel_threshold) == (32, 1.0001)
    assert (cfg.adjust_interval_s, cfg.initial_max_tokens) == (5.0, 4096)
