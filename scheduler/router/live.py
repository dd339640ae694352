"""The live driver of a policy: the router's view of its backends, and the policy fed on the event loop's clock.

:class:`LiveCluster` is to the router what :mod:`sim.loop` is to the
simulator: it hands each arrival to the policy (``on_arrival``), tells it
of progress (a first token, a finish, an error: ``on_progress``), of the
times it asked to be woken at (``on_timer``, on ``loop.call_at``) and of
health changes (``on_health``), and carries out its decisions. No decision
is made here; the policy objects are the simulator's own.

What the policy sees (:class:`LiveInstanceView`, the contract of
:mod:`scheduler.policy`):

* **Known, exact**: ``outstanding`` (sent and not finished) and
  ``inflight_tokens`` (their prompts plus budgets), role, health (the
  health checks and the circuit breaker), KV capacity (configured, or as a
  gauge said).
* **Polled gauges** (SGLang's ``/v1/loads``, vLLM's ``/metrics``, every
  ``poll_interval_s``), brought up to date with what the router did since
  the poll: ``n_waiting`` is the polled queue plus the requests sent since
  the poll, but never more than the requests the router has sent there and
  seen no first token of (those certainly are not waiting);
  ``waiting_tokens`` likewise in prompt tokens. Without gauges (an
  ``openai`` backend, or before the first poll) both are the router's own
  count of requests sent without a first token, which also counts the one
  being prefilled. ``n_running`` is the rest of ``outstanding``, or the
  gauge; ``kv_used_tokens`` the gauge, else the prompts outstanding.
* **Prefix cache**: a :class:`scheduler.prefix.PrefixRecord` of the prompts
  the router sent each backend (their block hashes), forgotten when the
  backend goes unhealthy.

A poll that changes a backend's gauges is told to the policy as progress
on that backend, so a policy waiting for a queue to drain (LAPS releases
a batch when nothing waits) hears of it.

Held requests: a request the policy holds waits in the router. If its
client goes away, or it waited ``queue_timeout_s``, it is *abandoned*: the
policy is not told (the contract has no hook to withdraw a request), and
when it later releases the request the router drops it instead of sending
it, counting nothing.

Prefill/decode: a plain target is the prefill server, and the decode
server is chosen when the prefill is done (vLLM's flow:
:meth:`scheduler.policy.Policy.select_decode_instance`, else the least
loaded decode backend); a :class:`scheduler.policy.PDTarget` names both at
dispatch (SGLang's flow), and the decode backend counts the request as
outstanding from then.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from scheduler.policy import (
    NO_DECISIONS,
    Decisions,
    InstanceView,
    PDTarget,
    Policy,
    PooledView,
    RequestLike,
    least_loaded,
)
from scheduler.prefix import PrefixRecord
from scheduler.router.gauges import Gauges

__all__ = [
    "ABANDONED",
    "DISPATCHED",
    "DONE",
    "HELD",
    "Assignment",
    "LiveCluster",
    "LiveInstanceView",
    "NoBackend",
    "RouterRequest",
]

log = logging.getLogger("llmsched.router")

#: Request states: waiting for the policy; sent upstream; finished; given up while held.
HELD, DISPATCHED, DONE, ABANDONED = 0, 1, 2, 3


class NoBackend(RuntimeError):
    """No healthy backend to send a request to (the message says which pool)."""


@dataclass(frozen=True, slots=True)
class Assignment:
    """Where the policy sent a request: the instance, and under SGLang's PD flow the decode one."""

    instance: int
    decode: int = -1


class RouterRequest:
    """A request in the router: the fields a policy may read (:class:`scheduler.policy.RequestLike`) and the router's own."""

    __slots__ = (
        "arrival_s",
        "assigned",
        "block_tokens",
        "decode_instance",
        "first_token_seen",
        "instance",
        "max_tokens",
        "prefix_hashes",
        "prompt_tokens",
        "request_id",
        "session_id",
        "slo_tpot_s",
        "slo_ttft_s",
        "state",
    )

    def __init__(
        self,
        request_id: int,
        arrival_s: float,
        prompt_tokens: int,
        max_tokens: int,
        *,
        session_id: str | None = None,
        prefix_hashes: Sequence[int] | None = None,
        block_tokens: int | None = None,
        slo_ttft_s: float | None = None,
        slo_tpot_s: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.arrival_s = arrival_s
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.session_id = session_id
        self.prefix_hashes = prefix_hashes
        self.block_tokens = block_tokens
        self.slo_ttft_s = slo_ttft_s
        self.slo_tpot_s = slo_tpot_s
        self.state = HELD
        #: Resolved when the policy dispatches it (or fails with NoBackend).
        self.assigned: asyncio.Future[Assignment] | None = None
        #: The instance counting it as outstanding (-1: none), and the decode one.
        self.instance = -1
        self.decode_instance = -1
        self.first_token_seen = False

    def __repr__(self) -> str:
        return f"RouterRequest({self.request_id}, prompt={self.prompt_tokens}, state={self.state})"


class LiveInstanceView(InstanceView):
    """One backend as the policy sees it (see the module docstring)."""

    __slots__ = (
        "_id",
        "_prefix",
        "_role",
        "capacity",
        "gauges",
        "healthy",
        "inflight",
        "n_outstanding",
        "outstanding_prompt_tokens",
        "removed",
        "sent_since_poll",
        "sent_tokens_since_poll",
        "unfirst",
        "unfirst_tokens",
    )

    def __init__(self, instance_id: int, role: str, capacity: int, prefix: PrefixRecord) -> None:
        self._id = instance_id
        self._role = role
        self._prefix = prefix
        self.capacity = capacity
        #: Available for new requests (health checks and circuit breaker).
        self.healthy = False
        #: Taken out through the admin API: never healthy again.
        self.removed = False
        self.n_outstanding = 0
        self.inflight = 0
        self.outstanding_prompt_tokens = 0
        #: Sent and no first token seen yet: requests and their prompt tokens.
        self.unfirst = 0
        self.unfirst_tokens = 0
        self.gauges: Gauges | None = None
        self.sent_since_poll = 0
        self.sent_tokens_since_poll = 0

    @property
    def instance_id(self) -> int:
        return self._id

    @property
    def role(self) -> str:
        return self._role

    @property
    def n_waiting(self) -> int:
        g = self.gauges
        if g is None:
            return self.unfirst
        return min(g.n_waiting + self.sent_since_poll, self.unfirst)

    @property
    def waiting_tokens(self) -> int:
        g = self.gauges
        if g is None or g.waiting_tokens is None:
            return self.unfirst_tokens
        return min(g.waiting_tokens + self.sent_tokens_since_poll, self.unfirst_tokens)

    @property
    def n_running(self) -> int:
        g = self.gauges
        if g is None:
            return self.n_outstanding - self.unfirst
        return min(g.n_running, self.n_outstanding)

    @property
    def outstanding(self) -> int:
        return self.n_outstanding

    @property
    def pending_prompt_tokens(self) -> int:
        return self.unfirst_tokens

    @property
    def inflight_tokens(self) -> int:
        return self.inflight

    @property
    def kv_used_tokens(self) -> int:
        g = self.gauges
        if g is None or g.kv_used_tokens is None:
            return self.outstanding_prompt_tokens
        return g.kv_used_tokens

    @property
    def kv_capacity_tokens(self) -> int:
        return self.capacity

    def cached_prefix_blocks(self, request: RequestLike) -> int:
        return self._prefix.cached_blocks(self._id, request)

    def load_key(self) -> tuple[int, int, int]:
        return (self.n_outstanding, self.inflight, self._id)

    def __repr__(self) -> str:
        return (
            f"LiveInstanceView(id={self._id}, role={self._role}, healthy={self.healthy}, "
            f"outstanding={self.n_outstanding})"
        )


class _View(PooledView):
    """The router's view: backends appended as they are added, pools as lists."""

    __slots__ = ()
    _instances: list[LiveInstanceView]
    _pools: dict[str, list[LiveInstanceView]]

    def __init__(self) -> None:
        super().__init__([], {})


_BUILTIN_POOLS = ("entry", "all", "mixed", "prefill", "decode")


class LiveCluster:
    """The policy and the router's view of the backends, on an asyncio loop's clock.

    Args:
        policy: the scheduling policy (reset here).
        loop: the event loop whose clock and timers are used.
        block_tokens: tokens per block of the prefix record.
        on_dispatch: told ``(request, assignment)`` for every request sent
            (for metrics); optional.
        on_release: told the size of every group of requests released
            together (a batch hint's, else a decision's dispatches); optional.
    """

    def __init__(
        self,
        policy: Policy,
        loop: asyncio.AbstractEventLoop,
        *,
        on_dispatch: Callable[[RouterRequest, Assignment], None] | None = None,
        on_release: Callable[[int], None] | None = None,
    ) -> None:
        self.policy = policy
        policy.reset()
        self.loop = loop
        self.t0 = loop.time()
        self.view = _View()
        self.prefix = PrefixRecord()
        self._timers: dict[float, asyncio.TimerHandle] = {}
        self._floor = 0.0
        kind = type(policy)
        self._wants_progress = kind.on_progress is not Policy.on_progress
        self._picks_decode = kind.select_decode_instance is not Policy.select_decode_instance
        self._on_dispatch = on_dispatch
        self._on_release = on_release
        #: Arrived and neither dispatched nor abandoned.
        self.held = 0
        for name in _BUILTIN_POOLS:
            self.view._pools[name] = []

    # -- clock ----------------------------------------------------------------------

    def now(self) -> float:
        """Seconds since the router started, on the loop's (monotonic) clock.

        Never earlier than a timer already fired: uvloop's clock has a
        resolution of a millisecond, and its timers can fire a fraction of
        one before the time asked for; a policy woken for ``t`` sees ``t``.
        """
        now = self.loop.time() - self.t0
        return now if now > self._floor else self._floor

    # -- backends -------------------------------------------------------------------

    def add_instance(self, role: str, capacity: int, pools: Sequence[str] = ()) -> int:
        """Add a backend (not yet healthy); its instance id."""
        i = len(self.view._instances)
        inst = LiveInstanceView(i, role, capacity, self.prefix)
        self.prefix.set_capacity(i, capacity)
        self.view._instances.append(inst)
        p = self.view._pools
        p["all"].append(inst)
        p[role].append(inst)
        if role != "decode":
            p["entry"].append(inst)
        for name in pools:
            if name in _BUILTIN_POOLS:
                raise ValueError(f"pool {name!r} is a built-in pool name")
            p.setdefault(name, []).append(inst)
        return i

    def remove_instance(self, instance_id: int) -> None:
        """Take a backend out for good: unhealthy, and out of every pool."""
        inst = self.view._instances[instance_id]
        inst.removed = True
        self.set_healthy(instance_id, False)
        for members in self.view._pools.values():
            if inst in members:
                members.remove(inst)

    def set_healthy(self, instance_id: int, healthy: bool) -> None:
        """A backend became available or not; the policy is told."""
        inst = self.view._instances[instance_id]
        healthy = healthy and not inst.removed
        if inst.healthy == healthy:
            return
        inst.healthy = healthy
        if not healthy:
            # A router cannot tell a blip from a restart with an empty cache.
            self.prefix.forget(instance_id)
        self._apply(self.policy.on_health(instance_id, healthy, self.now(), self.view))

    def set_gauges(self, instance_id: int, gauges: Gauges | None) -> None:
        """A poll's result (None: the poll failed; the router's own counts stand in)."""
        inst = self.view._instances[instance_id]
        old = (inst.n_waiting, inst.waiting_tokens, inst.n_running)
        inst.gauges = gauges
        inst.sent_since_poll = inst.sent_tokens_since_poll = 0
        if (
            gauges is not None
            and gauges.kv_capacity_tokens
            and gauges.kv_capacity_tokens != inst.capacity
        ):
            inst.capacity = gauges.kv_capacity_tokens
            self.prefix.set_capacity(instance_id, inst.capacity)
        if self._wants_progress and (inst.n_waiting, inst.waiting_tokens, inst.n_running) != old:
            self._apply(self.policy.on_progress(instance_id, self.now(), self.view))

    # -- requests ---------------------------------------------------------------------

    def arrive(self, req: RouterRequest) -> None:
        """Hand a request to the policy; ``req.assigned`` resolves when it is dispatched."""
        req.assigned = self.loop.create_future()
        self.held += 1
        dec = self.policy.on_arrival(req, req.arrival_s, self.view)
        if dec is not NO_DECISIONS:
            self._apply(dec)

    def abandon(self, req: RouterRequest) -> None:
        """A held request's client left or it waited too long: never send it."""
        if req.state == HELD:
            req.state = ABANDONED
            self.held -= 1

    def first_token(self, req: RouterRequest) -> None:
        """The first token of a dispatched request arrived."""
        if req.first_token_seen or req.instance < 0:
            return
        req.first_token_seen = True
        inst = self.view._instances[req.instance]
        inst.unfirst -= 1
        inst.unfirst_tokens -= req.prompt_tokens
        if self._wants_progress:
            self._apply(self.policy.on_progress(req.instance, self.now(), self.view))

    def release(self, req: RouterRequest) -> None:
        """A request is over on its instance (finished, failed, or moving on): stop counting it."""
        i = req.instance
        if i < 0:
            return
        req.instance = -1
        inst = self.view._instances[i]
        self._uncount(inst, req)
        if self._wants_progress:
            self._apply(self.policy.on_progress(i, self.now(), self.view))

    def finish(self, req: RouterRequest) -> None:
        """A request is over: released everywhere (a held one is abandoned)."""
        if req.state == HELD:
            self.abandon(req)
        if req.state != DISPATCHED:
            return
        self.release(req)
        d = req.decode_instance
        if d >= 0:
            req.decode_instance = -1
            self._uncount(self.view._instances[d], req, first=True)
            if self._wants_progress:
                self._apply(self.policy.on_progress(d, self.now(), self.view))
        req.state = DONE

    def move(self, req: RouterRequest, instance_id: int, *, first: bool = False) -> None:
        """Count ``req`` on another instance (a retry, or the decode side of a PD hand-off)."""
        self.release(req)
        req.instance = instance_id
        req.first_token_seen = first
        self._count(self.view._instances[instance_id], req, first=first)
        self.prefix.record(instance_id, req)

    def count_decode(self, req: RouterRequest, decode_id: int) -> None:
        """Count ``req`` on the decode backend chosen for it now (SGLang's flow, decode chosen late)."""
        req.decode_instance = decode_id
        self._count(self.view._instances[decode_id], req, first=True)

    def drop_decode(self, req: RouterRequest) -> None:
        """Stop counting ``req`` on its decode backend (a retry picks the pair again)."""
        d = req.decode_instance
        if d >= 0:
            req.decode_instance = -1
            self._uncount(self.view._instances[d], req, first=True)

    def decode_for(self, req: RouterRequest, prefill_id: int) -> int:
        """The decode backend for a prefilled request (vLLM's flow: chosen at hand-off).

        Raises:
            NoBackend: no healthy decode backend.
        """
        target = None
        if self._picks_decode:
            target = self.policy.select_decode_instance(req, prefill_id, self.now(), self.view)
        if target is None or not self.view._instances[target].healthy:
            inst = least_loaded(self.view._pools["decode"])
            if inst is None:
                raise NoBackend("no healthy decode backend")
            target = inst.instance_id
        return target

    def fallback(self, role_pool: str, exclude: Sequence[int]) -> int | None:
        """The least loaded healthy instance of a pool, not in ``exclude`` (for a retry)."""
        members = [i for i in self.view._pools.get(role_pool, ()) if i.instance_id not in exclude]
        inst = least_loaded(members)
        return None if inst is None else inst.instance_id

    # -- decisions --------------------------------------------------------------------

    def _count(self, inst: LiveInstanceView, req: RouterRequest, *, first: bool = False) -> None:
        inst.n_outstanding += 1
        inst.inflight += req.prompt_tokens + req.max_tokens
        inst.outstanding_prompt_tokens += req.prompt_tokens
        if not first:
            inst.unfirst += 1
            inst.unfirst_tokens += req.prompt_tokens
            inst.sent_since_poll += 1
            inst.sent_tokens_since_poll += req.prompt_tokens

    def _uncount(self, inst: LiveInstanceView, req: RouterRequest, *, first: bool = False) -> None:
        inst.n_outstanding -= 1
        inst.inflight -= req.prompt_tokens + req.max_tokens
        inst.outstanding_prompt_tokens -= req.prompt_tokens
        if not first and not req.first_token_seen:
            inst.unfirst -= 1
            inst.unfirst_tokens -= req.prompt_tokens

    def _apply(self, dec: Decisions) -> None:
        if dec is NO_DECISIONS:
            return
        dispatches = dec.dispatches
        if dispatches and self._on_release is not None:
            if dec.batches:
                for hint in dec.batches:
                    self._on_release(hint.count)
            else:
                self._on_release(len(dispatches))
        if dec.batches:
            # A hinted run goes to one backend: resolve a pool target once for all of it.
            resolved: dict[int, int | PDTarget] = {}
            for hint in dec.batches:
                target = dispatches[hint.start][1]
                try:
                    fixed = self._fix(target)
                except NoBackend:
                    continue
                for k in range(hint.start, hint.start + hint.count):
                    resolved[k] = fixed
            for k, (req, target) in enumerate(dispatches):
                self._dispatch(req, resolved.get(k, target))  # type: ignore[arg-type]
        else:
            for req, target in dispatches:
                self._dispatch(req, target)  # type: ignore[arg-type]
        if dec.wake_at_s is not None:
            self._set_timer(dec.wake_at_s)

    def _fix(self, target: int | str | PDTarget) -> int | PDTarget:
        if isinstance(target, PDTarget):
            return PDTarget(self._resolve(target.prefill), self._resolve(target.decode))
        return self._resolve(target)

    def _resolve(self, target: int | str) -> int:
        if isinstance(target, str):
            inst = least_loaded(self.view.pool(target))
            if inst is None:
                raise NoBackend(f"no healthy backend in pool {target!r}")
            return inst.instance_id
        return target

    def _dispatch(self, req: RouterRequest, target: int | str | PDTarget) -> None:
        if not isinstance(req, RouterRequest) or req.state not in (HELD, ABANDONED):
            raise RuntimeError(
                f"policy {self.policy.name!r} dispatched {req!r}, which is not a held request"
            )
        if req.state == ABANDONED:
            req.state = DONE
            return
        self.held -= 1
        req.state = DISPATCHED
        fut = req.assigned
        try:
            if isinstance(target, PDTarget):
                prefill, decode = self._resolve(target.prefill), self._resolve(target.decode)
            else:
                prefill, decode = self._resolve(target), -1
        except NoBackend as exc:
            req.state = DONE
            if fut is not None and not fut.done():
                fut.set_exception(exc)
            return
        instances = self.view._instances
        if not 0 <= prefill < len(instances) or instances[prefill].role == "decode":
            raise RuntimeError(
                f"policy {self.policy.name!r} dispatched request {req.request_id} to instance "
                f"{prefill!r}, which does not take new requests"
            )
        req.instance = prefill
        self._count(instances[prefill], req)
        self.prefix.record(prefill, req)
        if decode >= 0:
            if instances[decode].role != "decode":
                raise RuntimeError(
                    f"policy {self.policy.name!r} chose instance {decode} for decoding; it is a "
                    f"{instances[decode].role} instance"
                )
            req.decode_instance = decode
            self._count(instances[decode], req, first=True)
        assignment = Assignment(prefill, decode)
        if self._on_dispatch is not None:
            self._on_dispatch(req, assignment)
        if fut is not None and not fut.done():
            fut.set_result(assignment)

    def _set_timer(self, at_s: float) -> None:
        if at_s in self._timers:
            return
        self._timers[at_s] = self.loop.call_at(self.t0 + at_s, self._on_timer, at_s)

    def _on_timer(self, at_s: float) -> None:
        self._timers.pop(at_s, None)
        if at_s > self._floor:
            self._floor = at_s
        self._apply(self.policy.on_timer(self.now(), self.view))

    def queue_depths(self) -> Mapping[str, int]:
        """Requests held per policy queue (:meth:`scheduler.policy.Policy.queue_depths`), and ``held`` in all."""
        return {**self.policy.queue_depths(), "held": self.held}

    def close(self) -> None:
        """Cancel the policy's pending timers."""
        for h in self._timers.values():
            h.cancel()
        self._timers.clear()
