"""Prefill/decode disaggregation with the two choices made independently.

:class:`PDPolicy` pairs a prefill policy, which places every arrival on the
prefill instances (its own ``on_arrival``, ``on_progress``, ``on_timer``:
any policy, holding and timers included), with a routing policy that picks
the decode instance for each request by applying its rule
(:meth:`scheduler.routing.RoutingPolicy.choose`) to the ``"decode"`` pool.
The SGLang gateway's PD mode takes the same two choices separately (its
``prefill_policy`` and ``decode_policy`` settings).

When the decode rule runs is ``decode_choice`` (the two moments of
:mod:`scheduler.policy`'s PD contract):

* ``"handoff"`` (default): when the prefill finishes and the driver asks
  :meth:`~scheduler.policy.Policy.select_decode_instance`. vLLM's
  disaggregated-serving proxy works so: it sends the prefill (``max_tokens``
  1), waits for it, then sends the decode request.
* ``"dispatch"``: the moment the prefill policy releases a request, so each
  dispatch goes out as a :class:`~scheduler.policy.PDTarget` naming both
  instances. SGLang's PD router works so: it picks a prefill and a decode
  worker per request and sends the request to both at once
  (sgl-model-gateway/src/routers/http/pd_router.rs). The decode rule then
  sees the decode loads of the dispatch moment, not of the hand-off, and a
  decode instance counts the request from the dispatch on. If no decode
  instance is healthy at dispatch, that dispatch stays plain and its decode
  instance is chosen at hand-off (nothing is held for want of a decode
  server that may be back by then).

Build one by name with :func:`scheduler.registry.create_pd`.
"""

from __future__ import annotations

from typing import Literal

from scheduler.policy import ClusterView, Decisions, PDTarget, Policy, RequestLike, Target
from scheduler.routing import RoutingPolicy
from traces.errors import ConfigError

__all__ = ["DECODE_CHOICES", "DecodeChoice", "PDPolicy"]

#: When the decode instance is chosen: at hand-off (vLLM style) or at dispatch (SGLang style).
DecodeChoice = Literal["handoff", "dispatch"]
DECODE_CHOICES: tuple[str, ...] = ("handoff", "dispatch")


class PDPolicy(Policy):
    """A prefill policy and a decode routing policy, chosen independently.

    Its :attr:`name` is ``"<prefill>+<decode>"`` (``"laps+round_robin"``).

    Args:
        prefill: places arrivals on the prefill instances.
        decode: the rule that picks decode instances from the ``"decode"`` pool.
        decode_choice: ``"handoff"`` or ``"dispatch"`` (see the module doc).

    Raises:
        TypeError: ``decode`` is not a routing policy.
        ConfigError: an unknown ``decode_choice``.
    """

    def __init__(
        self, prefill: Policy, decode: RoutingPolicy, *, decode_choice: DecodeChoice = "handoff"
    ) -> None:
        if not isinstance(decode, RoutingPolicy):
            raise TypeError(
                f"the decode side must be a routing policy; got {type(decode).__name__}"
            )
        if decode_choice not in DECODE_CHOICES:
            raise ConfigError(
                f"decode_choice: expected one of {', '.join(DECODE_CHOICES)}; got {decode_choice!r}"
            )
        self.prefill = prefill
        self.decode = decode
        self.decode_choice: DecodeChoice = decode_choice
        self.name = f"{prefill.name}+{decode.name}"  # type: ignore[misc]

    def on_arrival(self, request: RequestLike, now_s: float, view: ClusterView) -> Decisions:
        return self._pair(self.prefill.on_arrival(request, now_s, view), now_s, view)

    def on_progress(self, instance_id: int, now_s: float, view: ClusterView) -> Decisions:
        return self._pair(self.prefill.on_progress(instance_id, now_s, view), now_s, view)

    def on_timer(self, now_s: float, view: ClusterView) -> Decisions:
        return self._pair(self.prefill.on_timer(now_s, view), now_s, view)

    def on_health(
        self, instance_id: int, healthy: bool, now_s: float, view: ClusterView
    ) -> Decisions:
        return self._pair(self.prefill.on_health(instance_id, healthy, now_s, view), now_s, view)

    def select_decode_instance(
        self, request: RequestLike, prefill_instance_id: int, now_s: float, view: ClusterView
    ) -> int | None:
        """The decode rule's pick from the ``"decode"`` pool; None if none is healthy."""
        return self._decode_pick(request, now_s, view)

    def queue_depths(self) -> dict[str, int]:
        return self.prefill.queue_depths()

    def reset(self) -> None:
        self.prefill.reset()
        self.decode.reset()

    def _pair(self, decisions: Decisions, now_s: float, view: ClusterView) -> Decisions:
        """Under ``decode_choice="dispatch"``, name the decode instance of every dispatch."""
        if self.decode_choice == "handoff" or not decisions.dispatches:
            return decisions
        paired: list[tuple[RequestLike, Target]] = []
        for request, target in decisions.dispatches:
            if not isinstance(target, PDTarget):
                decode = self._decode_pick(request, now_s, view)
                if decode is not None:
                    target = PDTarget(target, decode)
            paired.append((request, target))
        return Decisions(tuple(paired), decisions.wake_at_s, decisions.batches)

    def _decode_pick(self, request: RequestLike, now_s: float, view: ClusterView) -> int | None:
        inst = self.decode.choose(request, view.pool("decode"), view, now_s)
        return None if inst is None else inst.instance_id
