"""The instance driver is clock-agnostic: the simpy loop, a plain heap clock and asyncio agree.

The simulator's times are the reference. Driving the same engine through
:class:`sim.driver.InstanceDriver` on a clock that is not simpy must give
the same first-token and finish times, and the tokens a streaming server
would emit (``track_tokens``) must add up to each request's output, at
the engine model's times.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

import numpy as np
import pytest

from scheduler.registry import create
from sim.driver import AsyncioTimer, InstanceDriver
from sim.engine import Engine
from sim.inflight import SimRequest
from sim.loop import Simulation
from sim.step import StepRecord
from tests.unit.sim.fakes import AffineCost, make_limits, make_trace


class HeapTimer:
    """A discrete clock without simpy: a heap of (time, order, sequence) calls."""

    def __init__(self) -> None:
        self.t = 0.0
        self._heap: list[tuple[float, int, int, list]] = []
        self._seq = itertools.count()

    @property
    def now(self) -> float:
        return self.t

    def call_at(self, when_s, callback, *, before_steps=False):
        handle = [callback]
        heapq.heappush(
            self._heap, (max(when_s, self.t), 0 if before_steps else 1, next(self._seq), handle)
        )
        return handle

    def cancel(self, handle) -> None:
        handle[0] = None

    def run(self) -> None:
        while self._heap:
            self.t, _, _, handle = heapq.heappop(self._heap)
            if handle[0] is not None:
                handle[0]()


class Recorder:
    """A StepObserver that keeps first-token and finish times and every emitted token."""

    def __init__(self) -> None:
        self.first: dict[int, float] = {}
        self.finish: dict[int, float] = {}
        self.tokens: dict[int, list[float]] = {}

    def step_done(self, driver, rec: StepRecord) -> None:
        for req in rec.first_tokens:
            self.first[req.request_id] = rec.end_s
        for req in rec.finished:
            self.finish[req.request_id] = rec.end_s
        for req in rec.prefilled:
            self.tokens.setdefault(req.request_id, []).append(rec.end_s)
        if rec.decoded:
            times = rec.token_times_s()
            for req in rec.decoded:
                self.tokens.setdefault(req.request_id, []).extend(times)

    def rejected(self, driver, req) -> None:
        raise AssertionError(f"rejected {req}")

    def changed(self, driver) -> None:
        pass


ARRIVALS = [0.0, 0.001, 0.004, 0.02, 0.021, 0.3, 0.31, 0.5]
PROMPTS = [300, 40, 2500, 64, 900, 10, 128, 3000]
OUTPUTS = [20, 55, 3, 140, 1, 30, 64, 12]


def _simulated(fast_forward: bool = True):
    trace = make_trace(ARRIVALS, PROMPTS, OUTPUTS)
    sim = Simulation(trace, AffineCost(), create("fcfs"), make_limits(), fast_forward=fast_forward)
    return sim.run().frame()


def _drive(timer, *, fast_forward: bool = True, track_tokens: bool = True) -> Recorder:
    rec = Recorder()
    engine = Engine(
        AffineCost(), make_limits(), fast_forward=fast_forward, track_tokens=track_tokens
    )
    drv = InstanceDriver(engine, timer, rec)
    for row, (t, p, o) in enumerate(zip(ARRIVALS, PROMPTS, OUTPUTS, strict=True)):
        req = SimRequest(row, row, t, p, o)
        timer.call_at(t, lambda req=req: drv.submit(req), before_steps=True)
    return rec


def test_the_driver_on_a_plain_heap_clock_gives_the_simulators_times():
    frame = _simulated()
    timer = HeapTimer()
    rec = _drive(timer)
    timer.run()
    first = np.array([rec.first[i] for i in range(len(ARRIVALS))])
    finish = np.array([rec.finish[i] for i in range(len(ARRIVALS))])
    np.testing.assert_allclose(first, frame["first_token_s"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(finish, frame["finish_s"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("fast_forward", [True, False])
def test_every_token_is_emitted_once_at_the_engine_models_time(fast_forward):
    timer = HeapTimer()
    rec = _drive(timer, fast_forward=fast_forward)
    timer.run()
    for i, n in enumerate(OUTPUTS):
        times = rec.tokens[i]
        assert len(times) == n, f"request {i}: {len(times)} tokens, asked {n}"
        assert times[0] == pytest.approx(rec.first[i], abs=1e-12)
        assert times[-1] == pytest.approx(rec.finish[i], abs=1e-12)
        assert all(b > a for a, b in itertools.pairwise(times))


def test_stretches_and_single_steps_emit_the_same_token_times():
    fast, slow = HeapTimer(), HeapTimer()
    a, b = _drive(fast, fast_forward=True), _drive(slow, fast_forward=False)
    fast.run()
    slow.run()
    for i in range(len(OUTPUTS)):
        np.testing.assert_allclose(a.tokens[i], b.tokens[i], rtol=0, atol=1e-9)


def test_without_track_tokens_no_token_lists_are_built():
    timer = HeapTimer()
    rec = _drive(timer, track_tokens=False)
    timer.run()
    assert rec.tokens == {}
    assert len(rec.finish) == len(ARRIVALS)


def test_the_driver_runs_on_asyncio_faster_than_real_time():
    """On a wall clock (20x real time) finishes land near the simulated ones, in the same order."""
    frame = _simulated()

    async def main() -> Recorder:
        timer = AsyncioTimer(speed=20.0)
        rec = _drive(timer)
        end = float(frame["finish_s"].max())
        while len(rec.finish) < len(ARRIVALS) and timer.now < 4 * end + 1.0:
            await asyncio.sleep(0.005)
        return rec

    rec = asyncio.run(main())
    assert len(rec.finish) == len(ARRIVALS)
    finish = np.array([rec.finish[i] for i in range(len(ARRIVALS))])
    assert list(np.argsort(finish, kind="stable")) == list(
        np.argsort(frame["finish_s"].to_numpy(), kind="stable")
    )
    # Steps start when the previous one was planned to end, so loop lag does
    # not accumulate: each finish is within one late callback of the model.
    np.testing.assert_allclose(finish, frame["finish_s"], rtol=0, atol=0.25)
