"""Routing base (dispatch at once, hold while nothing is healthy), fcfs and round_robin."""

from __future__ import annotations

import pytest

from scheduler.policies.fcfs import FcfsPolicy
from scheduler.policies.round_robin import RoundRobinPolicy
from scheduler.policy import NO_DECISIONS
from scheduler.routing import HOLD_RETRY_S
from tests.unit.scheduler.policy_fakes import make_view, req, targets
from traces.errors import ConfigError


def test_fcfs_sends_each_arrival_at_once_to_the_least_loaded_entry_instance():
    view = make_view(
        dict(running=5),
        dict(running=1, tokens=100),
        dict(waiting=1, tokens=50),
        dict(role="decode"),
    )
    d = FcfsPolicy().on_arrival(req(7), 2.0, view)
    # 1 and 2 both have one outstanding request; 2 has fewer tokens in flight.
    assert d.dispatches == ((req(7), 2),) and d.wake_at_s is None
    view[2].waiting = 3
    assert targets(FcfsPolicy().on_arrival(req(), 2.0, view)) == [1]


def test_fcfs_on_one_instance_sends_everything_there_however_loaded():
    view = make_view(dict(waiting=50, running=64))
    p = FcfsPolicy()
    assert [targets(p.on_arrival(req(i), 0.0, view)) for i in range(3)] == [[0], [0], [0]]


def test_fcfs_skips_unhealthy_instances_even_the_least_loaded():
    view = make_view(dict(healthy=False), dict(running=9))
    assert targets(FcfsPolicy().on_arrival(req(), 0.0, view)) == [1]


def test_with_no_healthy_instance_arrivals_are_held_and_released_in_order_on_the_timer():
    view = make_view(dict(healthy=False), dict(healthy=False))
    p = FcfsPolicy()
    first = p.on_arrival(req(1), 10.0, view)
    assert first.dispatches == () and first.wake_at_s == pytest.approx(10.0 + HOLD_RETRY_S)
    second = p.on_arrival(req(2), 10.01, view)
    assert second.dispatches == () and second.wake_at_s is None  # a retry is already due
    assert p.n_held == 2
    view[1].is_healthy = True
    assert p.on_progress(0, 10.02, view) is NO_DECISIONS  # progress does not release
    released = p.on_timer(first.wake_at_s, view)
    assert [(r.request_id, t) for r, t in released.dispatches] == [(1, 1), (2, 1)]
    assert released.wake_at_s is None and p.n_held == 0
    assert p.on_timer(10.1, view) is NO_DECISIONS


def test_a_reported_recovery_releases_held_requests_at_once_and_a_failure_changes_nothing():
    view = make_view(dict(healthy=False), dict(healthy=False))
    p = FcfsPolicy()
    p.on_arrival(req(1), 0.0, view)
    p.on_arrival(req(2), 0.001, view)
    assert p.on_health(0, False, 0.002, view) is NO_DECISIONS
    view[1].is_healthy = True
    d = p.on_health(1, True, 0.003, view)  # before the retry timer at 0.05
    assert [(r.request_id, t) for r, t in d.dispatches] == [(1, 1), (2, 1)]
    assert p.n_held == 0


def test_held_requests_are_retried_on_the_timer_and_new_arrivals_queue_behind_them():
    view = make_view(dict(healthy=False))
    p = RoundRobinPolicy()
    wake = p.on_arrival(req(1), 0.0, view).wake_at_s
    again = p.on_timer(wake, view)  # still down: ask again
    assert again.dispatches == () and again.wake_at_s == pytest.approx(wake + HOLD_RETRY_S)
    view[0].is_healthy = True
    d = p.on_arrival(req(2), 0.07, view)  # the new one goes after the held one
    assert [(r.request_id, t) for r, t in d.dispatches] == [(1, 0), (2, 0)]


def test_reset_forgets_held_requests():
    view = make_view(dict(healthy=False))
    p = FcfsPolicy()
    p.on_arrival(req(1), 0.0, view)
    p.reset()
    view[0].is_healthy = True
    assert p.n_held == 0 and p.on_timer(1.0, view) is NO_DECISIONS
    assert p.on_arrival(req(2), 1.0, view).wake_at_s is None


def test_round_robin_takes_entry_instances_in_id_order_cyclically():
    view = make_view({}, {}, dict(role="decode"), {})
    p = RoundRobinPolicy()
    assert [targets(p.on_arrival(req(i), 0.0, view))[0] for i in range(5)] == [0, 1, 3, 0, 1]


def test_round_robin_skips_unhealthy_instances_and_keeps_the_others_turns():
    view = make_view({}, dict(healthy=False), {})
    p = RoundRobinPolicy()
    order = [targets(p.on_arrival(req(i), 0.0, view))[0] for i in range(3)]
    assert order == [0, 2, 0]
    view[1].is_healthy = True  # back: its turn comes after 0's
    assert [targets(p.on_arrival(req(i), 0.0, view))[0] for i in range(3)] == [1, 2, 0]


def test_round_robin_reset_starts_over():
    view = make_view({}, {}, {})
    p = RoundRobinPolicy()
    p.on_arrival(req(), 0.0, view)
    p.on_arrival(req(), 0.0, view)
    p.reset()
    assert targets(p.on_arrival(req(), 0.0, view)) == [0]


def test_policies_without_parameters_refuse_them_by_name():
    with pytest.raises(ConfigError, match="'fcfs' takes no parameters; got 'window_ms'"):
        FcfsPolicy(window_ms=5)  # type: ignore[call-arg]
