"""Results of a simulated run: the per-request records, the queue timeline and the summary.

The record schema (``results.parquet``, ``run.json``) is the shared one of
:mod:`traces.records`, and every metric is defined once, over records, in
:mod:`traces.metrics`: :meth:`SimResult.summary` builds the record arrays
and calls :func:`traces.metrics.summarize`, handing it the two figures
records cannot carry, the pooled inter-token-latency histogram and each
instance's busy time (``utilization``).

What the simulator fills in the shared schema, and its simplifications:

* ``send_s`` = ``arrival_s``: the simulated client sends on schedule;
* ``max_tokens``: the trace's ``max_tokens`` column when it has one, else its
  output length (a replayed trace asks for exactly what it will produce);
* ``http_status`` and ``error_message`` are null: no simulated request errs
  on the wire (outcomes are ok, failed by the trace, or rejected);
* per-request ITL figures (``itl_p50_s`` ... ``itl_max_s``) are NaN: the fast
  path prices a stretch of decode steps as a whole and keeps no per-request
  token times (the run-wide ITL histogram is in the summary); ``n_chunks``
  is the output token count of a completed request (one token a step, each
  its own chunk), 0 otherwise;
* ``run.json`` names instances ``instance-<id>`` with no URL, their roles
  from the cluster, and lists every pool (built-in and named) each is in.

Under PD the TTFT splits into ``router_queue_s`` (arrival to dispatch),
``prefill_queue_s`` (dispatch to prefill start), ``prefill_s`` (prefill
start to first token); ``kv_transfer_s`` and ``first_decode_s`` (KV landed
at the decode instance to the end of its first decode step) follow it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

from sim.records import OUTCOME_NAMES, LogHistogram, ResultColumns, Timeline
from sim.step import BATCH_COLUMNS, STEP_COLUMNS, StepLog
from traces import metrics
from traces.metrics import RecordArrays, distribution
from traces.records import RESULT_COLUMNS, InstanceRecord, RunMetadata
from traces.trace import Trace

if TYPE_CHECKING:
    from sim.band import Band

__all__ = [
    "OPTION_KEYS",
    "QUEUE_COLUMNS",
    "RESULT_COLUMNS",
    "FinishedRun",
    "SimResult",
    "distribution",
]

#: Columns of ``queue.parquet``.
QUEUE_COLUMNS: tuple[str, ...] = ("time_s", "instance", "waiting", "running", "kv_used_tokens")

#: Config keys copied into ``run.json``'s ``options`` when the writer passes no
#: options: how the policy was fed (prefix knowledge, polling, batch hints).
OPTION_KEYS: tuple[str, ...] = (
    "prefix_knowledge",
    "poll_interval_s",
    "poll_interval_ms",
    "batch_hints",
)


class FinishedRun(Protocol):
    """What :meth:`SimResult.from_run` reads of a finished simulation (:class:`sim.loop.Simulation`).

    ``cluster`` has ``engines`` (each with ``busy_s``), ``roles``, ``itl``
    (a :class:`sim.records.LogHistogram`) and, optionally, ``pools``; ``policy``
    has ``name``; the run may have ``options`` (how the policy was fed).
    """

    trace: Trace
    cluster: Any
    policy: Any
    results: ResultColumns
    timeline: Timeline
    batch_log: StepLog | None


@dataclass
class SimResult:
    """Everything a run produced; :meth:`frame`, :meth:`summary` and :meth:`write` present it.

    Per-request arrays are in trace row order; ``columns`` holds what the
    run recorded (:class:`sim.records.ResultColumns`).
    """

    policy: str
    roles: tuple[str, ...]
    request_id: np.ndarray
    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    slo_ttft_s: np.ndarray
    slo_tpot_s: np.ndarray
    columns: ResultColumns
    timeline: Timeline
    itl: LogHistogram
    busy_s: np.ndarray
    tokens_out: int
    #: One row per step or decode stretch (:class:`sim.step.StepLog`), when recorded.
    batches: StepLog | None = None
    #: The trace's session ids (object: str or None); all None when absent.
    session_id: np.ndarray | None = None
    #: Requested output budgets; the output lengths when absent.
    max_tokens: np.ndarray | None = None
    #: Pool name -> instance ids, as the cluster defined them.
    pools: Mapping[str, Sequence[int]] | None = None
    #: How the policy was fed (prefix knowledge, poll interval, batch hints), for ``run.json``.
    options: Mapping[str, Any] | None = None
    #: The same run with step costs scaled down and up, when it has a band (:mod:`sim.band`).
    band: Band | None = None

    @classmethod
    def from_run(cls, sim: FinishedRun) -> SimResult:
        """Collect a finished simulation (:class:`sim.loop.Simulation`; see :class:`FinishedRun`)."""
        f = sim.trace.frame
        engines = sim.cluster.engines
        return cls(
            policy=sim.policy.name or type(sim.policy).__name__,
            roles=tuple(sim.cluster.roles),
            request_id=f["request_id"].to_numpy(),
            arrival_s=f["arrival_s"].to_numpy(),
            prompt_tokens=f["prompt_tokens"].to_numpy(),
            output_tokens=f["output_tokens"].to_numpy(),
            slo_ttft_s=f["slo_ttft_s"].to_numpy(dtype=np.float64),
            slo_tpot_s=f["slo_tpot_s"].to_numpy(dtype=np.float64),
            columns=sim.results,
            timeline=sim.timeline,
            itl=sim.cluster.itl,
            busy_s=np.array([e.busy_s for e in engines]),
            tokens_out=sum(e.tokens_out for e in engines),
            batches=sim.batch_log,
            session_id=f["session_id"].to_numpy(dtype=object) if "session_id" in f else None,
            # A trace may carry budgets apart from lengths; else it asks for what it produces.
            max_tokens=f["max_tokens"].to_numpy(dtype=np.int64) if "max_tokens" in f else None,
            pools=getattr(sim.cluster, "pools", None),
            options=getattr(sim, "options", None),
        )

    # -- derived columns (definitions: traces.metrics) -----------------------------

    def records(self) -> RecordArrays:
        """The columns the metrics read (:class:`traces.metrics.RecordArrays`), no copies."""
        c = self.columns
        return RecordArrays(
            arrival_s=self.arrival_s,
            prefill_start_s=c.prefill_start_s,
            first_token_s=c.first_token_s,
            finish_s=c.finish_s,
            prompt_tokens=self.prompt_tokens,
            cached_tokens=c.cached_tokens,
            output_tokens=self.output_tokens,
            outcome=c.outcome,
            n_preemptions=c.n_preemptions,
            slo_ttft_s=self.slo_ttft_s,
            slo_tpot_s=self.slo_tpot_s,
            instance=c.instance,
        )

    @property
    def completed(self) -> np.ndarray:
        """Mask of requests served to the end."""
        return metrics.completed(self.records())

    @property
    def ttft_s(self) -> np.ndarray:
        return metrics.ttft_s(self.records())

    @property
    def e2e_s(self) -> np.ndarray:
        return metrics.e2e_s(self.records())

    @property
    def tpot_s(self) -> np.ndarray:
        return metrics.tpot_s(self.records())

    @property
    def queue_delay_s(self) -> np.ndarray:
        return metrics.queue_delay_s(self.records())

    @property
    def duration_s(self) -> float:
        """Last finish minus first arrival (0 when nothing completed)."""
        return metrics.duration_s(self.records())

    def frame(self) -> pd.DataFrame:
        """One row per request, :data:`RESULT_COLUMNS` (the ``results.parquet`` schema).

        Simulator specifics (send time, budgets, ITL figures, chunks): see
        the module docstring.
        """
        c = self.columns
        n = len(self.arrival_s)
        r = self.records()
        index = pd.RangeIndex(n)
        no_text = pd.Series(pd.NA, index=index, dtype="string")
        session = (
            no_text
            if self.session_id is None
            else pd.Series(self.session_id, index=index, dtype=object).astype("string")
        )
        done = metrics.completed(r)
        no_itl = np.full(n, np.nan)
        data: dict[str, Any] = {
            "request_id": self.request_id,
            "arrival_s": self.arrival_s,
            "send_s": self.arrival_s.copy(),
            "dispatch_s": c.dispatch_s,
            "prefill_start_s": c.prefill_start_s,
            "first_token_s": c.first_token_s,
            "finish_s": c.finish_s,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": c.cached_tokens,
            "output_tokens": self.output_tokens,
            "max_tokens": self.output_tokens if self.max_tokens is None else self.max_tokens,
            "session_id": session,
            "instance": c.instance,
            "decode_instance": c.decode_instance,
            "policy": pd.Categorical([self.policy] * n) if n else pd.Categorical([]),
            "outcome": pd.Categorical.from_codes(c.outcome.astype(np.int8), OUTCOME_NAMES),
            "http_status": pd.Series(pd.NA, index=index, dtype="Int32"),
            "error_message": no_text,
            "n_preemptions": c.n_preemptions,
            "slo_ttft_s": self.slo_ttft_s,
            "slo_tpot_s": self.slo_tpot_s,
            "ttft_s": metrics.ttft_s(r),
            "tpot_s": metrics.tpot_s(r),
            "e2e_s": metrics.e2e_s(r),
            "router_queue_s": c.dispatch_s - self.arrival_s,
            "prefill_queue_s": c.prefill_start_s - c.dispatch_s,
            "prefill_s": c.first_token_s - c.prefill_start_s,
            "kv_transfer_s": c.kv_transfer_s,
            "first_decode_s": c.first_decode_s,
            "itl_p50_s": no_itl,
            "itl_p90_s": no_itl,
            "itl_p99_s": no_itl,
            "itl_max_s": no_itl,
            # One token per step, each step's token its own chunk.
            "n_chunks": np.where(done, self.output_tokens, 0).astype(np.int64),
        }
        return pd.DataFrame(data, index=index, columns=list(RESULT_COLUMNS))

    def batches_frame(self) -> pd.DataFrame:
        """One row per prefill or mixed step, :data:`sim.step.BATCH_COLUMNS`.

        Batch sizes (``n_prefill``), new tokens, the tokens the step's shape
        computed, padding, and CUDA-graph use; empty when not recorded.
        """
        log = self.batches if self.batches is not None else StepLog()
        return pd.DataFrame(log.columns(prefills_only=True), columns=list(BATCH_COLUMNS))

    def steps_frame(self) -> pd.DataFrame:
        """One row per engine step (a decode stretch as one), :data:`sim.step.STEP_COLUMNS`.

        Every step of every policy (``steps.parquet``); the column meanings
        are :class:`sim.step.StepLog`'s. Empty when not recorded.
        """
        log = self.batches if self.batches is not None else StepLog()
        return pd.DataFrame(log.columns(), columns=list(STEP_COLUMNS))

    def queue_frame(self) -> pd.DataFrame:
        """The queue timeline, :data:`QUEUE_COLUMNS` (the ``queue.parquet`` schema)."""
        return pd.DataFrame(self.timeline.columns(), columns=list(QUEUE_COLUMNS))

    def run_metadata(self, options: Mapping[str, Any] | None = None) -> RunMetadata:
        """The ``run.json`` of this run (source ``simulator``; module docstring)."""
        pools = self.pools or {}
        instances = [
            InstanceRecord(
                id=i,
                name=f"instance-{i}",
                role=role,  # type: ignore[arg-type]  # the cluster validated the roles
                pools=[name for name, ids in pools.items() if i in ids],
            )
            for i, role in enumerate(self.roles)
        ]
        return RunMetadata(source="simulator", instances=instances, options=dict(options or {}))

    # -- summary -------------------------------------------------------------------

    def slo_met(self, slo_ttft_s: float | None, slo_tpot_s: float | None) -> np.ndarray:
        """Mask of completed requests meeting both SLOs (per-request SLOs win)."""
        return metrics.slo_met(self.records(), slo_ttft_s, slo_tpot_s)

    def summary(
        self, slo_ttft_s: float | None = None, slo_tpot_s: float | None = None
    ) -> dict[str, Any]:
        """The run's headline numbers (:func:`traces.metrics.summarize`), with ITL and utilization;
        with a band, each figure's ``<key>_lo`` and ``<key>_hi`` (:meth:`sim.band.Band.summary`)."""
        out = metrics.summarize(
            self.records(),
            slo_ttft_s,
            slo_tpot_s,
            policy=self.policy,
            roles=self.roles,
            itl=self.itl,
            busy_s=self.busy_s.tolist(),
        )
        if self.band is not None:
            out |= self.band.summary(slo_ttft_s, slo_tpot_s)
        return out

    def write(
        self,
        out_dir: str | Path,
        *,
        slo_ttft_s: float | None = None,
        slo_tpot_s: float | None = None,
        config: dict[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        steps: bool = False,
    ) -> dict[str, Path]:
        """Write ``results.parquet``, ``summary.json``, ``queue.parquet`` and ``run.json``.

        ``steps``: also ``steps.parquet``, one row per engine step
        (:meth:`steps_frame`).

        ``config`` (how the run was set up) is stored under ``"config"`` in
        the summary. ``options`` (how the policy was fed) go into
        ``run.json``; without them, the run's own :attr:`options`, else the
        :data:`OPTION_KEYS` found in ``config`` (or its ``options`` mapping).
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "results": out / "results.parquet",
            "summary": out / "summary.json",
            "queue": out / "queue.parquet",
        }
        self.frame().to_parquet(paths["results"], index=False)
        self.queue_frame().to_parquet(paths["queue"], index=False)
        if steps:
            paths["steps"] = out / "steps.parquet"
            self.steps_frame().to_parquet(paths["steps"], index=False)
        summary = self.summary(slo_ttft_s, slo_tpot_s)
        if config is not None:
            summary["config"] = config
        summary = _json_safe(summary)
        paths["summary"].write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
        if options is None:
            options = self.options if self.options is not None else _options_from(config)
        paths["run"] = self.run_metadata(_json_safe(dict(options))).write(out)
        return paths


def _options_from(config: Mapping[str, Any] | None) -> dict[str, Any]:
    if not config:
        return {}
    given = config.get("options")
    if isinstance(given, Mapping):
        return dict(given)
    return {k: config[k] for k in OPTION_KEYS if k in config}


def _json_safe(value: Any) -> Any:
    """NaN and infinities become null (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value
