"""``random``: uniform over healthy instances, reproducible for a seed."""

from __future__ import annotations

from collections import Counter

import pytest

from scheduler import registry
from scheduler.policies.random_choice import RandomPolicy
from tests.unit.scheduler.policy_fakes import make_view, req, targets
from traces.errors import ConfigError


def picks(policy, view, n: int) -> list[int]:
    return [targets(policy.on_arrival(req(i), 0.0, view))[0] for i in range(n)]


def test_the_same_seed_gives_the_same_choices_and_another_seed_others():
    view = make_view({}, {}, {}, {})
    a = picks(RandomPolicy(seed=7), view, 40)
    assert a == picks(registry.create("random", seed=7), view, 40)
    assert a != picks(RandomPolicy(seed=8), view, 40)


def test_reset_replays_the_sequence():
    view = make_view({}, {}, {})
    p = RandomPolicy(seed=3)
    first = picks(p, view, 20)
    p.reset()
    assert picks(p, view, 20) == first


def test_draws_are_spread_evenly_over_healthy_instances_only():
    view = make_view({}, dict(healthy=False), {}, {}, dict(role="decode"))
    counts = Counter(picks(RandomPolicy(seed=1), view, 3000))
    assert set(counts) == {0, 2, 3}
    assert all(900 <= c <= 1100 for c in counts.values()), counts


def test_nothing_healthy_holds_the_arrival():
    d = RandomPolicy().on_arrival(req(), 0.0, make_view(dict(healthy=False)))
    assert d.dispatches == () and d.wake_at_s is not None


def test_a_non_integer_seed_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"policy 'random': seed: expected int; got 1.5"):
        registry.create("random", seed=1.5)
