"""The simulated clock: a simpy environment that is an instance driver's timer.

:class:`SimpyTimer` is a ``simpy.Environment`` with the two methods of
:class:`sim.driver.Timer`: ``call_at`` schedules a callback as one event
(simpy's urgent priority for ``before_steps`` calls, normal otherwise, so
arrivals, timers and KV landings run before a step planned for the same
instant), and ``cancel`` leaves the event to pop off the queue doing
nothing, which is cheaper than removing it. :class:`Urgent` is a bare
urgent timeout for processes (the arrival walk).
"""

from __future__ import annotations

from collections.abc import Callable

import simpy
from simpy.core import NORMAL, URGENT
from simpy.events import Event

__all__ = ["SimpyTimer", "Urgent"]


class _Call(Event):
    """A callback at a set time: the event behind :meth:`SimpyTimer.call_at`."""

    def __init__(
        self, env: simpy.Environment, delay: float, fn: Callable[[], None] | None, priority: int
    ) -> None:
        # Event.__init__'s work, inlined: this runs for every engine step.
        self.env = env
        self._ok = True
        self._value = None
        self.fn = fn
        self.callbacks = [_fire]
        env.schedule(self, priority, delay)


def _fire(call: _Call) -> None:
    """Run a :class:`_Call`'s callback unless it was cancelled (a plain function: no bound method per call)."""
    fn = call.fn
    if fn is not None:
        fn()


class SimpyTimer(simpy.Environment):
    """A simpy environment that is a :class:`sim.driver.Timer` too.

    ``now`` is simpy's clock; ``before_steps`` calls get simpy's urgent
    priority, the others normal; a cancelled call still pops off simpy's
    queue, doing nothing (cheaper than removing it).
    """

    def call_at(
        self, when_s: float, callback: Callable[[], None], *, before_steps: bool = False
    ) -> _Call:
        delay = when_s - self.now
        return _Call(
            self, delay if delay > 0.0 else 0.0, callback, URGENT if before_steps else NORMAL
        )

    def cancel(self, handle: _Call) -> None:
        handle.fn = None


class Urgent(Event):
    """An event that fires after ``delay`` ahead of same-time normal events."""

    def __init__(self, env: simpy.Environment, delay: float) -> None:
        super().__init__(env)
        self._ok = True
        self._value = None
        env.schedule(self, URGENT, delay)
