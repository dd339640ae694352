"""The simulated driver: a simpy event loop around the engines and the policy.

Processes and events:

* one process walks the trace's columns and hands each arrival to the
  policy (``Policy.on_arrival``), applying its decisions at once;
* each instance is a small state machine on simpy events: idle, it waits
  to be woken; busy, it asks its engine for the next step (or stretch of
  decode steps), waits the step's duration on a timeout, applies it, and
  reports (results, queue samples, PD hand-offs, ``Policy.on_progress``).
  It is the process shape without a generator: cutting a stretch then costs
  one new timeout instead of an interrupt's exception round trip;
* timers the policy asks for, and KV transfers under PD, are single events.

Same-time order: arrivals, timers and KV-transfer landings run before any
instance plans a step at the same instant (urgent priority), so a step
planned at ``t`` sees everything that arrived at ``t``. A dispatch that
makes a new head of an instance's queue cuts the stretch running there
after its current step (:meth:`sim.engine.Engine.cut`), which is where
stepping one iteration at a time would look at the queue again; the
fast path therefore gives the same times as ``fast_forward=False``.

Batch hints (:attr:`scheduler.policy.Decisions.batches`): the dispatches a
hint covers go to one instance (a pool target is resolved once for all of
them) and are enqueued there as one :class:`sim.step.GraphBatch`. Every
prefill or mixed step is logged (:attr:`Simulation.batch_log`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import simpy
from simpy.core import URGENT
from simpy.events import Event

from scheduler.cost_model import StepCost
from scheduler.policy import NO_DECISIONS, Decisions, Policy, least_loaded
from sim.cluster import Cluster, cluster_roles
from sim.engine import QUEUED_HEAD, REJECTED, Engine
from sim.inflight import NEW, SimRequest
from sim.limits import EngineLimits
from sim.metrics import SimResult
from sim.records import OUTCOME_FAILED, OUTCOME_PENDING, OUTCOME_REJECTED, ResultColumns, Timeline
from sim.step import BatchLog, GraphBatch, check_hints
from traces.trace import Trace

__all__ = ["Simulation", "simulate"]

#: Rows converted from numpy to Python at a time by the arrival process.
_CHUNK = 4096


class _Urgent(Event):
    """An event that fires after ``delay`` ahead of same-time normal events."""

    def __init__(self, env: simpy.Environment, delay: float, callback: Callable | None = None):
        super().__init__(env)
        self._ok = True
        self._value = None
        if callback is not None:
            self.callbacks.append(callback)
        env.schedule(self, URGENT, delay)


class _Driver:
    """One instance's state machine on simpy events.

    Idle, it waits to be woken; busy, it holds the timeout that ends the
    engine's step in progress (``pending``). Cutting a stretch schedules a
    new timeout and drops the old one, which then fires unheeded; this costs
    one event, where interrupting a generator process costs an exception
    round trip and two.
    """

    __slots__ = (
        "engine",
        "id",
        "idle",
        "last_running",
        "last_waiting",
        "pending",
        "seen_version",
        "sim",
    )

    def __init__(self, sim: Simulation, engine: Engine) -> None:
        self.sim = sim
        self.engine = engine
        self.id = engine.instance_id
        self.idle = True
        self.pending: Event | None = None
        self.last_waiting = self.last_running = -1
        self.seen_version = -1

    def wake(self, _ev: Event) -> None:
        self.sim._start_step(self)

    def done(self, ev: Event) -> None:
        if ev is self.pending:
            self.sim._step_done(self)


class Simulation:
    """One run of a trace through a cluster under a policy.

    Args:
        trace: the workload.
        cost: step durations.
        policy: the scheduling policy (reset before the run).
        limits: engine limits of every instance.
        instances: number of mixed instances (ignored with ``pd``).
        pd: ``"P:D"`` prefill/decode split, or None for mixed instances.
        pools: extra named pools (name -> instance ids).
        fast_forward: advance unchanged decode batches in one event.
        debug: check engine invariants after every step (slow).
        progress: called with the number of arrivals handled so far, about
            every ``progress_every`` arrivals.
    """

    def __init__(
        self,
        trace: Trace,
        cost: StepCost,
        policy: Policy,
        limits: EngineLimits,
        *,
        instances: int = 1,
        pd: str | None = None,
        pools: Mapping[str, Sequence[int]] | None = None,
        fast_forward: bool = True,
        debug: bool = False,
        progress: Callable[[int], None] | None = None,
        progress_every: int = 0,
    ) -> None:
        self.trace = trace
        self.cost = cost
        self.policy = policy
        self.limits = limits
        self.env = simpy.Environment()
        n = len(trace)
        self.results = ResultColumns(n)
        self.timeline = Timeline()
        #: One row per prefill or mixed step.
        self.batch_log = BatchLog()
        roles = cluster_roles(instances if pd is None else 0, pd)
        self.cluster = Cluster(
            cost,
            limits,
            roles,
            self.results,
            lambda: self.env.now,
            pools=pools,
            fast_forward=fast_forward,
            debug=debug,
        )
        self.view = self.cluster.view
        self._drivers = [_Driver(self, e) for e in self.cluster.engines]
        self._entry = set(self.cluster.pools["entry"])
        self._decode_pool = self.cluster.view.pool("decode")
        base = Policy
        kind = type(policy)
        self._wants_progress = kind.on_progress is not base.on_progress
        self._picks_decode = kind.select_decode_instance is not base.select_decode_instance
        self._timers: set[float] = set()
        self._progress = progress
        self._progress_every = progress_every or max(1, n // 100)
        self._ran = False

    # -- running ----------------------------------------------------------------

    def run(self) -> SimResult:
        """Run to the last finish and return the results."""
        if self._ran:
            raise RuntimeError("a Simulation runs once; build a new one")
        self._ran = True
        self.policy.reset()
        env = self.env
        env.process(self._arrivals())
        env.run()
        pending = np.flatnonzero(self.results.outcome == OUTCOME_PENDING)
        if len(pending):
            raise RuntimeError(
                f"policy {self.policy.name!r} never dispatched {len(pending)} request(s) "
                f"(first: row {int(pending[0])})"
            )
        return SimResult.from_run(self)

    def _arrivals(self):
        env, policy, view, res = self.env, self.policy, self.view, self.results
        frame = self.trace.frame
        n = len(frame)
        arrival_all = frame["arrival_s"].to_numpy()
        rid_all = frame["request_id"].to_numpy()
        prompt_all = frame["prompt_tokens"].to_numpy()
        output_all = frame["output_tokens"].to_numpy()
        failed_all = frame["failed"].to_numpy()
        extras = _ExtraColumns(frame)
        report, every = self._progress, self._progress_every
        on_arrival, apply = policy.on_arrival, self._apply
        any_failed = bool(failed_all.any())
        for start in range(0, n, _CHUNK):
            stop = min(start + _CHUNK, n)
            arrivals = arrival_all[start:stop].tolist()
            rids = rid_all[start:stop].tolist()
            prompts = prompt_all[start:stop].tolist()
            outputs = output_all[start:stop].tolist()
            failed = failed_all[start:stop].tolist() if any_failed else None
            extra = extras.chunk(start, stop)
            for i in range(stop - start):
                row = start + i
                t = arrivals[i]
                if t > env.now:
                    yield _Urgent(env, t - env.now)
                if report is not None and row % every == 0:
                    report(row)
                if failed is not None and failed[i]:
                    res.outcome[row] = OUTCOME_FAILED
                    continue
                if extra is None:
                    req = SimRequest(row, rids[i], t, prompts[i], outputs[i])
                else:
                    req = SimRequest(row, rids[i], t, prompts[i], outputs[i], *extra(i))
                dec = on_arrival(req, t, view)
                if dec is not NO_DECISIONS:
                    apply(dec)
        if report is not None:
            report(n)

    def _start_step(self, drv: _Driver) -> None:
        """Plan the instance's next step at the current time and wait for its end."""
        env = self.env
        eng = drv.engine
        dur = eng.begin(env.now)
        if dur is None:
            drv.idle = True
            drv.pending = None
            return
        if eng.version != drv.seen_version:
            self._sample(drv)
        ev = env.timeout(dur)
        ev.callbacks.append(drv.done)
        drv.pending = ev

    def _step_done(self, drv: _Driver) -> None:
        """Apply the step that just ended, report it, and plan the next one."""
        eng = drv.engine
        rec = eng.end()
        if rec.n_prefill:
            self.batch_log.record(rec, drv.id)
        if eng.version != drv.seen_version:
            self._sample(drv)
        if rec.handoffs:
            for req in rec.handoffs:
                self._handoff(drv, req)
        if self._wants_progress and rec.changed:
            dec = self.policy.on_progress(drv.id, self.env.now, self.view)
            if dec is not NO_DECISIONS:
                self._apply(dec)
        self._start_step(drv)

    def _sample(self, drv: _Driver) -> None:
        """Record the instance's queue if its waiting or running set changed.

        Hot callers check ``engine.version != drv.seen_version`` first.
        """
        eng = drv.engine
        if eng.version == drv.seen_version:
            return
        drv.seen_version = eng.version
        waiting, running = len(eng.waiting), len(eng.running)
        if waiting != drv.last_waiting or running != drv.last_running:
            drv.last_waiting, drv.last_running = waiting, running
            tl = self.timeline
            tl.time_s.append(self.env.now)
            tl.instance.append(drv.id)
            tl.waiting.append(waiting)
            tl.running.append(running)
            tl.kv_used_tokens.append(eng.kv.used_tokens)

    # -- decisions -----------------------------------------------------------------

    def _apply(self, dec: Decisions) -> None:
        if dec.batches:
            self._apply_batches(dec)
        else:
            for req, target in dec.dispatches:
                self._dispatch(req, target)
        if dec.wake_at_s is not None:
            self._set_timer(dec.wake_at_s)

    def _apply_batches(self, dec: Decisions) -> None:
        """Dispatch in order; the runs the hints cover go to one instance as a graph batch."""
        dispatches = dec.dispatches
        starts = {h.start: h for h in check_hints(self.policy.name, dec.batches, len(dispatches))}
        i = 0
        while i < len(dispatches):
            hint = starts.get(i)
            if hint is None:
                self._dispatch(*dispatches[i])
                i += 1
                continue
            run = dispatches[i : i + hint.count]
            target = run[0][1]
            if any(t != target for _, t in run):
                raise RuntimeError(
                    f"policy {self.policy.name!r} sent the dispatches of one batch hint "
                    f"(from {i}) to different targets"
                )
            target = self._resolve(target)
            group = GraphBatch(hint.padded_tokens, hint.padded_batch)
            for req, _ in run:
                self._dispatch(req, target, group)
            i += hint.count

    def _resolve(self, target: int | str) -> int:
        if isinstance(target, str):
            inst = least_loaded(self.view.pool(target))
            if inst is None:
                raise RuntimeError(f"pool {target!r} has no healthy instance")
            return inst.instance_id
        return target

    def _dispatch(self, req: Any, target: int | str, group: GraphBatch | None = None) -> None:
        now = self.env.now
        if not isinstance(req, SimRequest) or req.state != NEW:
            raise RuntimeError(
                f"policy {self.policy.name!r} dispatched {req!r}, which is not an undispatched "
                "request of this run"
            )
        target = self._resolve(target)
        if target not in self._entry:
            raise RuntimeError(
                f"policy {self.policy.name!r} dispatched request {req.request_id} to instance "
                f"{target!r}, which does not take new requests (entry instances: "
                f"{sorted(self._entry)})"
            )
        drv = self._drivers[target]
        res, row = self.results, req.row
        res.dispatch_s[row] = now
        res.instance[row] = target
        self._enqueue(drv, req, drv.engine.enqueue(req, now, group))

    def _enqueue(self, drv: _Driver, req: SimRequest, status: int) -> None:
        if status == REJECTED:
            self.results.outcome[req.row] = OUTCOME_REJECTED
            req.state = -1
            return
        if drv.engine.version != drv.seen_version:
            self._sample(drv)
        env = self.env
        if drv.idle:
            # Plan at normal priority: after every arrival at this instant.
            drv.idle = False
            env.timeout(0.0).callbacks.append(drv.wake)
        elif status == QUEUED_HEAD:
            new_end = drv.engine.cut(env.now)
            if new_end is not None:
                ev = env.timeout(max(0.0, new_end - env.now))
                ev.callbacks.append(drv.done)
                drv.pending = ev

    def _set_timer(self, at_s: float) -> None:
        if at_s in self._timers:
            return
        self._timers.add(at_s)
        delay = max(0.0, at_s - self.env.now)
        _Urgent(self.env, delay, lambda _ev: self._on_timer(at_s))

    def _on_timer(self, at_s: float) -> None:
        self._timers.discard(at_s)
        dec = self.policy.on_timer(self.env.now, self.view)
        if dec is not NO_DECISIONS:
            self._apply(dec)

    # -- prefill/decode disaggregation -------------------------------------------

    def _handoff(self, drv: _Driver, req: SimRequest) -> None:
        now = self.env.now
        target = None
        if self._picks_decode:
            target = self.policy.select_decode_instance(req, drv.id, now, self.view)
        if target is None:
            inst = least_loaded(self._decode_pool)
            if inst is None:
                raise RuntimeError("no healthy decode instance")
            target = inst.instance_id
        dest = self._drivers[target]
        if dest.engine.role != "decode":
            raise RuntimeError(
                f"policy {self.policy.name!r} chose instance {target} for decoding; "
                f"it is a {dest.engine.role} instance"
            )
        xfer = float(self.cost.kv_transfer_time_s(req.prompt_tokens))
        res, row = self.results, req.row
        res.decode_instance[row] = target
        res.kv_transfer_s[row] = xfer
        dest.engine.announce(req)
        _Urgent(self.env, xfer, lambda _ev: self._land(dest, req))

    def _land(self, dest: _Driver, req: SimRequest) -> None:
        status = dest.engine.enqueue_prefilled(req, self.env.now, announced=True)
        self._enqueue(dest, req, status)


class _ExtraColumns:
    """Optional trace columns, converted chunk by chunk only when a trace has them."""

    __slots__ = ("_block", "_frame", "_hashes", "_session", "_tpot", "_ttft", "_vals")

    def __init__(self, frame: Any) -> None:
        self._frame = frame
        self._session = bool(frame["session_id"].notna().any())
        self._hashes = bool(frame["prefix_hashes"].notna().any())
        self._block = self._hashes
        self._ttft = bool(frame["slo_ttft_s"].notna().any())
        self._tpot = bool(frame["slo_tpot_s"].notna().any())

    def chunk(self, start: int, stop: int) -> Callable[[int], tuple] | None:
        """A row accessor for rows ``[start, stop)``, or None when the trace has no extras."""
        if not (self._session or self._hashes or self._ttft or self._tpot):
            return None
        f = self._frame
        none = [None] * (stop - start)
        session = f["session_id"].iloc[start:stop].tolist() if self._session else none
        if self._hashes:
            hashes = [
                None if h is None else np.asarray(h).tolist()
                for h in f["prefix_hashes"].iloc[start:stop].tolist()
            ]
            block = [
                None if _missing(b) else int(b) for b in f["block_tokens"].iloc[start:stop].tolist()
            ]
        else:
            hashes = block = none
        ttft = _opt_floats(f["slo_ttft_s"], start, stop) if self._ttft else none
        tpot = _opt_floats(f["slo_tpot_s"], start, stop) if self._tpot else none
        session = [None if _missing(s) else str(s) for s in session] if self._session else none

        def row(i: int) -> tuple:
            return session[i], hashes[i], block[i], ttft[i], tpot[i]

        return row


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _opt_floats(series: Any, start: int, stop: int) -> list[float | None]:
    return [None if math.isnan(v) else v for v in series.iloc[start:stop].tolist()]


def simulate(
    trace: Trace,
    cost: StepCost,
    policy: Policy,
    limits: EngineLimits,
    **options: Any,
) -> SimResult:
    """Run ``trace`` through a cluster under ``policy``; see :class:`Simulation` for options."""
    return Simulation(trace, cost, policy, limits, **options).run()
