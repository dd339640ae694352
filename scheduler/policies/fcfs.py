"""``fcfs``: vanilla SGLang/vLLM, every request dispatched the moment it arrives.

The router holds nothing and reorders nothing; each instance serves its own
queue first come, first served. With several entry instances an arrival goes
to the least-loaded healthy one (:func:`scheduler.policy.least_loaded`:
fewest outstanding requests, then fewest in-flight tokens, then lowest id),
which is how a single-queue deployment behaves when fronted by a plain
shortest-queue balancer. With one instance this is plain FCFS.
"""

from __future__ import annotations

from collections.abc import Sequence

from scheduler.policy import ClusterView, InstanceView, RequestLike, least_loaded
from scheduler.registry import register
from scheduler.routing import RoutingPolicy

__all__ = ["FcfsPolicy"]


@register("fcfs")
class FcfsPolicy(RoutingPolicy):
    """Each arrival at once to the instance with the fewest outstanding requests, ties to fewer in-flight tokens; engines serve FCFS.

    Vanilla engines behind a shortest-queue balancer: nothing is held or
    reordered. Ties after tokens go to the lower id. ``least_load``
    (``metric = "requests"``) makes the same choice except on ties, which it
    gives to the lower id alone.
    """

    source = (
        "SGLang scheduler (python/sglang/srt/managers/scheduler.py, default "
        "schedule_policy 'fcfs'); vLLM v1 scheduler (vllm/v1/core/sched/scheduler.py, FCFS)"
    )

    def choose(
        self,
        request: RequestLike,
        candidates: Sequence[InstanceView],
        view: ClusterView,
        now_s: float,
    ) -> InstanceView | None:
        if len(candidates) == 1:  # the common single-instance case, without the sort
            only = candidates[0]
            return only if only.healthy else None
        return least_loaded(candidates)
