"""LAPS spatial disaggregation: entry instances split into a short and a long pool.

:class:`PoolSplit` places each arrival and moves instances between the
pools as queue pressure shifts:

* **Placement.** A request is short if some short-pool instance would
  prefill at most the threshold of it (uncached tokens on *that* instance,
  so a conversation's cached history counts); it then goes to the short
  instance that classifies it short with the least backlog plus its own
  uncached tokens, else to the long instance with the least of that (ties:
  fewer requests on it, then the lower id). Backlog is the instance's
  queued prefill tokens plus what the policy holds for it: what a new
  request's prefill waits for.
* **Pressure.** A pool's pressure is its outstanding requests per
  instance (waiting, running, and held by the policy). On a mixed
  instance the decode batch is much of the load, and queued prefill
  tokens alone would call a pool of many cheap requests idle: on the chat
  workload under overload, a token measure moved every instance but one
  into the long pool and left that one decoding 2,000 requests at once.
* **Rebalancing.** The first period only observes (caches start cold, so
  early requests all look long); then at most one instance moves per
  ``period_s`` (the cool-down), and only when the busier pool's pressure
  is above ``ratio`` times the other's *and* above it by ``min_requests``
  (hysteresis: both, so neither small absolute swings nor ratios of
  near-empty instances move one). The donor pool keeps at least one
  instance; its least loaded instance moves.
* **Draining.** A moving instance takes no new requests of its old pool at
  once, and joins the new pool when its queue has drained (nothing waiting
  on it, nothing held for it). Requests already admitted there (prefilling
  or decoding) finish there: nothing is migrated.
* **Failure and change.** Placement skips unhealthy instances; a request
  whose pool has no healthy instance goes to the other pool (as long, so at
  once), so one healthy instance anywhere serves everything. An instance
  that joins takes the pool the initial share gives it (:meth:`PoolSplit.add`);
  one that leaves is dropped (:meth:`PoolSplit.remove`). A pool left empty
  while the other has two or more instances gets one back at the next
  rebalance, without the cool-down or hysteresis.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from scheduler.length import LengthClassifier
from scheduler.policy import ClusterView, InstanceView, RequestLike
from traces.errors import ConfigError

__all__ = ["Placement", "PoolSplit"]

#: ``(instance id, short, uncached tokens, cached tokens)``.
Placement = tuple[int, bool, int, int]


class PoolSplit:
    """Short and long pools over the entry instances ``ids`` (see the module doc).

    Args:
        ids: entry instance ids (at least two).
        short_share: share of them in the short pool at first (at least one each).
        period_s, ratio, min_requests: rebalancing cool-down and hysteresis.

    Raises:
        ConfigError: fewer than two instances.
    """

    def __init__(
        self,
        ids: Sequence[int],
        short_share: float,
        period_s: float,
        ratio: float,
        min_requests: int,
    ) -> None:
        ids = sorted(ids)
        if len(ids) < 2:
            raise ConfigError(f"spatial mode needs at least 2 entry instances; got {len(ids)}")
        n_short = min(len(ids) - 1, max(1, round(len(ids) * short_share)))
        #: Pool of each instance: True for short.
        self.is_short: dict[int, bool] = {i: k < n_short for k, i in enumerate(ids)}
        #: Instances moving, to the pool they join once drained (True: short).
        self.draining: dict[int, bool] = {}
        self.short_share = short_share
        self.period_s, self.ratio, self.min_requests = period_s, ratio, min_requests
        self.last_move_s = -math.inf
        #: ``(time, instance, to_short)`` for every move completed, in order.
        self.moves: list[tuple[float, int, bool]] = []

    def members(self, short: bool) -> list[int]:
        """Instances taking new requests of the pool (draining ones excluded)."""
        return [i for i, s in self.is_short.items() if s == short and i not in self.draining]

    def place(
        self,
        request: RequestLike,
        view: ClusterView,
        classifier: LengthClassifier,
        backlog: Callable[[InstanceView], int],
    ) -> Placement | None:
        """Where ``request`` goes and how it was classified; None when no instance is healthy."""
        best: tuple[int, int, int] | None = None
        placement: Placement | None = None
        for i in self.members(True):
            inst = view.instance(i)
            if not inst.healthy:
                continue
            short, unc, cached = classifier.classify(request, inst)
            key = (backlog(inst) + unc, inst.outstanding, i)
            if short and (best is None or key < best):
                best, placement = key, (i, True, unc, cached)
        if placement is not None:
            return placement
        placement = self._least_backlog(request, view, classifier, backlog, self.members(False))
        if placement is None:  # no healthy long instance: the short pool takes it
            placement = self._least_backlog(request, view, classifier, backlog, self.members(True))
        return placement

    @staticmethod
    def _least_backlog(
        request: RequestLike,
        view: ClusterView,
        classifier: LengthClassifier,
        backlog: Callable[[InstanceView], int],
        ids: list[int],
    ) -> Placement | None:
        """The healthy instance of ``ids`` with the least backlog after taking ``request``, as long."""
        best: tuple[int, int, int] | None = None
        placement: Placement | None = None
        for i in ids:
            inst = view.instance(i)
            if not inst.healthy:
                continue
            unc, cached = classifier.uncached_tokens(request, inst)
            key = (backlog(inst) + unc, inst.outstanding, i)
            if best is None or key < best:
                best, placement = key, (i, False, unc, cached)
        return placement

    def add(self, instance_id: int) -> bool:
        """Take a joining instance into the pool the initial share gives it; True if short."""
        n = len(self.is_short) + 1
        n_short = min(n - 1, max(1, round(n * self.short_share)))
        short = sum(self.is_short.values()) < n_short
        self.is_short[instance_id] = short
        return short

    def remove(self, instance_id: int) -> None:
        """Drop an instance that left (a move it was making is dropped too)."""
        self.is_short.pop(instance_id, None)
        self.draining.pop(instance_id, None)

    def pressure(
        self, view: ClusterView, short: bool, load: Callable[[InstanceView], int]
    ) -> float:
        """Outstanding requests per instance of a pool (``load`` counts one instance's)."""
        ids = self.members(short)
        return sum(load(view.instance(i)) for i in ids) / len(ids) if ids else 0.0

    def rebalance(
        self, now_s: float, view: ClusterView, load: Callable[[InstanceView], int]
    ) -> int | None:
        """Start moving one instance if the pressures call for it; its id, or None."""
        if self.last_move_s == -math.inf:
            self.last_move_s = now_s  # the first period observes: caches start cold
        if self.draining:
            return None
        refill = self._refill(view, load)
        if refill is not None:
            return refill
        if now_s - self.last_move_s < self.period_s:
            return None
        p_short = self.pressure(view, True, load)
        p_long = self.pressure(view, False, load)
        hi, lo = max(p_short, p_long), min(p_short, p_long)
        if hi - lo <= self.min_requests or hi <= self.ratio * lo:
            return None
        to_short = p_short > p_long
        donors = self.members(not to_short)
        if len(donors) < 2:
            return None
        mover = min(donors, key=lambda i: (load(view.instance(i)), i))
        self.draining[mover] = to_short
        self.last_move_s = now_s
        return mover

    def _refill(self, view: ClusterView, load: Callable[[InstanceView], int]) -> int | None:
        """Start moving one instance into an empty pool (instances left); its id, or None."""
        short, long_ = self.members(True), self.members(False)
        if short and long_:
            return None
        donors = short or long_
        if len(donors) < 2:
            return None
        mover = min(donors, key=lambda i: (load(view.instance(i)), i))
        self.draining[mover] = not short
        return mover

    def settle(self, now_s: float, view: ClusterView, held: Callable[[int], int]) -> None:
        """Complete the moves of drained instances (``held(i)``: requests the policy holds for i)."""
        if not self.draining:
            return
        for i, to_short in list(self.draining.items()):
            if view.instance(i).n_waiting == 0 and held(i) == 0:
                del self.draining[i]
                self.is_short[i] = to_short
                self.moves.append((now_s, i, to_short))
