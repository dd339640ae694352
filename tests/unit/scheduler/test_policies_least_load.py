"""``least_load``: fewest in-flight requests or tokens, ties to the lower id."""

from __future__ import annotations

import pytest

from scheduler import registry
from scheduler.policies.least_load import LeastLoadPolicy
from tests.unit.scheduler.policy_fakes import make_view, req, targets
from traces.errors import ConfigError


def pick(policy, view) -> int:
    return targets(policy.on_arrival(req(), 0.0, view))[0]


def test_requests_metric_counts_waiting_plus_running_and_breaks_ties_by_id():
    view = make_view(
        dict(waiting=2, running=2, tokens=10),
        dict(waiting=0, running=3, tokens=9000),
        dict(waiting=1, running=2, tokens=50),
        dict(role="decode"),
    )
    # 1 and 2 both have 3 outstanding; the tie goes to the lower id, not to fewer tokens.
    assert pick(LeastLoadPolicy(), view) == 1


def test_tokens_metric_counts_in_flight_tokens_whatever_the_request_count():
    view = make_view(dict(running=10, tokens=400), dict(running=1, tokens=5000), dict(tokens=400))
    p = registry.create("least_load", metric="tokens")
    assert pick(p, view) == 0
    view[0].tokens = 401
    assert pick(p, view) == 2


def test_the_choice_follows_the_load_as_it_changes():
    view = make_view({}, {})
    p = LeastLoadPolicy()
    seen = []
    for _ in range(4):
        target = pick(p, view)
        view[target].waiting += 1
        seen.append(target)
    assert seen == [0, 1, 0, 1]


def test_unhealthy_instances_are_skipped_however_idle():
    view = make_view(dict(healthy=False), dict(running=30), dict(running=20, healthy=False))
    assert pick(LeastLoadPolicy(metric="tokens"), view) == 1


def test_an_unknown_metric_is_refused_naming_the_field_and_the_choices():
    with pytest.raises(ConfigError, match=r"metric: expected 'requests' \| 'tokens'; got 'bytes'"):
        LeastLoadPolicy(metric="bytes")
