"""``bucket``: the SGLang router's length buckets, one range of prompt lengths per instance.

Reimplemented from sgl-model-gateway/src/policies/bucket.rs, in prompt tokens
where the gateway counts characters:

* Boundaries: instance ``k`` of the pool (in pool order) serves prompts whose
  length falls in ``[lo_k, hi_k]``; the last range is open above. At start the
  range ``[0, initial_max_tokens)`` is cut into equal parts.
* Load: the prompt tokens each instance was sent in the last
  ``adjust_interval_s``. If ``max - min > balance_abs_threshold_tokens`` and
  ``max > balance_rel_threshold * min`` the arrival goes to the instance with
  the least such load (ties: lower id); otherwise to its length's bucket.
* Every ``adjust_interval_s``, if the load per instance (window total /
  instances) has changed more than twofold since the boundaries were last
  set (or they never were), the boundaries are recut from the window's
  lengths: walking them in increasing order, each instance but the last
  takes lengths until their sum reaches the per-instance load, and its range
  ends at the length that reached it (or, when that length is not above the
  range's start, or the lengths ran out, ``per-instance load`` past the start).

Differences, each a choice for a clock-agnostic core: the adjustment runs at
the first choice after its due time (boundaries only matter at a choice),
on the window as of the due time; the window is trimmed before each choice,
not after; loads and the imbalance test cover healthy instances only; a
bucket whose instance is unhealthy sends its arrivals to the least-loaded
healthy instance; a change in the pool's membership restarts from the
initial boundaries.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from scheduler.params import PolicyConfig, param
from scheduler.policy import ClusterView, InstanceView, RequestLike
from scheduler.registry import register
from scheduler.routing import RoutingPolicy, healthy_instances

__all__ = ["BucketConfig", "BucketPolicy"]

_SRC = "sgl-model-gateway/src/policies/mod.rs, BucketConfig defaults"


@dataclass(frozen=True)
class BucketConfig(PolicyConfig):
    """Parameters of ``bucket``; the defaults are the gateway's (characters read as tokens)."""

    balance_abs_threshold_tokens: int = param(
        32,
        help="Imbalanced only if, over the window, the busiest instance was sent more than "
        "this many prompt tokens over the idlest ...",
        source=_SRC,
        ge=0,
    )
    balance_rel_threshold: float = param(
        1.0001,
        help="... and more than this many times as many; then the least loaded is taken.",
        source=_SRC,
        unit="ratio",
        ge=0.0,
    )
    adjust_interval_s: float = param(
        5.0,
        help="Period of the boundary adjustment, and the span of the load window.",
        source=_SRC + " (bucket_adjust_interval_secs)",
        gt=0.0,
    )
    initial_max_tokens: int = param(
        4096,
        help="The initial boundaries cut [0, this) into equal ranges, one per instance.",
        source="sgl-model-gateway/src/policies/bucket.rs (l_max)",
        gt=0,
    )


@register("bucket")
class BucketPolicy(RoutingPolicy):
    """Each instance serves a range of prompt lengths, recut periodically from recent lengths."""

    config_class = BucketConfig
    source = "sgl-model-gateway/src/policies/bucket.rs"
    config: BucketConfig

    def __init__(self, config: BucketConfig | None = None, /, **params: object) -> None:
        super().__init__(config, **params)
        self._clear()

    def _clear(self) -> None:
        self._ids: tuple[int, ...] = ()
        #: Inclusive upper bound of each instance's range (the last is math.inf).
        self._upper: list[float] = []
        #: (time_s, prompt tokens, pool position) of the arrivals in the window.
        self._window: deque[tuple[float, int, int]] = deque()
        self._load: list[int] = []
        self._total = 0
        self._bucket_load = 0
        self._next_adjust_s: float | None = None

    @property
    def boundaries(self) -> list[tuple[int, float]]:
        """``(lo, hi)`` inclusive length range of each pool position; the last ``hi`` is inf."""
        highs = [*(int(u) for u in self._upper[:-1]), math.inf]
        return list(zip([0] + [h + 1 for h in highs[:-1]], highs, strict=True))

    def reset(self) -> None:
        super().reset()
        self._clear()

    def choose(
        self,
        request: RequestLike,
        candidates: Sequence[InstanceView],
        view: ClusterView,
        now_s: float,
    ) -> InstanceView | None:
        healthy = healthy_instances(candidates)
        if not healthy:
            return None
        ids = tuple(inst.instance_id for inst in candidates)
        if ids != self._ids:
            self._start(ids, now_s)
        self._catch_up(now_s)
        self._trim(now_s)
        pos_of = {iid: k for k, iid in enumerate(ids)}
        loads = [self._load[pos_of[inst.instance_id]] for inst in healthy]
        cfg = self.config
        lo, hi = min(loads), max(loads)
        length = request.prompt_tokens
        least = min(zip(loads, healthy, strict=True), key=lambda p: (p[0], p[1].instance_id))[1]
        if hi - lo > cfg.balance_abs_threshold_tokens and hi > cfg.balance_rel_threshold * lo:
            target = least
        else:
            target = candidates[self._bucket_of(length)]
            if not target.healthy:
                target = least
        pos = pos_of[target.instance_id]
        self._load[pos] += length
        self._total += length
        self._window.append((now_s, length, pos))
        return target

    # -- state ------------------------------------------------------------------------

    def _start(self, ids: tuple[int, ...], now_s: float) -> None:
        self._clear()
        n = len(ids)
        self._ids = ids
        gap = self.config.initial_max_tokens // n
        self._upper = [float((k + 1) * gap - 1) for k in range(n - 1)] + [math.inf]
        self._load = [0] * n
        self._next_adjust_s = now_s + self.config.adjust_interval_s

    def _bucket_of(self, length: int) -> int:
        for pos, upper in enumerate(self._upper):
            if length <= upper:
                return pos
        return len(self._upper) - 1

    def _trim(self, now_s: float) -> None:
        """Drop arrivals older than the window from the loads."""
        horizon = now_s - self.config.adjust_interval_s
        window = self._window
        while window and window[0][0] < horizon:
            _, length, pos = window.popleft()
            self._load[pos] -= length
            self._total -= length

    def _catch_up(self, now_s: float) -> None:
        """Run the adjustments due by ``now_s``, each on the window as of its due time."""
        interval = self.config.adjust_interval_s
        while self._next_adjust_s is not None and self._next_adjust_s <= now_s:
            due = self._next_adjust_s
            self._trim(due)
            self._adjust()
            if not self._window:  # nothing changes until the next arrival: skip ahead
                skipped = math.floor((now_s - due) / interval)
                due += skipped * interval
            self._next_adjust_s = due + interval

    def _adjust(self) -> None:
        if not self._window:
            return
        n = len(self._ids)
        per_instance = self._total // n
        old = self._bucket_load
        if old != 0 and per_instance <= 2 * old and old <= 2 * per_instance:
            return  # within a factor of two of the last cut: keep the boundaries
        self._bucket_load = per_instance
        lengths = sorted(length for _, length, _ in self._window)
        upper: list[float] = []
        start, k = 0, 0
        for _ in range(n - 1):
            acc, end = 0, None
            while k < len(lengths):
                acc += lengths[k]
                k += 1
                if acc >= per_instance:
                    length = lengths[k - 1]
                    end = length if length > start else start + per_instance
                    break
            if end is None:
                end = start + per_instance
            upper.append(float(end))
            start = end + 1
        self._upper = [*upper, math.inf]
