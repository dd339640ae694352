"""The policy hook: what a scheduling policy sees and what it may decide.

A policy is a small state machine fed three kinds of events, each with the
driver's clock reading ``now_s``:

* ``on_arrival(request, now_s, view)``: a request reached the router;
* ``on_progress(instance_id, now_s, view)``: an instance finished a step that
  changed its set of requests (a first token, a finish, a hand-off to a
  decode instance, a preemption);
* ``on_timer(now_s, view)``: a time the policy asked for has come.

Each answers with :class:`Decisions`: requests to dispatch now, each to an
instance id or a pool name, and optionally a time to be woken at. A policy
may hold requests in its own queues and release them from any later event.

Instances are seen only through the read-only :class:`ClusterView` and
:class:`InstanceView`, which the simulator and the live router both
implement. Nothing here knows whether time is simulated.

Pools: a dispatch target that is a string names a pool, and the driver picks
the instance in it with :func:`least_loaded`. Every cluster has the pools
``"entry"`` (instances that accept new requests: roles ``mixed`` and
``prefill``), ``"all"``, and one per role (``"mixed"``, ``"prefill"``,
``"decode"``); a deployment may define more (``"short"``, ``"long"``).

Prefill/decode disaggregation: the policy chooses the prefill instance (its
dispatch target); the decode instance is chosen when the prefill finishes,
by :meth:`Policy.select_decode_instance` when the policy overrides it, and
otherwise by :func:`least_loaded` over the ``"decode"`` pool.

Batch hints: :attr:`Decisions.batches` may mark a run of consecutive
dispatches, all to one target, as one prefill batch of a padded CUDA-graph
shape (:class:`BatchHint`). A driver that can honour it runs them as that
one batch; one that cannot ignores it. Without hints nothing changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
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
    "Policy",
    "RequestLike",
    "Target",
    "least_loaded",
]

#: Instance roles: ``mixed`` serves whole requests; under prefill/decode
#: disaggregation ``prefill`` instances produce the first token and hand the
#: KV cache to a ``decode`` instance, which produces the rest.
ROLES: tuple[str, ...] = ("mixed", "prefill", "decode")

#: Where a dispatch sends a request: an instance id, or a pool name.
Target = int | str


@runtime_checkable
class RequestLike(Protocol):
    """The request fields a policy may read.

    :class:`traces.Request` has them, and so has the simulator's in-flight
    request object; a policy must not rely on anything else.
    """

    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    session_id: str | None
    prefix_hashes: Sequence[int] | None
    block_tokens: int | None
    slo_ttft_s: float | None
    slo_tpot_s: float | None


@dataclass(frozen=True, slots=True)
class BatchHint:
    """Dispatches ``[start, start + count)`` of one :class:`Decisions` form one graph batch.

    They must share one target. The instance runs them as ONE prefill batch,
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
            target is an instance id or a pool name.
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

    Token counts are as of the driver's current time.
    """

    __slots__ = ()

    @property
    @abstractmethod
    def instance_id(self) -> int:
        """Index of the instance in the cluster (0-based)."""

    @property
    @abstractmethod
    def role(self) -> str:
        """One of :data:`ROLES`."""

    @property
    @abstractmethod
    def healthy(self) -> bool:
        """Whether the instance accepts requests."""

    @property
    @abstractmethod
    def n_waiting(self) -> int:
        """Requests queued on the instance, not yet admitted to a batch."""

    @property
    @abstractmethod
    def waiting_tokens(self) -> int:
        """Prompt tokens of the waiting requests still to be prefilled."""

    @property
    @abstractmethod
    def n_running(self) -> int:
        """Requests admitted to the batch (prefilling or decoding)."""

    @property
    @abstractmethod
    def inflight_tokens(self) -> int:
        """Prompt plus output tokens of every request on the instance, not yet finished."""

    @property
    @abstractmethod
    def kv_used_tokens(self) -> int:
        """KV-cache tokens in use, cached prefix blocks included."""

    @property
    @abstractmethod
    def kv_capacity_tokens(self) -> int:
        """KV-cache tokens the instance holds at most."""

    @abstractmethod
    def cached_prefix_blocks(self, request: RequestLike) -> int:
        """How many leading blocks of ``request.prefix_hashes`` the instance's cache holds."""

    def load_key(self) -> tuple[int, int, int]:
        """``(outstanding requests, in-flight tokens, id)``: the order :func:`least_loaded` uses.

        Drivers may override it with a faster read of the same numbers.
        """
        return (self.n_waiting + self.n_running, self.inflight_tokens, self.instance_id)


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


def least_loaded(instances: Sequence[InstanceView]) -> InstanceView | None:
    """The healthy instance with the fewest outstanding requests.

    Outstanding means waiting plus running; ties go to fewer in-flight tokens,
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

    def select_decode_instance(
        self, request: RequestLike, prefill_instance_id: int, now_s: float, view: ClusterView
    ) -> int | None:
        """Under PD disaggregation, the decode instance for a prefilled request.

        ``None`` (the default) lets the driver pick :func:`least_loaded` of
        the ``"decode"`` pool.
        """
        return None

    def reset(self) -> None:
        """Forget all state, as if newly built (before a new run). Stateless policies keep this."""
        return None
