"""The instance driver: one engine stepping on a clock, clock-agnostic.

An instance is a small state machine around its :class:`sim.engine.Engine`:
idle, it waits for work; busy, it asks the engine for the next step (or
stretch of decode steps), waits the step's duration, applies it, and
reports. The same driver runs on simulated time (the simpy loop,
:mod:`sim.loop`) and on the wall clock (the emulated backend), so the
emulator is the simulator on a real clock, not a second model of it.

It needs two things from its host:

* a :class:`Timer`: the clock's reading and "call this at that time",
  with cancellation;
* a :class:`StepObserver`: told when a step is done (prefills that
  started in it, with their cached tokens; first tokens, finishes,
  hand-offs, preemptions; and with ``track_tokens`` every token produced
  and when), when a request is rejected, and when the waiting or running
  set changed. The host records results and feeds its policy from
  these; the driver writes nothing itself.

Cutting: a dispatch that makes a new head of the waiting queue ends a
decode stretch after the step in progress (:meth:`sim.engine.Engine.cut`),
which is where stepping one iteration at a time would look at the queue
again; the driver cancels the stretch's end and waits for the new one.

Same-time order on a simulated clock: a call marked ``before_steps``
(arrivals, policy timers, KV landings) runs before any step planned for the
same instant, so a step planned at ``t`` sees everything that arrived at
``t``. A wall clock has no same instant and ignores the mark.

Per-request overhead: a cost model with a ``request_overhead_s`` (a
calibrated profile's server-side HTTP, tokenization and frontend time) has
each submitted request wait that long before it joins the engine's queue.
It counts as in flight on the instance meanwhile (announced, as a KV
transfer is), takes no step and adds to TTFT and E2E at any load.

Prefill/decode disaggregation: :meth:`InstanceDriver.hand_off` sends a
prefilled request's KV cache to a decode instance's driver; it counts as in
flight there at once (:meth:`sim.engine.Engine.announce`) and joins its
queue when the transfer time has passed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from sim.engine import QUEUED_HEAD, REJECTED, Engine
from sim.inflight import SimRequest
from sim.step import GraphBatch, StepRecord

__all__ = ["AsyncioTimer", "InstanceDriver", "StepObserver", "Timer"]


class Timer(Protocol):
    """A clock the driver can read and set alarms on (seconds)."""

    @property
    def now(self) -> float:
        """The current time."""
        ...

    def call_at(
        self, when_s: float, callback: Callable[[], None], *, before_steps: bool = False
    ) -> Any:
        """Call ``callback()`` at ``when_s`` (at once if past); returns a handle for :meth:`cancel`.

        ``before_steps``: on a simulated clock, run ahead of step plans due
        at the same instant.
        """
        ...

    def cancel(self, handle: Any) -> None:
        """Make a pending call not happen (no effect if it already did)."""
        ...


class AsyncioTimer:
    """The :class:`Timer` of an asyncio event loop, optionally faster than real time.

    Its clock reads seconds since the timer was made, times ``speed``
    (simulated seconds per wall second), so a test can run an engine ten
    times faster than real time; ``before_steps`` has no meaning on a wall
    clock and is ignored.
    """

    __slots__ = ("_t0", "loop", "speed")

    def __init__(
        self, loop: asyncio.AbstractEventLoop | None = None, *, speed: float = 1.0
    ) -> None:
        if not speed > 0:
            raise ValueError(f"speed: expected a number > 0; got {speed!r}")
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        self.speed = speed
        self._t0 = self.loop.time()

    @property
    def now(self) -> float:
        return (self.loop.time() - self._t0) * self.speed

    def call_at(
        self, when_s: float, callback: Callable[[], None], *, before_steps: bool = False
    ) -> asyncio.TimerHandle:
        return self.loop.call_at(self._t0 + when_s / self.speed, callback)

    def cancel(self, handle: asyncio.TimerHandle) -> None:
        handle.cancel()


class StepObserver(Protocol):
    """What the host of a driver is told; see the module docstring."""

    def step_done(self, driver: InstanceDriver, rec: StepRecord) -> None:
        """A step that began at ``rec.start_s`` ended at ``rec.end_s`` and was applied.

        Told before the next step is planned; ``rec.started`` are the
        prefills that began with this step.
        """
        ...

    def rejected(self, driver: InstanceDriver, req: SimRequest) -> None:
        """``req`` can never fit the instance's KV cache; it was not queued."""
        ...

    def changed(self, driver: InstanceDriver) -> None:
        """The engine's waiting or running set changed (``engine.version`` moved)."""
        ...


class InstanceDriver:
    """Runs one engine on a :class:`Timer`, reporting to a :class:`StepObserver`.

    Args:
        engine: the instance's engine model.
        timer: the clock.
        observer: the host.
    """

    __slots__ = (
        "_handle",
        "engine",
        "id",
        "idle",
        "observer",
        "request_overhead_s",
        "seen_version",
        "timer",
    )

    def __init__(self, engine: Engine, timer: Timer, observer: StepObserver) -> None:
        self.engine = engine
        self.timer = timer
        self.observer = observer
        self.id = engine.instance_id
        #: No step in progress and none planned.
        self.idle = True
        self._handle: Any = None
        #: ``engine.version`` when the observer was last told of a change.
        self.seen_version = -1
        #: Seconds a submitted request spends before joining the queue (see the module notes).
        self.request_overhead_s = float(getattr(engine.cost, "request_overhead_s", 0.0))

    # -- work in -----------------------------------------------------------------

    def submit(self, req: SimRequest, group: GraphBatch | None = None) -> bool:
        """Queue a dispatched request (for prefill); False if the instance rejected it.

        With a per-request overhead the request joins the queue that much
        later; whether it can ever fit is decided at once.
        """
        delay = self.request_overhead_s
        if delay <= 0.0:
            return self._queued(req, self.engine.enqueue(req, self.timer.now, group))
        if not self.engine.fits(req):
            return self._queued(req, REJECTED)
        self.engine.announce(req)
        self.timer.call_at(
            self.timer.now + delay, lambda: self._enter(req, group), before_steps=True
        )
        return True

    def _enter(self, req: SimRequest, group: GraphBatch | None) -> None:
        """A submitted request is through the server's per-request overhead: queue it."""
        self.engine.unannounce(req)
        self._queued(req, self.engine.enqueue(req, self.timer.now, group))

    def land(self, req: SimRequest, *, announced: bool = True) -> bool:
        """A request's KV cache arrived (decode role); False if the instance rejected it."""
        status = self.engine.enqueue_prefilled(req, self.timer.now, announced=announced)
        return self._queued(req, status)

    def hand_off(
        self, req: SimRequest, dest: InstanceDriver, transfer_s: float, *, announced: bool = False
    ) -> None:
        """Send a prefilled request's KV cache to ``dest``; it lands after ``transfer_s``.

        ``announced``: ``dest`` was told at dispatch (the pair was chosen
        then, SGLang style) and counts the request as in flight already.
        """
        if not announced:
            dest.engine.announce(req)
        self.timer.call_at(self.timer.now + transfer_s, lambda: dest.land(req), before_steps=True)

    def _queued(self, req: SimRequest, status: int) -> bool:
        if status == REJECTED:
            self.observer.rejected(self, req)
            return False
        eng = self.engine
        if eng.version != self.seen_version:
            self.seen_version = eng.version
            self.observer.changed(self)
        if self.idle:
            # Planned as an ordinary call: after everything else due now.
            self.idle = False
            timer = self.timer
            timer.call_at(timer.now, self._start_step)
        elif status == QUEUED_HEAD:
            new_end = eng.cut(self.timer.now)
            if new_end is not None:
                self.timer.cancel(self._handle)
                self._handle = self.timer.call_at(new_end, self._step_done)
        return True

    # -- stepping ----------------------------------------------------------------

    def _start_step(self, at_s: float | None = None) -> None:
        """Plan the next step at ``at_s`` (default: now) and wait for its end; or go idle."""
        eng = self.engine
        now = self.timer.now if at_s is None else at_s
        dur = eng.begin(now)
        if dur is None:
            self.idle = True
            self._handle = None
            return
        if eng.version != self.seen_version:
            self.seen_version = eng.version
            self.observer.changed(self)
        self._handle = self.timer.call_at(eng.step_end_s, self._step_done)

    def _step_done(self) -> None:
        """Apply the step that just ended, report it, and plan the next one."""
        eng = self.engine
        rec = eng.end()
        end_s = rec.end_s
        if eng.version != self.seen_version:
            self.seen_version = eng.version
            self.observer.changed(self)
        self.observer.step_done(self, rec)
        # The next step starts when this one was planned to end: on a wall
        # clock a late callback then does not push every later step back.
        self._start_step(end_s)
