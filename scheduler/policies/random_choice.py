"""``random``: each arrival to a healthy instance drawn uniformly, from a seeded generator.

The gateway's ``random`` policy (sgl-model-gateway/src/policies/random.rs)
draws from the thread's generator; here the generator is seeded, so a run is
reproducible: the same seed and the same sequence of healthy sets give the
same choices, and :meth:`reset` starts the sequence over.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scheduler.params import PolicyConfig, param
from scheduler.policy import ClusterView, InstanceView, RequestLike
from scheduler.registry import register
from scheduler.routing import SeededRoutingPolicy, healthy_instances

__all__ = ["RandomConfig", "RandomPolicy"]


@dataclass(frozen=True)
class RandomConfig(PolicyConfig):
    """Parameters of ``random``."""

    seed: int = param(0, help="Seed of the generator that draws instances.", source="llmsched")


@register("random")
class RandomPolicy(SeededRoutingPolicy):
    """Send each arrival to a healthy instance drawn uniformly at random (seeded)."""

    config_class = RandomConfig
    source = "sgl-model-gateway/src/policies/random.rs"
    config: RandomConfig

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
        return healthy[self._rng.randrange(len(healthy))]
