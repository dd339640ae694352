"""LAPS temporal disaggregation: a short and a long queue per instance, and their release rule.

:class:`DualQueues` holds, for each entry instance, two
:class:`scheduler.batch_window.PrefillQueue` s and releases them:

* **When.** An instance can take work when its next step is still open:
  nothing waits in its queue and, for a prefill-role instance, nothing is
  being prefilled. The released work is then exactly what its next step
  admits, so the order the policy chooses is the order the engine runs.
  A prefill instance reports the end of each step that hands requests off
  (``on_progress``); other instances run decode steps they do not report,
  and polled gauges may turn idle with no report at all, so while work is
  held for an instance it is re-checked every :data:`READY_POLL_S`.
* **What.** One unit per chance: the short queue's head batch, once the
  batch window says it is due, or long requests: the first, then the next
  ones while they still rank before the short queue, up to
  ``long_batch_tokens`` uncached tokens in all, so the engine prefills them
  in one step instead of one step each (every prefill step stalls the
  running decodes; with SGLang's alternation a decode step runs between
  two such steps, and TPOT suffers first). Short requests go
  first, but a long one ranks as if it had arrived ``max_wait_s`` later
  (aging by a fixed offset): it goes first when no short one is held, or
  when it arrived more than ``max_wait_s`` before the oldest short one.
  So no short request that arrived more than ``max_wait_s`` after a long
  one is served before it (the starvation bound), and under overload the
  two queues interleave in that shifted arrival order instead of either
  starving the other. Short ones held and not yet due keep the instance
  waiting for them, at most ``window_s``: that is the window's price,
  paid only when it can buy a batch: with ``release_alone`` a lone short
  request (nothing else held for its instance) goes at once.
* **How.** A released short batch is clustered onto the CUDA-graph grid
  (:func:`emit_batch`); each graph group goes out with a
  :class:`~scheduler.policy.BatchHint`, the rest as plain dispatches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from scheduler.batch_window import BatchWindow, Held, PrefillQueue
from scheduler.graph_buckets import GraphBuckets
from scheduler.policy import BatchHint, ClusterView, InstanceView, RequestLike

__all__ = ["READY_POLL_S", "DualQueues", "Release", "emit_batch"]

#: Re-check interval for an instance that cannot take held work and reports
#: no progress between steps: a quarter of a decode step of a 32B model on
#: an H200 (about 20 ms), so a held batch misses little of a step.
READY_POLL_S = 0.005

#: ``(dispatches, hints, wake_at_s)``: what a release decided (``inf``: no wake needed).
Release = tuple[list[tuple[RequestLike, int]], list[BatchHint], float]


def emit_batch(
    batch: list[Held],
    target: int,
    buckets: GraphBuckets | None,
    cost: Any,
    dispatches: list[tuple[RequestLike, int]],
    hints: list[BatchHint],
) -> None:
    """Append a released short batch to ``dispatches``: graph groups with their hints first."""
    if buckets is None:
        dispatches.extend((h.request, target) for h in batch)
        return
    step = None
    if cost is not None:

        def step(news, cached, graph):
            return cost.prefill_time_s(news, cached, cuda_graph=graph)

    groups = buckets.plan(
        [h.uncached_tokens for h in batch], [h.cached_tokens for h in batch], step
    )
    for g in groups:
        if g.cuda_graph:
            hints.append(
                BatchHint(len(dispatches), len(g.indices), g.padded_tokens, g.padded_batch)
            )
        dispatches.extend((batch[k].request, target) for k in g.indices)


class DualQueues:
    """The short and long queue of every entry instance (see the module doc).

    Args:
        window: when a short batch is due.
        max_wait_s: the starvation bound of long requests.
        buckets: the CUDA-graph grid, or None to release plain batches.
        release_alone: a ready instance with one short request held and nothing
            else takes it at once: holding it cannot form a batch.
        long_batch_tokens: most uncached tokens of long requests one release hands
            over (the first always goes); 0: one long request per release.
    """

    def __init__(
        self,
        window: BatchWindow,
        max_wait_s: float,
        buckets: GraphBuckets | None,
        *,
        release_alone: bool = False,
        long_batch_tokens: int = 0,
    ):
        self.window = window
        self.release_alone = release_alone
        self.long_batch_tokens = long_batch_tokens
        self.max_wait_s = max_wait_s
        self.buckets = buckets
        #: The cost model for the graph plan's cost check (None: no check).
        self.cost: Any = None
        self.short: dict[int, PrefillQueue] = {}
        self.long: dict[int, PrefillQueue] = {}
        #: Prompt tokens of the last unit released to each instance (see :meth:`ready`).
        self.last_unit: dict[int, int] = {}

    def add_instance(self, instance_id: int) -> None:
        """Give an instance its two (empty) queues."""
        self.short[instance_id] = PrefillQueue()
        self.long[instance_id] = PrefillQueue()

    def remove_instance(self, instance_id: int) -> None:
        """Drop an instance's queues (take what they hold first: :meth:`take_all`)."""
        del self.short[instance_id], self.long[instance_id]
        self.last_unit.pop(instance_id, None)

    def take_all(self, instance_id: int) -> list[Held]:
        """Remove and return everything held for the instance, short queue first."""
        short_q, long_q = self.short[instance_id], self.long[instance_id]
        return short_q.take(len(short_q)) + long_q.take(len(long_q))

    def clear(self) -> None:
        """Forget every instance and everything held."""
        self.short.clear()
        self.long.clear()
        self.last_unit.clear()

    def hold(self, instance_id: int, held: Held, short: bool) -> None:
        """Hold ``held`` for the instance, in its short or long queue."""
        (self.short if short else self.long)[instance_id].push(held)

    def count(self, instance_id: int) -> int:
        """Requests held for the instance."""
        return len(self.short[instance_id]) + len(self.long[instance_id])

    def tokens(self, instance_id: int) -> int:
        """Uncached prompt tokens held for the instance."""
        return self.short[instance_id].tokens + self.long[instance_id].tokens

    def holding(self) -> list[int]:
        """Instances something is held for."""
        return [i for i in self.short if self.short[i] or self.long[i]]

    def ready(self, inst: InstanceView) -> bool:
        """Whether the instance can take the next unit, from what a router knows.

        A unit released to an instance goes into its next step only if what
        was there before has left its queue. The router cannot see a queue
        empty (its gauges are polls, late by the poll interval), but it knows
        which prompts it sent and has not seen a first token of. So an
        instance is ready when everything still owing a first token is the
        last unit released to it: that one queues behind the prefill in
        progress, or runs, and the next goes once the one before it has
        answered. At most one released unit waits on the instance, as when
        the queue is read live, but nothing here depends on how fresh the
        gauges are. A prefill-role instance takes one unit at a time: nothing
        waits and nothing prefills there (its first token comes from the
        decode side, after the transfer).
        """
        if not inst.healthy:
            return False
        if inst.role == "prefill":
            return inst.n_waiting == 0 and inst.n_running == 0
        return inst.pending_prompt_tokens <= self.last_unit.get(inst.instance_id, 0)

    def _long_first(self, long_q: PrefillQueue, short_q: PrefillQueue) -> bool:
        """Whether the long queue's head goes before the short queue's (aging by ``max_wait_s``)."""
        return bool(long_q) and (
            not short_q or long_q.peek().enqueued_s + self.max_wait_s <= short_q.peek().enqueued_s
        )

    def release(self, now_s: float, view: ClusterView, ids: Iterable[int]) -> Release:
        """Release at most one unit to each ready instance of ``ids``; when to look again."""
        dispatches: list[tuple[RequestLike, int]] = []
        hints: list[BatchHint] = []
        wake = math.inf
        window = self.window
        for i in ids:
            inst = view.instance(i)
            short_q, long_q = self.short[i], self.long[i]
            ready = self.ready(inst)
            released = False
            start = len(dispatches)
            if ready:
                if self._long_first(long_q, short_q):
                    first = long_q.pop()
                    dispatches.append((first.request, i))
                    budget = self.long_batch_tokens - first.uncached_tokens
                    while (
                        long_q
                        and long_q.peek().uncached_tokens <= budget
                        and self._long_first(long_q, short_q)
                    ):
                        held = long_q.pop()
                        budget -= held.uncached_tokens
                        dispatches.append((held.request, i))
                    released = True
                elif short_q and (
                    window.is_due(short_q, now_s)
                    or (self.release_alone and len(short_q) == 1 and not long_q)
                ):
                    emit_batch(window.take(short_q), i, self.buckets, self.cost, dispatches, hints)
                    released = True
            if released:
                self.last_unit[i] = sum(r.prompt_tokens for r, _ in dispatches[start:])
            if not (short_q or long_q):
                continue
            if released or not ready:
                # Re-check: a release the engine might refuse, or a busy instance.
                # A prefill instance reports its steps' ends, but its gauges may
                # still say busy then and turn idle at a poll that reports nothing.
                wake = min(wake, now_s + READY_POLL_S)
                continue
            # Ready, short requests held, none due yet. Whether a long one ranks
            # first changes only when the short queue's head does: no timer for it.
            due = window.due_at_s(short_q)
            assert due is not None
            wake = min(wake, due)
        return dispatches, hints, wake
