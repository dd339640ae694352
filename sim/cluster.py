"""A simulated cluster: engines with roles, named pools, and the policy's view of them.

Roles come from the instance count and the PD split: ``instances=4`` is four
``mixed`` instances; ``pd="1:3"`` is one ``prefill`` instance (id 0) and
three ``decode`` instances (ids 1-3).

What the views show is what a router could know (:mod:`scheduler.policy`):

* **Known, exact:** ``outstanding`` (requests dispatched and not finished:
  waiting, KV on its way, running; a router counts what it sent and has
  not seen finish), ``inflight_tokens``, role, health, KV capacity.
* **Polled gauges** (``n_waiting``, ``n_running``, ``waiting_tokens``,
  ``kv_used_tokens``): read live with ``poll_interval_s=0`` (the default);
  otherwise as the live router reads them (:mod:`scheduler.router.live`):
  the values of the last :meth:`Cluster.poll` (which the driver calls every
  ``poll_interval_s``, as a router polling ``/metrics`` or ``/v1/loads``),
  brought up to date with what was dispatched since: ``n_waiting`` is the
  polled queue plus the requests sent since the poll, but never more than
  the requests sent there that have no first token yet (a router sees
  first tokens as they pass); ``waiting_tokens`` likewise in prompt tokens;
  ``n_running`` at most ``outstanding``. Before the first poll they read as
  if the poll had found the engines empty.
* **Prefix cache:** with ``prefix_knowledge="estimate"`` (the default),
  ``cached_prefix_blocks`` answers from a :class:`scheduler.prefix.PrefixRecord`
  the cluster keeps of the prompts dispatched to each instance
  (:meth:`Cluster.note_dispatch`), sized from the instance's KV capacity;
  with ``"oracle"`` it reads the engine's exact cache, an explicit
  research option no router has.

Live reads inside a stretch of decode steps are brought up to the driver's
clock first (:meth:`sim.engine.Engine.sync`), so a policy sees exactly what
stepping one iteration at a time would show.

Health: :meth:`Cluster.set_healthy` marks an instance unhealthy for the
policies (its view says so; its prefix record is forgotten, since a router
cannot tell a blip from a restart with an empty cache). The engine itself
keeps running what it holds; refusing new dispatches is the driver's part.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

from scheduler.cost_model import StepCost
from scheduler.policy import InstanceView, PooledView, RequestLike
from scheduler.prefix import PrefixRecord
from sim.engine import Engine
from sim.inflight import SimRequest
from sim.kv import block_keys
from sim.limits import EngineLimits
from sim.records import LogHistogram
from traces.errors import ConfigError

__all__ = [
    "PREFIX_KNOWLEDGE",
    "Cluster",
    "PrefixKnowledge",
    "SimClusterView",
    "SimInstanceView",
    "cluster_roles",
    "engine_keys",
    "parse_pd",
]

#: Where views' ``cached_prefix_blocks`` come from: the cluster's router-side
#: record (``estimate``) or the engine's exact cache (``oracle``).
PrefixKnowledge = Literal["estimate", "oracle"]
PREFIX_KNOWLEDGE: tuple[str, ...] = ("estimate", "oracle")

#: The polled gauges of one instance: (n_waiting, n_running, waiting_tokens, kv_used_tokens).
_Gauges = tuple[int, int, int, int]
_NOTHING_POLLED: _Gauges = (0, 0, 0, 0)


def parse_pd(pd: str) -> tuple[int, int]:
    """Parse a ``P:D`` prefill/decode split (``"1:3"``).

    Raises:
        ConfigError: not two positive integers separated by a colon.
    """
    parts = pd.split(":")
    try:
        p, d = (int(x) for x in parts)
    except ValueError:
        raise ConfigError(f"pd: expected P:D with two positive integers; got {pd!r}") from None
    if p < 1 or d < 1:
        raise ConfigError(f"pd: expected P:D with two positive integers; got {pd!r}")
    return p, d


def cluster_roles(instances: int, pd: str | None = None) -> tuple[str, ...]:
    """Instance roles in id order.

    Without ``pd``: ``instances`` mixed instances. With ``pd="P:D"``:
    P prefill then D decode instances; ``instances`` must be P + D (or 0 to
    take it from the split).

    Raises:
        ConfigError: the counts disagree or are not positive.
    """
    if pd is None:
        if instances < 1:
            raise ConfigError(f"instances: expected an integer >= 1; got {instances!r}")
        return ("mixed",) * instances
    p, d = parse_pd(pd)
    if instances not in (0, p + d):
        raise ConfigError(f"instances: --pd {pd} needs {p + d} instances; got {instances}")
    return ("prefill",) * p + ("decode",) * d


def engine_keys(request: RequestLike) -> list[int] | None:
    """The prompt's block keys as the engine's cache has them, computed once per request.

    They are :func:`scheduler.prefix.prompt_block_keys` too (``hash << 32 |
    size``), so the router-side record and the engine share them. None for a
    request that is not the simulator's, or has no ``block_tokens`` (the
    record then sizes blocks itself).
    """
    if not isinstance(request, SimRequest):
        return None
    keys = request.keys
    if keys is None:
        hashes = request.prefix_hashes
        if hashes is None or len(hashes) == 0:
            return _NO_KEYS
        if not request.block_tokens:
            return None
        keys = request.keys = block_keys(hashes, request.prompt_tokens, request.block_tokens)
    return keys


_NO_KEYS: list[int] = []


class SimInstanceView(InstanceView):
    """Read-only view of one engine, as a router would see it (see the module doc).

    Args:
        engine: the instance.
        clock: the driver's current time.
        prefix: the router-side record ``cached_prefix_blocks`` answers
            from; None: the engine's exact cache (the oracle).
    """

    __slots__ = (
        "_clock",
        "_engine",
        "_gauges",
        "_prefix",
        "healthy",
        "sent_since_poll",
        "sent_tokens_since_poll",
        "unfirst",
        "unfirst_tokens",
    )

    def __init__(
        self, engine: Engine, clock: Callable[[], float], prefix: PrefixRecord | None = None
    ) -> None:
        self._engine = engine
        self._clock = clock
        self._prefix = prefix
        #: The last poll's gauges, or None to read them live.
        self._gauges: _Gauges | None = None
        #: Whether policies may send it requests (:meth:`Cluster.set_healthy`).
        self.healthy = True
        # What a router knows: requests dispatched here with no first token yet
        # (kept always), and those since the poll (read only when gauges are polled).
        self.unfirst = self.unfirst_tokens = 0
        self.sent_since_poll = self.sent_tokens_since_poll = 0

    @property
    def instance_id(self) -> int:
        return self._engine.instance_id

    @property
    def role(self) -> str:
        return self._engine.role

    @property
    def n_waiting(self) -> int:
        """Queued requests, including ones whose KV cache is on its way here."""
        g = self._gauges
        if g is not None:
            return min(g[0] + self.sent_since_poll, self.unfirst)
        return len(self._engine.waiting) + self._engine.incoming

    @property
    def waiting_tokens(self) -> int:
        g = self._gauges
        if g is None:
            return self._engine.waiting_tokens
        return min(g[2] + self.sent_tokens_since_poll, self.unfirst_tokens)

    @property
    def n_running(self) -> int:
        g = self._gauges
        return len(self._engine.running) if g is None else min(g[1], self.outstanding)

    @property
    def outstanding(self) -> int:
        """Dispatched and not finished: waiting, KV on its way, running."""
        e = self._engine
        return len(e.waiting) + e.incoming + len(e.running)

    @property
    def pending_prompt_tokens(self) -> int:
        return self.unfirst_tokens

    @property
    def inflight_tokens(self) -> int:
        return self._engine.inflight_tokens

    @property
    def kv_used_tokens(self) -> int:
        g = self._gauges
        return self._engine.kv_used_tokens(self._clock()) if g is None else g[3]

    @property
    def kv_capacity_tokens(self) -> int:
        return self._engine.kv.capacity_tokens

    def cached_prefix_blocks(self, request: RequestLike) -> int:
        p = self._prefix
        if p is None:
            return self._engine.cached_prefix_blocks(request, self._clock())
        keys = engine_keys(request)
        if keys is None:
            return p.cached_blocks(self._engine.instance_id, request)
        return p.cached_keys(self._engine.instance_id, keys)

    def note_sent(self, prompt_tokens: int) -> None:
        """A request was dispatched here."""
        self.unfirst += 1
        self.unfirst_tokens += prompt_tokens
        self.sent_since_poll += 1
        self.sent_tokens_since_poll += prompt_tokens

    def note_first(self, prompt_tokens: int) -> None:
        """A request dispatched here produced its first token, or left."""
        self.unfirst -= 1
        self.unfirst_tokens -= prompt_tokens

    def polled(self) -> tuple[int, int, int]:
        """``(n_waiting, waiting_tokens, n_running)`` as the policy reads them now."""
        return (self.n_waiting, self.waiting_tokens, self.n_running)

    def live_gauges(self) -> _Gauges:
        """The engine's gauges now, as a poll would read them."""
        e = self._engine
        return (
            len(e.waiting) + e.incoming,
            len(e.running),
            e.waiting_tokens,
            e.kv_used_tokens(self._clock()),
        )

    def load_key(self) -> tuple[int, int, int]:
        e = self._engine
        return (len(e.waiting) + e.incoming + len(e.running), e.inflight_tokens, e.instance_id)

    def __repr__(self) -> str:
        return (
            f"InstanceView(id={self.instance_id}, role={self.role}, "
            f"waiting={self.n_waiting}, running={self.n_running})"
        )


class SimClusterView(PooledView):
    """Read-only view of a :class:`Cluster`."""

    __slots__ = ()

    def __init__(
        self, instances: Sequence[SimInstanceView], pools: Mapping[str, Sequence[int]]
    ) -> None:
        members = tuple(instances)
        super().__init__(
            members, {name: tuple(members[i] for i in ids) for name, ids in pools.items()}
        )


class Cluster:
    """The engines of one simulation and the view policies get of them.

    Args:
        cost: step durations (the same for every instance).
        limits: engine limits (the same for every instance).
        roles: one role per instance (:func:`cluster_roles`).
        clock: the driver's current time, for views.
        pools: extra named pools (name -> instance ids), beside the built-in
            ``entry``, ``all`` and per-role ones.
        fast_forward, debug: passed to every :class:`Engine`.
        prefix_knowledge: ``"estimate"`` (views answer cached prefixes from
            the cluster's router-side record) or ``"oracle"`` (from the
            engines' exact caches).
        poll_interval_s: seconds between polls of the gauges (the driver
            calls :meth:`poll`); 0 reads them live.

    Raises:
        ConfigError: a pool names an unknown instance or shadows a built-in;
            an unknown ``prefix_knowledge``; a negative ``poll_interval_s``.
    """

    def __init__(
        self,
        cost: StepCost,
        limits: EngineLimits,
        roles: Sequence[str],
        clock: Callable[[], float],
        *,
        pools: Mapping[str, Sequence[int]] | None = None,
        fast_forward: bool = True,
        debug: bool = False,
        prefix_knowledge: PrefixKnowledge = "estimate",
        poll_interval_s: float = 0.0,
    ) -> None:
        if not roles:
            raise ConfigError("a cluster needs at least one instance")
        if prefix_knowledge not in PREFIX_KNOWLEDGE:
            raise ConfigError(
                f"prefix_knowledge: expected one of {', '.join(PREFIX_KNOWLEDGE)}; "
                f"got {prefix_knowledge!r}"
            )
        if not poll_interval_s >= 0.0:
            raise ConfigError(f"poll_interval_s: expected a number >= 0; got {poll_interval_s!r}")
        has_prefill, has_decode = "prefill" in roles, "decode" in roles
        if has_prefill != has_decode or (has_prefill and "mixed" in roles):
            raise ConfigError(
                f"roles: PD needs prefill and decode instances and no mixed ones; got {list(roles)}"
            )
        self.itl = LogHistogram()
        self.engines = [
            Engine(
                cost,
                limits,
                instance_id=i,
                role=role,
                itl=self.itl,
                fast_forward=fast_forward,
                debug=debug,
            )
            for i, role in enumerate(roles)
        ]
        n = len(roles)
        builtin: dict[str, tuple[int, ...]] = {
            "entry": tuple(i for i, r in enumerate(roles) if r != "decode"),
            "all": tuple(range(n)),
        }
        for role in ("mixed", "prefill", "decode"):
            builtin[role] = tuple(i for i, r in enumerate(roles) if r == role)
        for name, ids in (pools or {}).items():
            if name in builtin:
                raise ConfigError(f"pools: {name!r} is a built-in pool name")
            bad = [i for i in ids if not 0 <= i < n]
            if bad or not ids:
                raise ConfigError(f"pools: {name!r} names unknown instances {bad or '(none)'}")
            builtin[name] = tuple(ids)
        self.pools = builtin
        self.pd = has_prefill
        self.prefix_knowledge: PrefixKnowledge = prefix_knowledge
        self.poll_interval_s = float(poll_interval_s)
        #: The router-side prefix record views answer from (None under the oracle).
        self.prefix: PrefixRecord | None = None
        if prefix_knowledge == "estimate":
            self.prefix = PrefixRecord()
            for e in self.engines:
                self.prefix.set_capacity(e.instance_id, e.kv.capacity_tokens)
        self.views = [SimInstanceView(e, clock, self.prefix) for e in self.engines]
        if self.poll_interval_s > 0.0:
            for v in self.views:
                v._gauges = _NOTHING_POLLED
        self.view = SimClusterView(self.views, builtin)

    def note_dispatch(self, instance_id: int, request: RequestLike, now_s: float) -> None:
        """A request was dispatched to the instance: count it as sent (with no first token
        yet, and since the poll), and record its prompt's blocks (estimate)."""
        self.views[instance_id].note_sent(request.prompt_tokens)
        p = self.prefix
        if p is not None:
            keys = engine_keys(request)
            if keys is None:
                p.record(instance_id, request)
            else:
                p.record_keys(instance_id, keys)

    def poll(self, now_s: float) -> float | None:
        """Take the polled gauges of every instance as of ``now_s``; the next poll's time.

        With ``poll_interval_s=0`` the views read live: nothing to take,
        and None (no poll to schedule).
        """
        if self.poll_interval_s <= 0.0:
            return None
        for v in self.views:
            v._gauges = v.live_gauges()
            v.sent_since_poll = v.sent_tokens_since_poll = 0
        return now_s + self.poll_interval_s

    def set_healthy(self, instance_id: int, healthy: bool) -> None:
        """Mark an instance healthy or not, for the policies (see the module doc)."""
        self.views[instance_id].healthy = healthy
        if not healthy and self.prefix is not None:
            self.prefix.forget(instance_id)

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(e.role for e in self.engines)
