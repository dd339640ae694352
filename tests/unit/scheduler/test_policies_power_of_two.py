"""``power_of_two``: two distinct draws, the less loaded wins; documented fallbacks."""

from __future__ import annotations

import random
from collections import Counter

from scheduler.policies.power_of_two import PowerOfTwoPolicy
from tests.unit.scheduler.policy_fakes import make_view, req, targets


def picks(policy, view, n: int) -> list[int]:
    return [targets(policy.on_arrival(req(i), 0.0, view))[0] for i in range(n)]


def test_of_two_instances_the_one_with_fewer_tokens_always_wins():
    view = make_view(dict(running=1, tokens=900), dict(running=8, tokens=100))
    assert set(picks(PowerOfTwoPolicy(seed=4), view, 30)) == {1}


def test_a_token_tie_falls_back_to_request_counts():
    view = make_view(dict(running=5, tokens=300), dict(running=2, tokens=300))
    assert set(picks(PowerOfTwoPolicy(), view, 30)) == {1}


def test_a_full_tie_goes_to_the_first_instance_drawn():
    view = make_view({}, {}, {})
    got = picks(PowerOfTwoPolicy(seed=11), view, 50)
    rng = random.Random(11)
    expected = []
    for _ in range(50):
        first = rng.randrange(3)
        rng.randrange(2)  # the second draw
        expected.append(first)
    assert got == expected and set(got) == {0, 1, 2}


def test_the_busiest_instance_never_wins_and_the_idlest_wins_most():
    view = make_view(dict(tokens=0), dict(tokens=500), dict(tokens=9000))
    counts = Counter(picks(PowerOfTwoPolicy(seed=2), view, 600))
    assert counts[2] == 0 and counts[0] > counts[1] > 0


def test_one_healthy_instance_is_chosen_without_a_draw():
    view = make_view(dict(healthy=False), dict(tokens=10**6), dict(healthy=False))
    p = PowerOfTwoPolicy(seed=5)
    assert picks(p, view, 5) == [1] * 5
    both = make_view({}, {})
    # No draw was spent: the sequence on two instances is that of a fresh policy.
    assert picks(p, both, 20) == picks(PowerOfTwoPolicy(seed=5), both, 20)


def test_unhealthy_instances_are_never_drawn_and_none_healthy_holds():
    view = make_view({}, dict(healthy=False), {}, dict(role="decode"))
    assert set(picks(PowerOfTwoPolicy(seed=9), view, 100)) == {0, 2}
    d = PowerOfTwoPolicy().on_arrival(req(), 0.0, make_view(dict(healthy=False)))
    assert d.dispatches == () and d.wake_at_s is not None


def test_seed_determinism_and_reset():
    view = make_view({}, {}, {}, {})
    p = PowerOfTwoPolicy(seed=6)
    first = picks(p, view, 40)
    assert first == picks(PowerOfTwoPolicy(seed=6), view, 40)
    p.reset()
    assert picks(p, view, 40) == first
