"""Prefill/decode disaggregation with the two choices made independently.

:class:`PDPolicy` pairs a prefill policy, which places every arrival on the
prefill instances (its own ``on_arrival``, ``on_progress``, ``on_timer``:
any policy, holding and timers included), with a routing policy that picks
the decode instance for each prefilled request by applying its rule
(:meth:`scheduler.routing.RoutingPolicy.choose`) to the ``"decode"`` pool
when the driver asks (:meth:`~scheduler.policy.Policy.select_decode_instance`).
The SGLang gateway's PD mode takes the same two choices separately (its
``prefill_policy`` and ``decode_policy`` settings).

Build one by name with :func:`scheduler.registry.create_pd`.
"""

from __future__ import annotations

from scheduler.policy import ClusterView, Decisions, Policy, RequestLike
from scheduler.routing import RoutingPolicy

__all__ = ["PDPolicy"]


class PDPolicy(Policy):
    """A prefill policy and a decode routing policy, chosen independently.

    Its :attr:`name` is ``"<prefill>+<decode>"`` (``"laps+round_robin"``).

    Raises:
        TypeError: ``decode`` is not a routing policy.
    """

    def __init__(self, prefill: Policy, decode: RoutingPolicy) -> None:
        if not isinstance(decode, RoutingPolicy):
            raise TypeError(
                f"the decode side must be a routing policy; got {type(decode).__name__}"
            )
        self.prefill = prefill
        self.decode = decode
        self.name = f"{prefill.name}+{decode.name}"  # type: ignore[misc]

    def on_arrival(self, request: RequestLike, now_s: float, view: ClusterView) -> Decisions:
        return self.prefill.on_arrival(request, now_s, view)

    def on_progress(self, instance_id: int, now_s: float, view: ClusterView) -> Decisions:
        return self.prefill.on_progress(instance_id, now_s, view)

    def on_timer(self, now_s: float, view: ClusterView) -> Decisions:
        return self.prefill.on_timer(now_s, view)

    def select_decode_instance(
        self, request: RequestLike, prefill_instance_id: int, now_s: float, view: ClusterView
    ) -> int | None:
        """The decode rule's pick from the ``"decode"`` pool; None if none is healthy."""
        inst = self.decode.choose(request, view.pool("decode"), view, now_s)
        return None if inst is None else inst.instance_id

    def reset(self) -> None:
        self.prefill.reset()
        self.decode.reset()
