"""``least_load``: each arrival to the healthy instance with the least in-flight work.

Work is counted in requests (outstanding: sent and not finished, as SGLang's
data-parallel controller's ``shortest_queue`` method does) or in tokens
(prompt plus output budget of the requests not yet finished; the gateway's
``least_load`` counts the text it has sent and not yet seen finish);
``metric`` picks. Both are the router's own counts, so they do not lag.
Ties go to the lower instance id, so the choice is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from scheduler.params import PolicyConfig, param
from scheduler.policy import ClusterView, InstanceView, RequestLike
from scheduler.registry import register
from scheduler.routing import RoutingPolicy

__all__ = ["LeastLoadConfig", "LeastLoadPolicy"]


@dataclass(frozen=True)
class LeastLoadConfig(PolicyConfig):
    """Parameters of ``least_load``."""

    metric: Literal["requests", "tokens"] = param(
        "requests",
        help="What counts as load: outstanding (sent, not finished) requests, or their "
        "prompt + output budget tokens.",
        source="SGLang DP controller shortest_queue (requests); gateway least_load.rs "
        "(request text, here tokens)",
    )


def _requests(inst: InstanceView) -> tuple[int, int]:
    return (inst.outstanding, inst.instance_id)


def _tokens(inst: InstanceView) -> tuple[int, int]:
    return (inst.inflight_tokens, inst.instance_id)


@register("least_load")
class LeastLoadPolicy(RoutingPolicy):
    """Send each arrival to the healthy instance with the fewest in-flight requests (or tokens)."""

    config_class = LeastLoadConfig
    source = (
        "SGLang data-parallel controller (python/sglang/srt/managers/"
        "data_parallel_controller.py); sgl-model-gateway/src/policies/least_load.rs"
    )
    config: LeastLoadConfig

    def __init__(self, config: LeastLoadConfig | None = None, /, **params: object) -> None:
        super().__init__(config, **params)
        self._key = _tokens if self.config.metric == "tokens" else _requests

    def choose(
        self,
        request: RequestLike,
        candidates: Sequence[InstanceView],
        view: ClusterView,
        now_s: float,
    ) -> InstanceView | None:
        best, best_key = None, None
        for inst in candidates:
            if inst.healthy:
                key = self._key(inst)
                if best_key is None or key < best_key:
                    best, best_key = inst, key
        return best
