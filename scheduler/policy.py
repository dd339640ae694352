"""The policy hook: what a scheduling policy sees and what it may decide.

A policy is a small state machine fed four kinds of events, each with the
driver's clock reading ``now_s``:

* ``on_arrival(request, now_s, view)``: a request reached the router;
* ``on_progress(instance_id, now_s, view)``: an instance finished a step that
  changed its set of requests (a first token, a finish, a hand-off to a
  decode instance, a preemption);
* ``on_timer(now_s, view)``: a time the policy asked for has come;
* ``on_health(instance_id, healthy, now_s, view)``: an instance's health
  changed (the view already shows it). A driver that cannot tell a policy
  (or forgets) loses nothing but time: policies also re-check health at
  their other events.

Each answers with :class:`Decisions`: requests to dispatch now, each to an
instance id, a pool name or (under PD) a :class:`PDTarget`, and optionally
a time to be woken at. A policy
may hold requests in its own queues and release them from any later event.

Instances are seen only through the read-only :class:`ClusterView` and
:class:`InstanceView`, which the simulator and the live router both
implement. Nothing here knows whether time is simulated.

Pools: a dispatch target that is a string names a pool, and the driver picks
the instance in it with :func:`least_loaded`. Every cluster has the pools
``"entry"`` (instances that accept new requests: roles ``mixed`` and
``prefill``), ``"all"``, and one per role (``"mixed"``, ``"prefill"``,
``"decode"``); a deployment may define more (``"short"``, ``"long"``).

Prefill/decode disaggregation: the decode instance is chosen at one of two
moments, and the dispatch target says which.

* **At hand-off** (vLLM's connector flow: the proxy learns the KV is ready
  and then picks a decode server): the target is a plain instance id or
  pool, the prefill instance; when the prefill finishes, the driver asks
  :meth:`Policy.select_decode_instance` (``None``, the default, means
  :func:`least_loaded` over the ``"decode"`` pool).
* **At dispatch** (SGLang's PD protocol: the router sends each request to
  the prefill and the decode server at the same time, so both are chosen
  before the prefill starts): the target is a :class:`PDTarget` naming
  both, each an instance id or a pool (a pool is resolved by the driver at
  dispatch, as for a plain target). The driver then does not call
  ``select_decode_instance`` for that request; the decode instance counts
  the request as outstanding from the dispatch on, as SGLang's decode
  server does once it has the request. If the named decode instance is
  unhealthy at hand-off the driver may fall back to the hand-off choice.

A :class:`PDTarget` on a cluster without decode instances is a driver error.

What a policy may know. A router knows exactly what it tracks itself
(requests it sent and has not seen finish, their prompts and output
*budgets*, the instances' roles and health, KV capacity from server info);
it learns the rest by polling the backends (queue lengths, KV use: late by
the poll interval) or infers it (which prefixes an instance caches, from
its own record of what it sent there, :class:`scheduler.prefix.PrefixRecord`).
Each :class:`InstanceView` member says which it is. A request's future
output length is never known: :class:`RequestLike` carries only the budget
(``max_tokens``).

Batch hints: :attr:`Decisions.batches` may mark a run of consecutive
dispatches, all to one target, as one prefill batch of a padded CUDA-graph
shape (:class:`BatchHint`). What a driver does with it depends on the
engine behind it:

* an engine that can replay a captured prefill graph (an engine patch)
  runs the group as that one padded batch (the simulator's
  ``batch_hints="graph"``);
* a stock SGLang or vLLM cannot be told a graph shape: the driver sends the
  group to its one instance together, at once, so that it lands in the
  same engine step, batched and priced as any arrivals are (the router,
  and the simulator's ``batch_hints="group"``).

Either way the hint never changes where or when the requests go; without
hints nothing changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from operator import methodcaller
from typing import ClassVar, Protocol, runtime_checkable

__all__ = [
    "NO_DECISIONS",
    "ROLES",
    "BatchHint",
    "ClusterView",
    "Decisions",
    "InstanceView",
    "PDTarget",
    "Policy",
    "PooledView",
    "RequestLike",
    "Target",
    "least_loaded",
]

#: Instance roles: ``mixed`` serves whole requests; under prefill/decode
#: disaggregation ``prefill`` instances produce the first token and hand the
#: KV cache to a ``decode`` instance, which produces the rest.
ROLES: tuple[str, ...] = ("mixed", "prefill", "decode")


@dataclass(frozen=True, slots=True)
class PDTarget:
    """A prefill/decode pair chosen at dispatch (SGLang's PD protocol; see the module doc).

    Attributes:
        prefill: the prefill instance id, or a pool name resolved at dispatch.
        decode: the decode instance id, or a pool name resolved at dispatch.
    """

    prefill: int | str
    decode: int | str


#: Where a dispatch sends a request: an instance id, a pool name, or (under
#: PD, decode chosen at dispatch) a :class:`PDTarget`.
Target = int | str | PDTarget


@runtime_checkable
class RequestLike(Protocol):
    """The request fields a policy may read.

    The simulator's in-flight request object has them, and so has the
    router's; a policy must not rely on anything else. There is no output
    length here on purpose: a router cannot know it before the request
    finishes. ``max_tokens`` is the output budget the client asked for
    (for a replayed trace, the trace's output length).
    """

    request_id: int
    arrival_s: float
    prompt_tokens: int
    max_tokens: int
    session_id: str | None
    prefix_hashes: Sequence[int] | None
    block_tokens: int | None
    slo_ttft_s: float | None
    slo_tpot_s: float | None


@dataclass(frozen=True, slots=True)
class BatchHint:
    """Dispatches ``[start, start + count)`` of one :class:`Decisions` form one graph batch.

    They must share one target (one prefill instance, for :class:`PDTarget`
    s; their decode instances may differ). The instance runs them as ONE prefill batch,
    alone, replayed as a CUDA graph captured for ``padded_batch`` sequences
    of ``padded_tokens`` new tokens each: every sequence is padded to
    ``padded_tokens`` and ``padded_batch - count`` empty sequences fill the
    batch, and the padding is computed (and paid) like real tokens. An
    instance that cannot run the shape (a sequence needs more new tokens
    than ``padded_tokens``, the batch does not fit its KV cache or request
    limit) runs the requests eagerly instead.

    Attributes:
        start: index of the first dispatch of the batch.
        count: dispatches in the batch (at least 1, at most ``padded_batch``).
        padded_tokens: new tokens of every sequence of the captured shape.
        padded_batch: sequences of the captured shape.
    """

    start: int
    count: int
    padded_tokens: int
    padded_batch: int


@dataclass(frozen=True, slots=True)
class Decisions:
    """A policy's answer to one event.

    Attributes:
        dispatches: ``(request, target)`` pairs to send now, in order; a
            target is an instance id, a pool name or a :class:`PDTarget`.
        wake_at_s: call :meth:`Policy.on_timer` at this time (on the
            driver's clock), or ``None``. A time not after ``now_s`` fires as
            soon as the current event is handled.
        batches: runs of ``dispatches`` to run as one CUDA-graph prefill
            batch each (:class:`BatchHint`); empty for plain dispatches.
    """

    dispatches: tuple[tuple[RequestLike, Target], ...] = ()
    wake_at_s: float | None = None
    batches: tuple[BatchHint, ...] = ()

    @classmethod
    def dispatch(
        cls, request: RequestLike, target: Target, *, wake_at_s: float | None = None
    ) -> Decisions:
        """Decisions sending one request to ``target``."""
        return cls(((request, target),), wake_at_s)


#: The empty answer (nothing to dispatch, no timer); shared, since it is immutable.
NO_DECISIONS = Decisions()


class InstanceView(ABC):
    """Read-only state of one serving instance, as a policy may see it.

    Each member says whether a router **knows** it (its own tracking or the
    server's static info: exact at the driver's current time) or
    **estimates** it (a gauge polled from the backend, late by the poll
    interval; or inferred from the router's own records). Policies should
    prefer known members for decisions that must stay right when gauges lag.
    """

    __slots__ = ()

    @property
    @abstractmethod
    def instance_id(self) -> int:
        """Index of the instance in the cluster (0-based). Known."""

    @property
    @abstractmethod
    def role(self) -> str:
        """One of :data:`ROLES`. Known (deployment configuration)."""

    @property
    @abstractmethod
    def healthy(self) -> bool:
        """Whether the instance accepts requests. Known (the router's health checks)."""

    @property
    @abstractmethod
    def n_waiting(self) -> int:
        """Requests queued on the instance, not yet admitted to a batch. Estimated (polled)."""

    @property
    @abstractmethod
    def waiting_tokens(self) -> int:
        """Prompt tokens of the waiting requests still to be prefilled. Estimated (polled)."""

    @property
    @abstractmethod
    def n_running(self) -> int:
        """Requests admitted to the batch (prefilling or decoding). Estimated (polled)."""

    @property
    def outstanding(self) -> int:
        """Requests sent to the instance and not finished (waiting plus running). Known.

        The router counts what it sent and has not seen finish. This default
        adds the two gauges, which is exact only where they are read live;
        a driver whose gauges are polled overrides it with its own count.
        """
        return self.n_waiting + self.n_running

    @property
    def pending_prompt_tokens(self) -> int:
        """Prompt tokens of the requests sent here with no first token yet. Known.

        The prefill work the instance may still owe, at most: requests queued
        there *and* the ones in their prefill, which :attr:`waiting_tokens`
        no longer counts (a 4,000-token prefill in progress looks like an
        empty queue there). Cached prefixes are included: a request's cached
        part is known only as an estimate, and looking it up on every send
        costs more than the bound is off by for the few milliseconds a cached
        prompt waits for its first token. The router counts it itself, from
        send to first token (or to the end of a request that never had one).
        This default is :attr:`waiting_tokens`, for drivers that do not count;
        the simulator's and the router's views override it.
        """
        return self.waiting_tokens

    @property
    @abstractmethod
    def inflight_tokens(self) -> int:
        """Prompt tokens plus output budget (``max_tokens``) of the unfinished requests. Known."""

    @property
    @abstractmethod
    def kv_used_tokens(self) -> int:
        """KV-cache tokens in use, cached prefix blocks included. Estimated (polled)."""

    @property
    @abstractmethod
    def kv_capacity_tokens(self) -> int:
        """KV-cache tokens the instance holds at most. Known (server info)."""

    @abstractmethod
    def cached_prefix_blocks(self, request: RequestLike) -> int:
        """Leading blocks of ``request.prefix_hashes`` the instance's cache holds.

        Estimated (inferred from the router's record of the prefixes it sent
        there, :class:`scheduler.prefix.PrefixRecord`); a simulator may
        answer exactly from the engine as an explicit oracle option.
        """

    def load_key(self) -> tuple[int, int, int]:
        """``(outstanding, inflight_tokens, instance_id)``: the order :func:`least_loaded` uses.

        Only known members, so the choice does not lag. Drivers may override
        it with a faster read of the same numbers.
        """
        return (self.outstanding, self.inflight_tokens, self.instance_id)


class ClusterView(ABC):
    """Read-only view of all instances and the named pools."""

    __slots__ = ()

    @property
    @abstractmethod
    def instances(self) -> Sequence[InstanceView]:
        """Every instance, indexed by id."""

    @abstractmethod
    def pool(self, name: str) -> Sequence[InstanceView]:
        """The instances of a pool.

        Raises:
            ValueError: unknown pool; the message lists the known ones.
        """

    @property
    @abstractmethod
    def pool_names(self) -> tuple[str, ...]:
        """Names :meth:`pool` accepts."""

    def instance(self, instance_id: int) -> InstanceView:
        """The instance with this id."""
        return self.instances[instance_id]


class PooledView(ClusterView):
    """A :class:`ClusterView` over a list of instances and a mapping of pool name to members.

    The simulator's and the router's views are both this; a driver fills
    ``_instances`` (indexed by id) and ``_pools`` and may change them as
    backends come and go.
    """

    __slots__ = ("_instances", "_pools")

    def __init__(
        self,
        instances: Sequence[InstanceView] = (),
        pools: Mapping[str, Sequence[InstanceView]] | None = None,
    ) -> None:
        self._instances = instances
        self._pools: dict[str, Sequence[InstanceView]] = dict(pools or {})

    @property
    def instances(self) -> Sequence[InstanceView]:
        return self._instances

    def pool(self, name: str) -> Sequence[InstanceView]:
        try:
            return self._pools[name]
        except KeyError:
            raise ValueError(
                f"unknown pool {name!r}; known pools: {', '.join(self._pools)}"
            ) from None

    @property
    def pool_names(self) -> tuple[str, ...]:
        return tuple(self._pools)


def least_loaded(instances: Sequence[InstanceView]) -> InstanceView | None:
    """The healthy instance with the fewest outstanding requests.

    Outstanding is :attr:`InstanceView.outstanding`; ties go to fewer in-flight tokens,
    then to the lower id, so the choice is deterministic. ``None`` when no
    instance is healthy.
    """
    healthy = [inst for inst in instances if inst.healthy]
    return min(healthy, key=_LOAD_KEY) if healthy else None


_LOAD_KEY = methodcaller("load_key")


class Policy(ABC):
    """A scheduling policy: decides where and when each request is served.

    Subclasses set :attr:`name` (the registry does it on ``@register``),
    implement :meth:`on_arrival`, and override the other hooks as needed.
    Policies do no I/O and read no clock: time comes in as ``now_s``.
    """

    #: The name users type (``fcfs``, ``laps``).
    name: ClassVar[str] = ""

    #: The frozen dataclass of the policy's parameters (a subclass of
    #: :class:`scheduler.registry.PolicyConfig`), or None for a policy with
    #: none or with plain keyword constructor parameters.
    #: :func:`scheduler.registry.create` checks parameters against it.
    config_class: ClassVar[type | None] = None

    #: Where the rule comes from (system and file, or paper), for the docs.
    source: ClassVar[str] = ""

    @abstractmethod
    def on_arrival(self, request: RequestLike, now_s: float, view: ClusterView) -> Decisions:
        """A request arrived: dispatch it now, or hold it and dispatch it later."""

    def on_progress(self, instance_id: int, now_s: float, view: ClusterView) -> Decisions:
        """An instance's set of requests changed (first token, finish, hand-off, preemption)."""
        return NO_DECISIONS

    def on_timer(self, now_s: float, view: ClusterView) -> Decisions:
        """A time requested through :attr:`Decisions.wake_at_s` has come."""
        return NO_DECISIONS

    def on_health(
        self, instance_id: int, healthy: bool, now_s: float, view: ClusterView
    ) -> Decisions:
        """The instance became healthy or unhealthy; ``view`` shows it already."""
        return NO_DECISIONS

    def select_decode_instance(
        self, request: RequestLike, prefill_instance_id: int, now_s: float, view: ClusterView
    ) -> int | None:
        """Under PD disaggregation, the decode instance for a prefilled request.

        Asked at hand-off, for requests dispatched to a plain target (not a
        :class:`PDTarget`). ``None`` (the default) lets the driver pick
        :func:`least_loaded` of the ``"decode"`` pool.
        """
        return None

    def queue_depths(self) -> dict[str, int]:
        """Requests the policy holds, per queue of its own (``{"short": 3, "long": 1}``).

        For a driver's metrics; a policy that holds nothing answers ``{}``.
        """
        return {}

    def reset(self) -> None:
        """Forget all state, as if newly built (before a new run). Stateless policies keep this."""
        return None
