"""Prefill/decode disaggregation: a prefill policy and a decode rule chosen independently."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler import registry
from scheduler.policies.fcfs import FcfsPolicy
from scheduler.policies.pd import PDPolicy
from scheduler.policies.round_robin import RoundRobinPolicy
from scheduler.policy import NO_DECISIONS, BatchHint, PDTarget, Policy
from sim.loop import simulate
from tests.unit.scheduler.policy_fakes import make_view, req, targets
from tests.unit.sim.fakes import AffineCost, make_limits, make_trace
from traces.errors import ConfigError

COST = AffineCost()


def pd_view():
    """Instances 0, 1 prefill; 2, 3, 4 decode."""
    return make_view(*[dict(role="prefill")] * 2, *[dict(role="decode")] * 3)


def test_arrivals_follow_the_prefill_rule_and_hand_offs_the_decode_rule():
    view = pd_view()
    p = registry.create_pd("round_robin", "round_robin")
    assert p.name == "round_robin+round_robin"
    assert [targets(p.on_arrival(req(i), 0.0, view))[0] for i in range(3)] == [0, 1, 0]
    picks = [p.select_decode_instance(req(i), 0, 1.0, view) for i in range(4)]
    assert picks == [2, 3, 4, 2]


def test_the_decode_rule_skips_unhealthy_decode_instances_and_says_none_when_all_are():
    view = pd_view()
    view[3].is_healthy = False
    view[2].running = 5
    p = PDPolicy(FcfsPolicy(), registry.create("least_load"))
    assert p.select_decode_instance(req(), 0, 0.0, view) == 4
    view[2].is_healthy = view[4].is_healthy = False
    assert p.select_decode_instance(req(), 0, 0.0, view) is None


def test_reset_resets_both_sides():
    view = pd_view()
    p = PDPolicy(RoundRobinPolicy(), RoundRobinPolicy())
    p.on_arrival(req(), 0.0, view)
    p.select_decode_instance(req(), 0, 0.0, view)
    p.reset()
    assert targets(p.on_arrival(req(), 0.0, view)) == [0]
    assert p.select_decode_instance(req(), 0, 0.0, view) == 2


def test_create_pd_passes_each_side_its_parameters_and_refuses_a_non_routing_decode(
    monkeypatch,
):
    p = registry.create_pd(
        "least_load", "power_of_two", prefill_params={"metric": "tokens"}, decode_params={"seed": 3}
    )
    assert p.prefill.config.metric == "tokens" and p.decode.config.seed == 3
    with pytest.raises(ConfigError, match="'power_of_two' takes no parameter 'metric'"):
        registry.create_pd("fcfs", "power_of_two", decode_params={"metric": "tokens"})

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @registry.register("test_holder")
    class Holder(Policy):
        def on_arrival(self, request, now_s, view):
            return NO_DECISIONS

    with pytest.raises(ConfigError, match=r"'test_holder' cannot choose decode.*round_robin"):
        registry.create_pd("fcfs", "test_holder")
    registry.create_pd("test_holder", "random")  # any policy may place prefills
    with pytest.raises(TypeError, match="must be a routing policy"):
        PDPolicy(FcfsPolicy(), Holder())  # type: ignore[arg-type]


def spaced_trace(n: int = 8):
    """Requests one second apart: each is done before the next arrives."""
    return make_trace(np.arange(n) * 1.0, [300] * n, [10] * n)


def test_in_the_simulator_the_decode_rule_picks_the_decode_instances():
    limits = make_limits()
    trace = spaced_trace()
    rr = simulate(trace, COST, registry.create_pd("fcfs", "round_robin"), limits, pd="1:2")
    assert rr.columns.decode_instance.tolist() == [1, 2] * 4
    # Without a decode rule the driver takes the least loaded: all idle, the lower id.
    plain = simulate(trace, COST, registry.create("fcfs"), limits, pd="1:2")
    assert plain.columns.decode_instance.tolist() == [1] * 8
    both = simulate(trace, COST, registry.create_pd("round_robin", "round_robin"), limits, pd="2:3")
    assert both.columns.instance.tolist() == [0, 1] * 4
    assert both.columns.decode_instance.tolist() == [2, 3, 4, 2, 3, 4, 2, 3]
    assert both.summary()["n_completed"] == 8


def test_decode_choice_at_dispatch_names_both_instances_of_every_dispatch():
    view = pd_view()
    p = PDPolicy(RoundRobinPolicy(), RoundRobinPolicy(), decode_choice="dispatch")
    got = [p.on_arrival(req(i), 0.0, view).dispatches[0][1] for i in range(4)]
    assert got == [PDTarget(0, 2), PDTarget(1, 3), PDTarget(0, 4), PDTarget(1, 2)]


def test_decode_choice_at_dispatch_keeps_a_held_prefill_policys_timer_and_pairs_its_release():
    view = make_view(dict(role="prefill", healthy=False), dict(role="decode"), dict(role="decode"))
    view[2].running = 3  # least_load must take decode instance 1
    p = PDPolicy(
        registry.create("least_load"), registry.create("least_load"), decode_choice="dispatch"
    )
    held = p.on_arrival(req(7), 0.0, view)
    assert held.dispatches == () and held.wake_at_s is not None
    view[0].is_healthy = True
    released = p.on_timer(held.wake_at_s, view)
    assert [(r.request_id, t) for r, t in released.dispatches] == [(7, PDTarget(0, 1))]


def test_decode_choice_at_dispatch_leaves_the_choice_to_hand_off_when_no_decode_is_healthy():
    view = pd_view()
    for i in (2, 3, 4):
        view[i].is_healthy = False
    p = PDPolicy(RoundRobinPolicy(), RoundRobinPolicy(), decode_choice="dispatch")
    assert targets(p.on_arrival(req(), 0.0, view)) == [0]
    view[3].is_healthy = True
    assert p.select_decode_instance(req(), 0, 1.0, view) == 3


def test_decode_choice_defaults_to_hand_off_and_refuses_unknown_values():
    view = pd_view()
    p = PDPolicy(RoundRobinPolicy(), RoundRobinPolicy())
    assert p.decode_choice == "handoff"
    assert targets(p.on_arrival(req(), 0.0, view)) == [0]
    with pytest.raises(ConfigError, match="decode_choice: expected one of handoff, dispatch"):
        PDPolicy(FcfsPolicy(), RoundRobinPolicy(), decode_choice="later")  # type: ignore[arg-type]


def test_a_pd_target_with_batch_hints_keeps_the_hints_and_the_prefill_instance():
    view = make_view(dict(role="prefill", running=1), dict(role="decode"), dict(role="decode"))
    laps = registry.create("laps", window_ms=0.0)
    p = PDPolicy(laps, RoundRobinPolicy(), decode_choice="dispatch")
    for i, n in enumerate((60, 62, 58, 64)):
        assert p.on_arrival(req(i, n), 0.0, view).dispatches == ()  # the prefill is busy
    view[0].running = 0
    d = p.on_progress(0, 0.05, view)
    assert d.batches == (BatchHint(0, 4, 64, 4),)
    assert [t for _, t in d.dispatches] == [
        PDTarget(0, 1),
        PDTarget(0, 2),
        PDTarget(0, 1),
        PDTarget(0, 2),
    ]
