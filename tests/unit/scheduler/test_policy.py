"""The policy hook: Decisions, default hooks, views and least_loaded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import FrozenInstanceError

import pytest

from scheduler.policy import (
    NO_DECISIONS,
    ClusterView,
    Decisions,
    InstanceView,
    Policy,
    least_loaded,
)
from traces.request import Request


class FakeInstance(InstanceView):
    def __init__(self, instance_id, *, role="mixed", healthy=True, waiting=0, running=0, tokens=0):
        self._id, self._role, self._healthy = instance_id, role, healthy
        self._waiting, self._running, self._tokens = waiting, running, tokens

    instance_id = property(lambda self: self._id)
    role = property(lambda self: self._role)
    healthy = property(lambda self: self._healthy)
    n_waiting = property(lambda self: self._waiting)
    waiting_tokens = property(lambda self: 0)
    n_running = property(lambda self: self._running)
    inflight_tokens = property(lambda self: self._tokens)
    kv_used_tokens = property(lambda self: 0)
    kv_capacity_tokens = property(lambda self: 1000)

    def cached_prefix_blocks(self, request):
        return 0


class FakeCluster(ClusterView):
    def __init__(self, instances: Sequence[FakeInstance]):
        self._instances = list(instances)

    instances = property(lambda self: self._instances)
    pool_names = property(lambda self: ("entry",))

    def pool(self, name):
        if name != "entry":
            raise ValueError(f"unknown pool {name!r}")
        return [i for i in self._instances if i.role != "decode"]


def make_view(*specs: dict) -> FakeCluster:
    return FakeCluster([FakeInstance(i, **spec) for i, spec in enumerate(specs)])


def req(i: int = 0) -> Request:
    return Request(request_id=i, arrival_s=0.0, prompt_tokens=10, output_tokens=5)


def test_decisions_are_immutable_and_the_empty_one_is_shared():
    d = Decisions.dispatch(req(), 2, wake_at_s=1.5)
    assert d.dispatches[0][1] == 2 and d.wake_at_s == 1.5
    with pytest.raises(FrozenInstanceError):
        d.wake_at_s = 2.0  # type: ignore[misc]
    assert Decisions() == NO_DECISIONS and not NO_DECISIONS.dispatches


def test_hooks_default_to_no_decisions():
    class OnlyArrival(Policy):
        def on_arrival(self, request, now_s, view):
            return NO_DECISIONS

    p = OnlyArrival()
    view = make_view({})
    assert p.on_progress(0, 1.0, view) is NO_DECISIONS
    assert p.on_timer(1.0, view) is NO_DECISIONS
    assert p.select_decode_instance(req(), 0, 1.0, view) is None
    with pytest.raises(TypeError):
        Policy()  # type: ignore[abstract]


def test_least_loaded_orders_by_outstanding_then_tokens_then_id_and_skips_unhealthy():
    view = make_view(
        dict(waiting=1, running=3, tokens=10),
        dict(waiting=0, running=4, tokens=5),
        dict(waiting=0, running=2, healthy=False),
        dict(waiting=2, running=2, tokens=5),
    )
    assert least_loaded(view.instances).instance_id == 1
    assert least_loaded(view.instances[:1] + view.instances[3:]).instance_id == 3
    assert least_loaded([view.instances[2]]) is None
    tie = make_view(dict(running=1), dict(running=1))
    assert least_loaded(tie.instances).instance_id == 0
