"""``round_robin``: vanilla data parallelism, arrivals to the instances in turn.

Instances of the pool take arrivals in id order, cyclically, as SGLang's
data-parallel controller does (``round_robin_scheduler`` in
python/sglang/srt/managers/data_parallel_controller.py) and the gateway's
``round_robin`` policy (sgl-model-gateway/src/policies/round_robin.rs). An
unhealthy instance is skipped and the turn passes to the next healthy one,
so the others keep their order.
"""

from __future__ import annotations

from collections.abc import Sequence

from scheduler.policy import ClusterView, InstanceView, RequestLike
from scheduler.registry import register
from scheduler.routing import RoutingPolicy

__all__ = ["RoundRobinPolicy"]


@register("round_robin")
class RoundRobinPolicy(RoutingPolicy):
    """Cycle through the instances in id order, one arrival each, skipping unhealthy ones."""

    source = (
        "SGLang data-parallel controller (python/sglang/srt/managers/"
        "data_parallel_controller.py, round_robin); sgl-model-gateway/src/policies/round_robin.rs"
    )

    def __init__(self, config: None = None, /, **params: object) -> None:
        super().__init__(config, **params)
        self._next = 0

    def choose(
        self,
        request: RequestLike,
        candidates: Sequence[InstanceView],
        view: ClusterView,
        now_s: float,
    ) -> InstanceView | None:
        n = len(candidates)
        for offset in range(n):
            pos = (self._next + offset) % n
            inst = candidates[pos]
            if inst.healthy:
                self._next = (pos + 1) % n
                return inst
        return None

    def reset(self) -> None:
        super().reset()
        self._next = 0
