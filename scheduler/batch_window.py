"""The policy's own prefill queues, and the batch waiting window for short requests.

:class:`PrefillQueue` is the one queue type LAPS holds requests in (its
short and its long queue are two of them): first in, first out, with the
uncached tokens, arrival and SLO deadline of each held request.

:class:`BatchWindow` says when the short queue's head batch is due:

* when ``max_batch`` requests wait (a full batch gains nothing by waiting);
* when the oldest has waited ``window_s`` (LAPS holds short prefills a few
  milliseconds so that more join the batch, arXiv 2601.11589);
* earlier, when a held request's TTFT slack runs out: slack is
  ``arrival + slo_ttft - now - estimated prefill time``, so its deadline is
  ``arrival + slo_ttft - estimated prefill time`` (:func:`slack_deadline_s`).

``window_s = 0`` releases at once: a plain dual queue. Whether a due batch
can go out now (the instance can take work) is the policy's decision, not
the window's.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from scheduler.policy import RequestLike
from traces.errors import ConfigError

__all__ = ["BatchWindow", "Held", "PrefillQueue", "slack_deadline_s"]


def slack_deadline_s(request: RequestLike, slo_ttft_s: float | None, est_prefill_s: float) -> float:
    """When ``request``'s TTFT slack runs out: ``arrival + slo - est_prefill`` (inf with no SLO).

    The request's own ``slo_ttft_s`` wins over ``slo_ttft_s``.
    """
    slo = request.slo_ttft_s if request.slo_ttft_s is not None else slo_ttft_s
    if slo is None:
        return math.inf
    return request.arrival_s + slo - est_prefill_s


@dataclass(slots=True)
class Held:
    """A request held by the policy, with what it decided about it on arrival."""

    request: RequestLike
    #: When it entered the queue (driver clock).
    enqueued_s: float
    #: Prompt tokens the chosen instance still has to compute.
    uncached_tokens: int
    #: Prompt tokens the chosen instance holds in its cache.
    cached_tokens: int
    #: Latest release time that leaves its estimated prefill inside its TTFT SLO.
    deadline_s: float = math.inf


class PrefillQueue:
    """First in, first out queue of :class:`Held` requests, with their token total."""

    __slots__ = ("_items", "tokens")

    def __init__(self) -> None:
        self._items: deque[Held] = deque()
        #: Uncached tokens of everything held.
        self.tokens = 0

    def push(self, held: Held) -> None:
        """Hold ``held`` behind the others."""
        self._items.append(held)
        self.tokens += held.uncached_tokens

    def peek(self) -> Held:
        """The oldest held request (IndexError when empty)."""
        return self._items[0]

    def pop(self) -> Held:
        """Remove and return the oldest held request (IndexError when empty)."""
        held = self._items.popleft()
        self.tokens -= held.uncached_tokens
        return held

    def take(self, n: int) -> list[Held]:
        """Remove and return up to ``n`` of the oldest, oldest first."""
        return [self.pop() for _ in range(min(n, len(self._items)))]

    def clear(self) -> None:
        """Forget everything held."""
        self._items.clear()
        self.tokens = 0

    def oldest_wait_s(self, now_s: float) -> float:
        """How long the oldest has been held (0 when empty)."""
        return now_s - self._items[0].enqueued_s if self._items else 0.0

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __iter__(self) -> Iterator[Held]:
        return iter(self._items)


class BatchWindow:
    """When the head batch of a short queue is due (see the module doc).

    Args:
        window_s: longest hold of the oldest request, seconds (0: release at once).
        max_batch: a batch takes at most this many requests; this many
            waiting make it due at once.

    Raises:
        ConfigError: a negative window or a batch below 1.
    """

    __slots__ = ("max_batch", "window_s")

    def __init__(self, window_s: float, max_batch: int) -> None:
        if not (isinstance(window_s, int | float) and math.isfinite(window_s) and window_s >= 0):
            raise ConfigError(f"window_s: expected a number >= 0; got {window_s!r}")
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch: expected an integer >= 1; got {max_batch!r}")
        self.window_s = float(window_s)
        self.max_batch = max_batch

    def due_at_s(self, queue: PrefillQueue) -> float | None:
        """When the head batch is due (``-inf``: already; None: nothing held)."""
        if not queue:
            return None
        if len(queue) >= self.max_batch or self.window_s == 0.0:
            return -math.inf
        due = queue.peek().enqueued_s + self.window_s
        # Fewer than max_batch are held, so this scan is short.
        for held in queue:
            if held.deadline_s < due:
                due = held.deadline_s
        return due

    def is_due(self, queue: PrefillQueue, now_s: float) -> bool:
        """Whether the head batch should go out at ``now_s``."""
        due = self.due_at_s(queue)
        return due is not None and due <= now_s

    def take(self, queue: PrefillQueue) -> list[Held]:
        """The head batch: up to ``max_batch`` of the oldest, removed from ``queue``."""
        return queue.take(self.max_batch)
