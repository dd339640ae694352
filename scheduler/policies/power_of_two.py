"""``power_of_two``: sample two healthy instances, send the arrival to the less loaded.

As the gateway's ``power_of_two`` (sgl-model-gateway/src/policies/power_of_two.rs):
two distinct healthy instances are drawn uniformly (the second from the
others, so one draw suffices), and their loads compared. The gateway
compares token loads and, when a worker's token load is unknown, falls back
to request counts for both; the view here always reports tokens, so the
comparison is in-flight tokens first and outstanding requests on a tie. On
a full tie the first instance drawn wins, as in the gateway. With one healthy
instance it is chosen without a draw; with none, None. The generator is
seeded: a seed and a sequence of states give the same choices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scheduler.params import PolicyConfig, param
from scheduler.policy import ClusterView, InstanceView, RequestLike
from scheduler.registry import register
from scheduler.routing import SeededRoutingPolicy, healthy_instances

__all__ = ["PowerOfTwoConfig", "PowerOfTwoPolicy"]


@dataclass(frozen=True)
class PowerOfTwoConfig(PolicyConfig):
    """Parameters of ``power_of_two``."""

    seed: int = param(
        0, help="Seed of the generator that draws the two instances.", source="llmsched"
    )


def _load(inst: InstanceView) -> tuple[int, int]:
    return (inst.inflight_tokens, inst.outstanding)


@register("power_of_two")
class PowerOfTwoPolicy(SeededRoutingPolicy):
    """Draw two distinct healthy instances; take the one with fewer in-flight tokens, then requests."""

    config_class = PowerOfTwoConfig
    source = "sgl-model-gateway/src/policies/power_of_two.rs"
    config: PowerOfTwoConfig

    def choose(
        self,
        request: RequestLike,
        candidates: Sequence[InstanceView],
        view: ClusterView,
        now_s: float,
    ) -> InstanceView | None:
        healthy = healthy_instances(candidates)
        n = len(healthy)
        if n <= 1:
            return healthy[0] if healthy else None
        i = self._rng.randrange(n)
        j = (i + 1 + self._rng.randrange(n - 1)) % n
        a, b = healthy[i], healthy[j]
        return a if _load(a) <= _load(b) else b
