"""The router's policy driver (scheduler/router/live.py): what the policy sees, and when it is woken."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from scheduler import registry
from scheduler.policy import NO_DECISIONS, Decisions, PDTarget, Policy
from scheduler.router.gauges import Gauges
from scheduler.router.live import ABANDONED, DISPATCHED, DONE, LiveCluster, RouterRequest


class FakeLoop:
    """The loop surface LiveCluster uses: a settable clock and timers fired by hand."""

    def __init__(self) -> None:
        self.t = 100.0
        self.timers: list[tuple[float, Callable[..., None], tuple[Any, ...]]] = []
        self._real = asyncio.new_event_loop()

    def time(self) -> float:
        return self.t

    def call_at(self, when: float, cb: Callable[..., None], *args: Any) -> Any:
        self.timers.append((when, cb, args))
        return _Handle()

    def create_future(self) -> asyncio.Future:
        return self._real.create_future()

    def fire(self, early_by: float = 0.0) -> None:
        """Fire every pending timer, the clock set to its time less ``early_by``."""
        pending, self.timers = self.timers, []
        for when, cb, args in sorted(pending, key=lambda x: x[0]):
            self.t = when - early_by
            cb(*args)


class _Handle:
    def cancel(self) -> None:
        pass


def cluster(
    policy: Policy, n: int = 2, roles: tuple[str, ...] | None = None
) -> tuple[LiveCluster, FakeLoop]:
    loop = FakeLoop()
    c = LiveCluster(policy, loop)  # type: ignore[arg-type]
    for role in roles or ("mixed",) * n:
        i = c.add_instance(role, 100_000)
        c.set_healthy(i, True)
    return c, loop


def request(
    c: LiveCluster, rid: int, prompt: int = 10, budget: int = 20, **kw: Any
) -> RouterRequest:
    r = RouterRequest(rid, c.now(), prompt, budget, **kw)
    c.arrive(r)
    return r


def test_the_view_counts_what_the_router_sent_and_saw() -> None:
    c, _ = cluster(registry.create("fcfs"), n=1)
    inst = c.view.instance(0)
    a = request(c, 1, prompt=100, budget=50)
    b = request(c, 2, prompt=30, budget=10)
    assert a.state == b.state == DISPATCHED and a.assigned.result().instance == 0
    # Without gauges, waiting is what was sent with no first token yet.
    assert (inst.outstanding, inst.inflight_tokens, inst.n_waiting, inst.waiting_tokens) == (
        2,
        190,
        2,
        130,
    )
    c.first_token(a)
    assert (inst.n_waiting, inst.waiting_tokens, inst.n_running) == (1, 30, 1)
    c.finish(a)
    c.finish(b)  # finished without a first token (an error): still uncounted once
    assert (inst.outstanding, inst.inflight_tokens, inst.n_waiting, inst.waiting_tokens) == (
        0,
        0,
        0,
        0,
    )
    c.finish(b)
    assert inst.outstanding == 0


def test_pending_prompt_tokens_last_from_send_to_first_token_whatever_the_gauges_say() -> None:
    c, _ = cluster(registry.create("fcfs"), n=1)
    inst = c.view.instance(0)
    first = request(c, 1, prompt=4000)
    second = request(c, 2, prompt=64)
    assert inst.pending_prompt_tokens == 4064
    # A polled gauge saying nothing waits (both in their prefill) leaves what is owed in place.
    c.set_gauges(
        0,
        Gauges(
            n_waiting=0, n_running=2, waiting_tokens=0, kv_used_tokens=0, kv_capacity_tokens=None
        ),
    )
    assert inst.waiting_tokens == 0 and inst.pending_prompt_tokens == 4064
    c.first_token(first)
    assert inst.pending_prompt_tokens == 64
    c.finish(second)  # failed before its first token: taken off once
    c.finish(first)
    assert inst.pending_prompt_tokens == 0


def test_polled_gauges_are_brought_up_to_date_with_what_was_sent_since() -> None:
    c, _ = cluster(registry.create("fcfs"), n=1)
    inst = c.view.instance(0)
    reqs = [request(c, k, prompt=10) for k in range(4)]
    c.set_gauges(
        0,
        Gauges(
            n_waiting=1, n_running=3, waiting_tokens=10, kv_used_tokens=500, kv_capacity_tokens=None
        ),
    )
    assert (inst.n_waiting, inst.waiting_tokens, inst.kv_used_tokens) == (1, 10, 500)
    request(c, 9, prompt=10)  # sent after the poll: surely waiting
    assert (inst.n_waiting, inst.waiting_tokens) == (2, 20)
    for r in reqs:
        c.first_token(r)
    # The gauge said 1 waiting, but every request sent before the poll has a first token.
    assert inst.n_waiting == 1
    assert inst.n_running == min(3, inst.outstanding)


def test_a_gauge_capacity_resizes_the_instance_and_its_prefix_record() -> None:
    c, _ = cluster(registry.create("fcfs"), n=1)
    c.set_gauges(0, Gauges(0, 0, 0, 0, kv_capacity_tokens=4096))
    assert c.view.instance(0).kv_capacity_tokens == 4096


def test_a_timer_that_fires_early_still_wakes_the_policy_at_its_time() -> None:
    # uvloop's clock has millisecond resolution: a timer can fire a little before its
    # time. LAPS, woken "early", would hold its batch and never ask again.
    c, loop = cluster(registry.create("laps", window_ms=5.0), n=1)
    r = request(c, 1, prompt=10)
    assert r.state not in (DISPATCHED, DONE) and loop.timers
    loop.fire(early_by=0.0004)
    assert r.state == DISPATCHED


def test_an_abandoned_request_is_never_sent_when_the_policy_releases_it() -> None:
    c, loop = cluster(registry.create("laps", window_ms=5.0), n=1)
    r = request(c, 1)
    assert c.held == 1
    c.finish(r)  # the client left while it was held
    assert r.state == ABANDONED and c.held == 0
    loop.fire()
    assert r.state == DONE
    assert not r.assigned.done()
    assert c.view.instance(0).outstanding == 0


def test_an_unhealthy_backend_is_told_to_the_policy_and_its_prefixes_forgotten() -> None:
    seen: list[tuple[int, bool]] = []

    class Watch(Policy):
        name = "watch"

        def on_arrival(self, request, now_s, view):
            return Decisions.dispatch(request, "entry")

        def on_health(self, instance_id, healthy, now_s, view):
            seen.append((instance_id, healthy))
            return super().on_health(instance_id, healthy, now_s, view)

    c, _ = cluster(Watch(), n=2)
    r = request(c, 1, prompt=32, prefix_hashes=[11, 12], block_tokens=16)
    i = r.assigned.result().instance
    assert c.view.instance(i).cached_prefix_blocks(r) == 2
    c.set_healthy(i, False)
    assert seen[-1] == (i, False)
    assert c.view.instance(i).cached_prefix_blocks(r) == 0
    # The pool goes to the healthy one now.
    r2 = request(c, 2)
    assert r2.assigned.result().instance == 1 - i


def test_a_request_held_for_want_of_a_healthy_backend_goes_out_when_one_recovers() -> None:
    c, loop = cluster(registry.create("fcfs"), n=1)
    c.set_healthy(0, False)
    r = request(c, 1)
    assert r.state not in (DISPATCHED, DONE) and c.held == 1
    c.set_healthy(0, True)
    loop.fire()
    assert r.state == DISPATCHED and r.assigned.result().instance == 0


def test_a_pool_with_no_healthy_member_fails_the_dispatch_with_a_clear_error() -> None:
    class ToPool(Policy):
        name = "to-pool"

        def on_arrival(self, request, now_s, view):
            return Decisions.dispatch(request, "entry")

    c, _ = cluster(ToPool(), n=1)
    c.set_healthy(0, False)
    r = request(c, 1)
    with pytest.raises(Exception, match="no healthy backend in pool 'entry'"):
        r.assigned.result()


def test_sglang_style_pairs_count_on_the_decode_server_from_dispatch() -> None:
    class Pair(Policy):
        name = "pair"

        def on_arrival(self, request, now_s, view):
            return Decisions.dispatch(request, PDTarget("prefill", "decode"))

    c, _ = cluster(Pair(), roles=("prefill", "decode", "decode"))
    r = request(c, 1, prompt=40, budget=8)
    a = r.assigned.result()
    assert a.instance == 0 and a.decode in (1, 2)
    dec = c.view.instance(a.decode)
    assert (dec.outstanding, dec.n_waiting) == (1, 0)
    c.release(r)  # the prefill server answered
    assert c.view.instance(0).outstanding == 0 and dec.outstanding == 1
    c.finish(r)
    assert dec.outstanding == 0


def test_vllm_style_handoff_moves_the_request_to_the_decode_server() -> None:
    c, _ = cluster(registry.create("fcfs"), roles=("prefill", "decode"))
    r = request(c, 1, prompt=40, budget=8)
    d = c.decode_for(r, 0)
    c.move(r, d, first=True)
    assert c.view.instance(0).outstanding == 0
    assert (c.view.instance(1).outstanding, c.view.instance(1).n_waiting) == (1, 0)
    c.finish(r)
    assert c.view.instance(1).outstanding == 0


def test_a_first_token_is_progress_for_the_policy() -> None:
    # LAPS keeps at most one released unit behind the one that owes a first token.
    c, _ = cluster(registry.create("laps", window_ms=0.0), n=1)
    first = request(c, 1, prompt=10)
    second = request(c, 2, prompt=10)
    assert first.state == second.state == DISPATCHED  # one prefilling, one queued behind
    third = request(c, 3, prompt=10)
    assert third.state != DISPATCHED
    c.first_token(first)  # no poll needed: the router saw the first one answer
    assert third.state == DISPATCHED


def test_a_poll_that_changes_the_gauges_is_progress_for_the_policy() -> None:
    class Watch(Policy):
        name = "watch"

        def __init__(self) -> None:
            self.seen: list[tuple[int, int]] = []

        def on_arrival(self, request, now_s, view):
            return Decisions.dispatch(request, 0)

        def on_progress(self, instance_id, now_s, view):
            self.seen.append((instance_id, view.instance(instance_id).n_waiting))
            return NO_DECISIONS

    watch = Watch()
    c, _ = cluster(watch, n=1)
    request(c, 1, prompt=10)
    request(c, 2, prompt=10)
    assert c.view.instance(0).n_waiting == 2  # no gauges yet: both sent, no first token
    # The server says nothing waits (the first is being prefilled): the policy hears of it.
    drained = Gauges(
        n_waiting=0, n_running=1, waiting_tokens=0, kv_used_tokens=10, kv_capacity_tokens=None
    )
    c.set_gauges(0, drained)
    assert watch.seen == [(0, 0)]
    c.set_gauges(0, drained)  # the same gauges again: nothing new to tell
    assert watch.seen == [(0, 0)]


def test_released_groups_are_reported_with_their_size() -> None:
    sizes: list[int] = []
    loop = FakeLoop()
    c = LiveCluster(registry.create("laps", window_ms=5.0), loop, on_release=sizes.append)  # type: ignore[arg-type]
    c.add_instance("mixed", 100_000)
    c.set_healthy(0, True)
    for k in range(3):
        request(c, k, prompt=10)
    loop.fire()
    assert sizes == [3]
