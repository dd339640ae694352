"""The simulated run: a simpy event loop around the instance drivers and the policy.

Processes and events:

* one process walks the trace's columns and hands each arrival to the
  policy (``Policy.on_arrival``), applying its decisions at once;
* each instance is an :class:`sim.driver.InstanceDriver` on a
  :class:`sim.simpy_timer.SimpyTimer`: the same clock-agnostic driver the emulated backend
  runs on the wall clock. This module is its observer: it records the
  results, samples the queues, picks decode instances for hand-offs and
  tells the policy of progress;
* timers the policy asks for, KV transfers under PD, and polls of the
  backend gauges (``poll_interval_s``) are single events.

Same-time order: arrivals, timers, KV-transfer landings and polls run before
any instance plans a step at the same instant (simpy's urgent priority), so
a step planned at ``t`` sees everything that arrived at ``t``; the driver's
cut of a decode stretch then makes the fast path give the same times as
``fast_forward=False``.

What the policy is told is what a router could know (:mod:`scheduler.policy`):
by default its views estimate cached prefixes from a record of what was
sent where, not from the engines' caches (``prefix_knowledge="oracle"``
reads the caches, for research), and with ``poll_interval_s`` the backend
gauges (waiting, running, KV use) are as of the last poll.

Prefill/decode disaggregation: a dispatch to a plain target leaves the
decode instance to be chosen at hand-off (vLLM's flow:
:meth:`scheduler.policy.Policy.select_decode_instance`, else the least
loaded decode instance); a :class:`scheduler.policy.PDTarget` names the pair
at dispatch (SGLang's flow), and the decode instance counts the request as
in flight from then.

Batch hints (:attr:`scheduler.policy.Decisions.batches`): the dispatches a
hint covers go to one instance (a pool target is resolved once for all of
them). With ``batch_hints="graph"`` they are enqueued there as one
:class:`sim.step.GraphBatch` (one captured CUDA-graph prefill: needs an
engine that replays prefill graphs); with ``"group"`` they are released
together as ordinary requests, so a stock engine batches them in one step
as it batches any arrivals, priced eagerly. Every step (a decode stretch as
one) is logged (:attr:`Simulation.batch_log`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from scheduler.cost_model import StepCost
from scheduler.policy import NO_DECISIONS, Decisions, PDTarget, Policy, least_loaded
from sim.cluster import PREFIX_KNOWLEDGE, Cluster, cluster_roles
from sim.driver import InstanceDriver
from sim.inflight import NEW, SimRequest
from sim.limits import EngineLimits
from sim.metrics import SimResult
from sim.records import (
    OUTCOME_FAILED,
    OUTCOME_OK,
    OUTCOME_PENDING,
    OUTCOME_REJECTED,
    ResultColumns,
    Timeline,
)
from sim.simpy_timer import SimpyTimer, Urgent
from sim.step import GraphBatch, StepLog, StepRecord, check_hints
from traces.errors import ConfigError
from traces.trace import Trace

__all__ = ["BATCH_HINT_MODES", "PREFIX_KNOWLEDGE", "SimpyTimer", "Simulation", "simulate"]

#: What a batch hint does: ``graph`` (one captured CUDA-graph prefill, an
#: engine patch) or ``group`` (released together to a stock engine).
BATCH_HINT_MODES: tuple[str, ...] = ("graph", "group")

#: Rows converted from numpy to Python at a time by the arrival process.
_CHUNK = 4096


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
        prefix_knowledge: one of :data:`sim.cluster.PREFIX_KNOWLEDGE`.
        poll_interval_s: seconds between polls of the backend gauges the
            policy sees (0: read live).
        batch_hints: one of :data:`BATCH_HINT_MODES`.
        fast_forward: advance unchanged decode batches in one event.
        debug: check engine invariants after every step (slow).
        progress: called with the number of arrivals handled so far, about
            every ``progress_every`` arrivals.

    Raises:
        ConfigError: an option outside its choices.
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
        prefix_knowledge: str = "estimate",
        poll_interval_s: float = 0.0,
        batch_hints: str = "graph",
        fast_forward: bool = True,
        debug: bool = False,
        progress: Callable[[int], None] | None = None,
        progress_every: int = 0,
    ) -> None:
        if batch_hints not in BATCH_HINT_MODES:
            raise ConfigError(
                f"batch_hints: expected one of {', '.join(BATCH_HINT_MODES)}; got {batch_hints!r}"
            )
        self.trace = trace
        self.cost = cost
        self.policy = policy
        self.limits = limits
        self.env = self.timer = SimpyTimer()
        n = len(trace)
        self.results = ResultColumns(n)
        self.timeline = Timeline()
        #: One row per step or decode stretch (:class:`sim.step.StepLog`).
        self.batch_log = StepLog()
        #: How the policy was fed, for the run's records.
        self.options = {
            "prefix_knowledge": prefix_knowledge,
            "poll_interval_s": poll_interval_s,
            "batch_hints": batch_hints,
        }
        roles = cluster_roles(instances if pd is None else 0, pd)
        self.cluster = Cluster(
            cost,
            limits,
            roles,
            lambda: self.env.now,
            pools=pools,
            fast_forward=fast_forward,
            debug=debug,
            prefix_knowledge=prefix_knowledge,  # type: ignore[arg-type]
            poll_interval_s=poll_interval_s,
        )
        self.view = self.cluster.view
        self._drivers = [InstanceDriver(e, self.timer, self) for e in self.cluster.engines]
        # Last sampled waiting and running counts: a sample is kept only when one changes.
        self._last_waiting = [-1] * len(self._drivers)
        self._last_running = [-1] * len(self._drivers)
        self._entry = set(self.cluster.pools["entry"])
        self._decode_pool = self.cluster.view.pool("decode")
        base = Policy
        kind = type(policy)
        self._wants_progress = kind.on_progress is not base.on_progress
        self._picks_decode = kind.select_decode_instance is not base.select_decode_instance
        self._graph_hints = batch_hints == "graph"
        self._estimate = prefix_knowledge == "estimate"
        self._poll_s = poll_interval_s
        self._polled = poll_interval_s > 0
        self._timers: set[float] = set()
        self._health_changes: list[tuple[float, int, bool]] = []
        self._arrivals_done = False
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
        if self._poll_s > 0:
            self._poll()
        for at_s, instance_id, healthy in self._health_changes:
            env.call_at(
                at_s, lambda i=instance_id, h=healthy: self._set_health(i, h), before_steps=True
            )
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
                    yield Urgent(env, t - env.now)
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
        self._arrivals_done = True
        if report is not None:
            report(n)

    def schedule_health(self, at_s: float, instance_id: int, healthy: bool) -> None:
        """Mark an instance unhealthy (or healthy again) at ``at_s``, before :meth:`run`.

        The router stops (or resumes) sending it requests and the policy is
        told (:meth:`scheduler.policy.Policy.on_health`); the instance keeps
        serving what it already has, as a server failing its health checks
        may.

        Raises:
            ConfigError: an unknown instance.
        """
        if not 0 <= instance_id < len(self._drivers):
            raise ConfigError(
                f"health change: no instance {instance_id} (instances 0-{len(self._drivers) - 1})"
            )
        self._health_changes.append((float(at_s), instance_id, bool(healthy)))

    def _set_health(self, instance_id: int, healthy: bool) -> None:
        self.cluster.set_healthy(instance_id, healthy)
        dec = self.policy.on_health(instance_id, healthy, self.env.now, self.view)
        if dec is not NO_DECISIONS:
            self._apply(dec)

    def _poll(self) -> None:
        """Snapshot the backend gauges, and poll again while anything can still happen.

        A poll that changes what the policy reads of an instance is progress
        there (the router tells its policy so too): a policy waiting for a
        queue to drain hears of it.
        """
        views = self.cluster.views
        before = [v.polled() for v in views] if self._wants_progress else None
        self.cluster.poll(self.env.now)
        if before is not None:
            for v, old in zip(views, before, strict=True):
                if v.polled() != old:
                    dec = self.policy.on_progress(v.instance_id, self.env.now, self.view)
                    if dec is not NO_DECISIONS:
                        self._apply(dec)
        busy = any(not d.idle or d.engine.incoming for d in self._drivers)
        if busy or self._timers or not self._arrivals_done:
            self.timer.call_at(self.env.now + self._poll_s, self._poll, before_steps=True)

    # -- what the drivers report (sim.driver.StepObserver) -------------------------

    def step_done(self, drv: InstanceDriver, rec: StepRecord) -> None:
        res, t = self.results, rec.end_s
        self.batch_log.record(rec, drv.id)
        if rec.started:
            start, cached = res.prefill_start_s, res.cached_tokens
            for req in rec.started:
                start[req.row] = rec.start_s
                cached[req.row] = req.cached_tokens
        if rec.first_tokens:
            first = res.first_token_s
            for req in rec.first_tokens:
                first[req.row] = t
            view = self.cluster.views[drv.id]
            for req in rec.first_tokens:
                view.note_first(req.prompt_tokens)
        if rec.finished:
            finish, outcome, preempt = res.finish_s, res.outcome, res.n_preemptions
            for req in rec.finished:
                row = req.row
                finish[row] = t
                outcome[row] = OUTCOME_OK
                preempt[row] = req.n_preemptions
        if rec.first_decodes:
            for req in rec.first_decodes:
                res.first_decode_s[req.row] = req.first_decode_s
        if rec.handoffs:
            for req in rec.handoffs:
                self._handoff(drv, req)
        if self._wants_progress and rec.changed:
            dec = self.policy.on_progress(drv.id, self.env.now, self.view)
            if dec is not NO_DECISIONS:
                self._apply(dec)

    def rejected(self, drv: InstanceDriver, req: SimRequest) -> None:
        self.results.outcome[req.row] = OUTCOME_REJECTED
        if drv.engine.role != "decode":  # it was counted as sent there
            self.cluster.views[drv.id].note_first(req.prompt_tokens)
        req.state = -1
        if req.pd_decode >= 0:
            # Told at dispatch, the decode instance stops counting it.
            self._drivers[req.pd_decode].engine.unannounce(req)

    def changed(self, drv: InstanceDriver) -> None:
        """Record the instance's queue if its waiting or running count changed."""
        eng, i = drv.engine, drv.id
        waiting, running = len(eng.waiting), len(eng.running)
        if waiting != self._last_waiting[i] or running != self._last_running[i]:
            self._last_waiting[i], self._last_running[i] = waiting, running
            tl = self.timeline
            tl.time_s.append(self.env.now)
            tl.instance.append(i)
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
        """Dispatch in order; the runs the hints cover go to one instance together."""
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
            if isinstance(target, PDTarget):
                target = PDTarget(self._resolve(target.prefill), self._resolve(target.decode))
            else:
                target = self._resolve(target)
            group = GraphBatch(hint.padded_tokens, hint.padded_batch) if self._graph_hints else None
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

    def _dispatch(
        self, req: Any, target: int | str | PDTarget, group: GraphBatch | None = None
    ) -> None:
        if not isinstance(req, SimRequest) or req.state != NEW:
            raise RuntimeError(
                f"policy {self.policy.name!r} dispatched {req!r}, which is not an undispatched "
                "request of this run"
            )
        decode = -1
        if type(target) is not int:
            if isinstance(target, PDTarget):
                decode = self._decode_target(self._resolve(target.decode))
                target = target.prefill
            target = self._resolve(target)
        if target not in self._entry:
            raise RuntimeError(
                f"policy {self.policy.name!r} dispatched request {req.request_id} to instance "
                f"{target!r}, which does not take new requests (entry instances: "
                f"{sorted(self._entry)})"
            )
        drv = self._drivers[target]
        res, row = self.results, req.row
        res.dispatch_s[row] = self.env.now
        res.instance[row] = target
        self.cluster.note_dispatch(target, req, self.env.now)
        if decode >= 0:
            if drv.engine.role != "prefill":
                raise RuntimeError(
                    f"policy {self.policy.name!r} named a prefill/decode pair for request "
                    f"{req.request_id}, but instance {target} is a {drv.engine.role} instance"
                )
            req.pd_decode = decode
            self._drivers[decode].engine.announce(req)
        drv.submit(req, group)

    def _set_timer(self, at_s: float) -> None:
        if at_s in self._timers:
            return
        self._timers.add(at_s)
        self.timer.call_at(at_s, lambda: self._on_timer(at_s), before_steps=True)

    def _on_timer(self, at_s: float) -> None:
        self._timers.discard(at_s)
        dec = self.policy.on_timer(self.env.now, self.view)
        if dec is not NO_DECISIONS:
            self._apply(dec)

    # -- prefill/decode disaggregation -------------------------------------------

    def _decode_target(self, target: int) -> int:
        """``target``, checked to be a decode instance."""
        role = self._drivers[target].engine.role
        if role != "decode":
            raise RuntimeError(
                f"policy {self.policy.name!r} chose instance {target} for decoding; "
                f"it is a {role} instance"
            )
        return target

    def _handoff(self, drv: InstanceDriver, req: SimRequest) -> None:
        announced = req.pd_decode >= 0
        if announced:
            target = req.pd_decode
        else:
            target = None
            if self._picks_decode:
                target = self.policy.select_decode_instance(req, drv.id, self.env.now, self.view)
            if target is None:
                inst = least_loaded(self._decode_pool)
                if inst is None:
                    raise RuntimeError("no healthy decode instance")
                target = inst.instance_id
            target = self._decode_target(target)
        xfer = float(self.cost.kv_transfer_time_s(req.prompt_tokens))
        res, row = self.results, req.row
        res.decode_instance[row] = target
        res.kv_transfer_s[row] = xfer
        drv.hand_off(req, self._drivers[target], xfer, announced=announced)


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
