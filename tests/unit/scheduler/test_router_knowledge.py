"""Every policy on views that know only what a router can know.

A small driver (:class:`Router`) plays a router in front of instances that
serve requests FIFO: one prefill at a time, then decoding. The policy sees
the router's own counts exactly (outstanding requests, in-flight tokens,
health, membership) and the backend gauges (waiting, running, queued
tokens, KV use) only as last polled, never a cache (``cached_prefix_blocks``
is always 0) and never a request's output length (requests carry only
``max_tokens``). Instances fail, recover, join and leave between arrivals.
Every registered policy runs on it, so a policy added later is covered.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from scheduler import registry
from scheduler.policies.pd import PDPolicy
from scheduler.policy import ClusterView, Decisions, InstanceView, PDTarget, Policy, least_loaded
from tests.unit.scheduler.policy_fakes import FakeRequest

# -- a router's view --------------------------------------------------------------------


class RouterInstance(InstanceView):
    """One backend: the router's own counts exact, gauges as last polled, no cache knowledge."""

    def __init__(self, instance_id: int, role: str) -> None:
        self._id, self._role = instance_id, role
        self.up = True
        #: The router's own tracking: requests sent and not finished, their tokens.
        self.unfinished: set[int] = set()
        self.tokens = 0
        #: (waiting, running, waiting tokens, KV used) as of the last poll.
        self.gauges = (0, 0, 0, 0)

    instance_id = property(lambda self: self._id)
    role = property(lambda self: self._role)
    healthy = property(lambda self: self.up)
    n_waiting = property(lambda self: self.gauges[0])
    n_running = property(lambda self: self.gauges[1])
    waiting_tokens = property(lambda self: self.gauges[2])
    kv_used_tokens = property(lambda self: self.gauges[3])
    outstanding = property(lambda self: len(self.unfinished))
    inflight_tokens = property(lambda self: self.tokens)
    kv_capacity_tokens = property(lambda self: 200_000)

    def cached_prefix_blocks(self, request) -> int:
        return 0


class RouterView(ClusterView):
    """The current members by id; pools computed from them. A departed id is unknown."""

    def __init__(self) -> None:
        self.members: dict[int, RouterInstance] = {}

    @property
    def instances(self):
        return list(self.members.values())

    pool_names = property(lambda self: ("entry", "all", "mixed", "prefill", "decode"))

    def pool(self, name: str):
        insts = self.members.values()
        if name == "entry":
            return [i for i in insts if i.role != "decode"]
        if name == "all":
            return list(insts)
        if name in ("mixed", "prefill", "decode"):
            return [i for i in insts if i.role == name]
        raise ValueError(f"unknown pool {name!r}")

    def instance(self, instance_id: int) -> InstanceView:
        return self.members[instance_id]


# -- the backends and the router around them -------------------------------------------


@dataclass
class Backend:
    """What an instance really does: FIFO prefills, one at a time, then decoding."""

    queue: list[FakeRequest] = field(default_factory=list)
    prefilling: FakeRequest | None = None
    decoding: set[int] = field(default_factory=set)
    queued_tokens: int = 0


def prefill_s(req: FakeRequest) -> float:
    return 0.002 + req.prompt_tokens * 1e-5


def decode_s(req: FakeRequest) -> float:
    return req.max_tokens * 0.02


class Router:
    """Feeds a policy arrivals, progress, timers and health changes; applies its decisions.

    Args:
        policy: the policy under test.
        roles: the initial instances' roles.
        poll_s: gauges are refreshed this often (inf: never: they stay 0).
        report_health: call ``on_health`` when health changes.
    """

    def __init__(
        self, policy: Policy, roles: list[str], *, poll_s: float = 0.2, report_health: bool = True
    ) -> None:
        self.policy, self.poll_s, self.report_health = policy, poll_s, report_health
        self.view = RouterView()
        self.backends: dict[int, Backend] = {}
        self.events: list = []
        self.seq = itertools.count()
        self.now = 0.0
        self.requests: dict[int, FakeRequest] = {}
        #: request id -> [(time, instance)] for each dispatch.
        self.dispatched: dict[int, list[tuple[float, int]]] = {}
        self.finished: set[int] = set()
        #: Dispatches to an instance that was unhealthy, gone or not an entry.
        self.violations: list[str] = []
        self.decode_of: dict[int, int] = {}
        self.health_log: list[tuple[float, int, bool]] = []
        for role in roles:
            self.join(role)
        policy.reset()
        if poll_s < float("inf"):
            self.at(poll_s, self._poll)

    # scripting
    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.events, (t, next(self.seq), fn))

    def join(self, role: str) -> int:
        iid = max([*self.backends, -1]) + 1
        self.view.members[iid] = RouterInstance(iid, role)
        self.backends[iid] = Backend()
        return iid

    def leave(self, iid: int) -> None:
        del self.view.members[iid]  # what it holds still finishes; the router forgets it

    def set_health(self, iid: int, up: bool) -> None:
        self.view.members[iid].up = up
        self.health_log.append((self.now, iid, up))
        if self.report_health:
            self.apply(self.policy.on_health(iid, up, self.now, self.view))

    def arrive(self, req: FakeRequest) -> None:
        self.requests[req.request_id] = req
        self.at(req.arrival_s, lambda: self.apply(self.policy.on_arrival(req, self.now, self.view)))

    def run(self, until_s: float = 120.0, max_events: int = 200_000) -> None:
        for _ in range(max_events):
            if not self.events:
                return
            t, _, fn = heapq.heappop(self.events)
            if t > until_s:
                return
            self.now = max(self.now, t)
            fn()
        raise AssertionError("the run did not settle")

    # the router's part
    def apply(self, d: Decisions) -> None:
        for req, target in d.dispatches:
            decode = None
            if isinstance(target, PDTarget):
                target, decode = target.prefill, target.decode
            iid = self._resolve(target)
            if decode is not None:
                self.decode_of[req.request_id] = self._resolve(decode)
            self._send(req, iid)
        if d.wake_at_s is not None:
            self.at(d.wake_at_s, lambda: self.apply(self.policy.on_timer(self.now, self.view)))

    def _resolve(self, target: int | str) -> int:
        if isinstance(target, str):
            inst = least_loaded(self.view.pool(target))
            assert inst is not None, f"pool {target!r} has no healthy instance"
            return inst.instance_id
        return target

    def _send(self, req: FakeRequest, iid: int) -> None:
        rid = req.request_id
        self.dispatched.setdefault(rid, []).append((self.now, iid))
        inst = self.view.members.get(iid)
        if inst is None or not inst.up or inst.role == "decode":
            self.violations.append(f"t={self.now:.3f}: request {rid} to instance {iid}")
            if inst is None:
                return
        inst.unfinished.add(rid)
        inst.tokens += req.prompt_tokens + req.max_tokens
        b = self.backends[iid]
        b.queue.append(req)
        b.queued_tokens += req.prompt_tokens
        if b.prefilling is None:
            self._start_prefill(iid)

    def _start_prefill(self, iid: int) -> None:
        b = self.backends[iid]
        req = b.prefilling = b.queue.pop(0)
        b.queued_tokens -= req.prompt_tokens
        self.at(self.now + prefill_s(req), lambda: self._prefilled(iid, req))

    def _prefilled(self, iid: int, req: FakeRequest) -> None:
        b = self.backends[iid]
        b.prefilling = None
        role = self.view.members[iid].role if iid in self.view.members else "mixed"
        if role == "prefill":
            self._untrack(iid, req)
            dest = self.decode_of.get(req.request_id)
            if dest is None:
                dest = self.policy.select_decode_instance(req, iid, self.now, self.view)
            if dest is None:
                fallback = least_loaded(self.view.pool("decode"))
                assert fallback is not None, "no healthy decode instance"
                dest = fallback.instance_id
            d = self.view.members[dest]
            d.unfinished.add(req.request_id)
            d.tokens += req.prompt_tokens + req.max_tokens
            self.backends[dest].decoding.add(req.request_id)
            self.at(self.now + decode_s(req), lambda: self._finish(dest, req))
        else:
            b.decoding.add(req.request_id)
            self.at(self.now + decode_s(req), lambda: self._finish(iid, req))
        if b.queue:
            self._start_prefill(iid)
        self._progress(iid)

    def _finish(self, iid: int, req: FakeRequest) -> None:
        self.backends[iid].decoding.discard(req.request_id)
        self._untrack(iid, req)
        assert req.request_id not in self.finished
        self.finished.add(req.request_id)
        self._progress(iid)

    def _untrack(self, iid: int, req: FakeRequest) -> None:
        inst = self.view.members.get(iid)
        if inst is not None:
            inst.unfinished.discard(req.request_id)
            inst.tokens -= req.prompt_tokens + req.max_tokens

    def _progress(self, iid: int) -> None:
        if iid in self.view.members:
            self.apply(self.policy.on_progress(iid, self.now, self.view))

    def _poll(self) -> None:
        for iid, inst in self.view.members.items():
            b = self.backends[iid]
            running = len(b.decoding) + (b.prefilling is not None)
            inst.gauges = (len(b.queue), running, b.queued_tokens, 0)
        if len(self.finished) < len(self.requests):
            self.at(self.now + self.poll_s, self._poll)

    # what a test checks
    def served_once(self) -> bool:
        once = all(len(self.dispatched.get(rid, ())) == 1 for rid in self.requests)
        return once and self.finished == set(self.requests)

    def sent_to(self, iid: int, after_s: float = -1.0, before_s: float = float("inf")) -> int:
        return sum(
            1
            for sends in self.dispatched.values()
            for t, i in sends
            if i == iid and after_s <= t < before_s
        )


def workload(n: int = 48, span_s: float = 1.2) -> list[FakeRequest]:
    """Short and long prompts, some sharing a session's prefix blocks (hashes, no cache known)."""
    out = []
    for i in range(n):
        prompt = (40, 120, 2400, 300, 64, 3600)[i % 6]
        session = i % 5
        blocks = -(-prompt // 16)
        hashes = tuple(session * 10_000 + k for k in range(blocks))
        out.append(
            FakeRequest(
                request_id=i,
                arrival_s=round(i * span_s / n, 6),
                prompt_tokens=prompt,
                max_tokens=4 + i % 7,
                session_id=f"s{session}",
                prefix_hashes=hashes,
                block_tokens=16,
            )
        )
    return out


# -- the policies: every registered one, LAPS's modes, PD pairs ----------------------------

MIXED = ["mixed"] * 4
PD = ["prefill", "prefill", "decode", "decode"]


def _cases() -> list[tuple[str, Callable[[], Policy], list[str]]]:
    cases: list[tuple[str, Callable[[], Policy], list[str]]] = [
        (name, (lambda n=name: registry.create(n)), MIXED) for name in registry.names()
    ]
    cases += [
        ("laps-temporal", lambda: registry.create("laps", mode="temporal"), MIXED),
        ("laps-spatial", lambda: registry.create("laps", mode="spatial"), MIXED),
        ("laps+least_load", lambda: registry.create_pd("laps", "least_load"), PD),
        (
            "round_robin+least_load@dispatch",
            lambda: PDPolicy(
                registry.create("round_robin"),
                registry.create("least_load"),
                decode_choice="dispatch",
            ),
            PD,
        ),
        (
            "laps+round_robin@dispatch",
            lambda: PDPolicy(
                registry.create("laps"), registry.create("round_robin"), decode_choice="dispatch"
            ),
            PD,
        ),
    ]
    return cases


CASES = _cases()
IDS = [c[0] for c in CASES]


@pytest.fixture(params=CASES, ids=IDS)
def case(request):
    name, make, roles = request.param
    return name, make(), list(roles)


def entry_ids(roles: list[str]) -> list[int]:
    return [i for i, r in enumerate(roles) if r != "decode"]


# -- tests ------------------------------------------------------------------------------


def test_every_policy_serves_everything_on_lagging_gauges_and_no_cache_knowledge(case):
    _, policy, roles = case
    router = Router(policy, roles, poll_s=0.3)
    for req in workload():
        router.arrive(req)
    router.run()
    assert router.violations == []
    assert router.served_once()
    # Gauges lag by up to 0.3 s; every entry instance still took a share of the work.
    assert all(router.sent_to(i) > 0 for i in entry_ids(roles))


def test_every_policy_serves_everything_when_gauges_are_never_polled(case):
    _, policy, roles = case
    router = Router(policy, roles, poll_s=float("inf"))
    for req in workload(24):
        router.arrive(req)
    router.run()
    assert router.violations == [] and router.served_once()


def test_every_policy_never_sends_to_an_unhealthy_instance(case):
    _, policy, roles = case
    router = Router(policy, roles)
    sick = entry_ids(roles)[0]
    router.view.members[sick].up = False
    for req in workload():
        router.arrive(req)
    router.run()
    assert router.violations == []
    assert router.sent_to(sick) == 0
    assert router.served_once()


@pytest.mark.parametrize("report_health", [True, False], ids=["reported", "unreported"])
def test_every_policy_places_work_elsewhere_when_an_instance_fails_and_holds_through_an_outage(
    case, report_health
):
    _, policy, roles = case
    router = Router(policy, roles, report_health=report_health)
    first, *others = entry_ids(roles)
    router.at(0.3, lambda: router.set_health(first, False))
    for i in others:  # every entry instance down for a while
        router.at(0.6, lambda i=i: router.set_health(i, False))
        router.at(0.9, lambda i=i: router.set_health(i, True))
    reqs = workload()
    for req in reqs:
        router.arrive(req)
    router.run()
    assert router.violations == []
    assert router.served_once()
    assert router.sent_to(first, after_s=0.3) == 0
    during = [r.request_id for r in reqs if 0.6 <= r.arrival_s < 0.9]
    assert during
    assert all(router.dispatched[rid][0][0] >= 0.9 for rid in during)


def test_every_policy_takes_in_an_instance_that_joins_and_forgets_one_that_leaves(case):
    _, policy, roles = case
    router = Router(policy, roles)
    role = roles[0]
    joined: list[int] = []
    router.at(0.35, lambda: joined.append(router.join(role)))
    leaver = entry_ids(roles)[0]
    router.at(0.7, lambda: router.leave(leaver))
    for req in workload(72, span_s=1.8):
        router.arrive(req)
    router.run()
    assert router.violations == []
    assert router.served_once()
    assert router.sent_to(joined[0]) > 0
    assert router.sent_to(leaver, after_s=0.7) == 0


@pytest.mark.parametrize(
    "make",
    [
        lambda: registry.create("fcfs"),
        lambda: registry.create("least_load"),
        lambda: registry.create("least_load", metric="tokens"),
        lambda: registry.create("cache_aware"),
    ],
    ids=["fcfs", "least_load", "least_load-tokens", "cache_aware"],
)
def test_load_aware_policies_spread_a_burst_by_their_own_counts_while_gauges_read_idle(make):
    policy = make()
    router = Router(policy, MIXED, poll_s=float("inf"))
    for i in range(8):
        router.arrive(FakeRequest(i, 0.0, 500, 20))
    router.run(until_s=0.0)
    assert sorted(router.sent_to(i) for i in range(4)) == [2, 2, 2, 2]
