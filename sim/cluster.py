"""A simulated cluster: engines with roles, named pools, and the policy's view of them.

Roles come from the instance count and the PD split: ``instances=4`` is four
``mixed`` instances; ``pd="1:3"`` is one ``prefill`` instance (id 0) and
three ``decode`` instances (ids 1-3). The views read the engines live; token
counts inside a stretch of decode steps are brought up to the driver's clock
first (:meth:`sim.engine.Engine.sync`), so a policy sees exactly what
stepping one iteration at a time would show.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from scheduler.cost_model import StepCost
from scheduler.policy import ClusterView, InstanceView, RequestLike
from sim.engine import Engine
from sim.limits import EngineLimits
from sim.records import LogHistogram
from traces.errors import ConfigError

__all__ = ["Cluster", "SimClusterView", "SimInstanceView", "cluster_roles", "parse_pd"]


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


class SimInstanceView(InstanceView):
    """Live read-only view of one engine."""

    __slots__ = ("_clock", "_engine")

    def __init__(self, engine: Engine, clock: Callable[[], float]) -> None:
        self._engine = engine
        self._clock = clock

    @property
    def instance_id(self) -> int:
        return self._engine.instance_id

    @property
    def role(self) -> str:
        return self._engine.role

    #: Simulated instances do not fail.
    healthy = True

    @property
    def n_waiting(self) -> int:
        """Queued requests, including ones whose KV cache is on its way here."""
        return len(self._engine.waiting) + self._engine.incoming

    @property
    def waiting_tokens(self) -> int:
        return self._engine.waiting_tokens

    @property
    def n_running(self) -> int:
        return len(self._engine.running)

    @property
    def inflight_tokens(self) -> int:
        return self._engine.inflight_tokens

    @property
    def kv_used_tokens(self) -> int:
        return self._engine.kv_used_tokens(self._clock())

    @property
    def kv_capacity_tokens(self) -> int:
        return self._engine.kv.capacity_tokens

    def cached_prefix_blocks(self, request: RequestLike) -> int:
        return self._engine.cached_prefix_blocks(request, self._clock())

    def load_key(self) -> tuple[int, int, int]:
        e = self._engine
        return (len(e.waiting) + e.incoming + len(e.running), e.inflight_tokens, e.instance_id)

    def __repr__(self) -> str:
        return (
            f"InstanceView(id={self.instance_id}, role={self.role}, "
            f"waiting={self.n_waiting}, running={self.n_running})"
        )


class SimClusterView(ClusterView):
    """Read-only view of a :class:`Cluster`."""

    __slots__ = ("_instances", "_pools")

    def __init__(
        self, instances: Sequence[SimInstanceView], pools: Mapping[str, Sequence[int]]
    ) -> None:
        self._instances = tuple(instances)
        self._pools = {name: tuple(self._instances[i] for i in ids) for name, ids in pools.items()}

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

    Raises:
        ConfigError: a pool names an unknown instance or shadows a built-in.
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
    ) -> None:
        if not roles:
            raise ConfigError("a cluster needs at least one instance")
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
        self.views = [SimInstanceView(e, clock) for e in self.engines]
        self.view = SimClusterView(self.views, builtin)

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(e.role for e in self.engines)
