"""Results of a run: the per-request record, the queue timeline and the summary.

Every metric is defined here, once:

* ``ttft_s`` = first_token_s - arrival_s;
* ``tpot_s`` = (finish_s - first_token_s) / (output_tokens - 1), for
  requests with more than one output token;
* ``itl_s``: gaps between a request's consecutive tokens as the client sees
  them (a decode step's duration, plus any prefill steps that stalled it),
  one sample per token after the first; streamed into a log-binned
  histogram, so its quantiles are exact to about 1 %;
* ``e2e_s`` = finish_s - arrival_s;
* ``queue_delay_s`` = prefill_start_s - arrival_s (held by the router, then
  queued on the instance);
* ``duration_s`` = last finish - first arrival; throughputs divide by it;
* ``slo_attainment``: share of completed requests meeting both the TTFT and
  the TPOT SLO (a request's own ``slo_*`` columns override the run's; a
  request with one output token has no TPOT to miss; an SLO unset
  everywhere is not checked); ``goodput_rps`` counts those per second;
* ``utilization``: per instance, the share of ``duration_s`` spent running steps.

Under PD the TTFT splits into ``router_queue_s`` (arrival to dispatch),
``prefill_queue_s`` (dispatch to prefill start), ``prefill_s`` (prefill
start to first token); ``kv_transfer_s`` and ``first_decode_s`` (KV landed
at the decode instance to the end of its first decode step) follow it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sim.records import (
    OUTCOME_FAILED,
    OUTCOME_NAMES,
    OUTCOME_OK,
    OUTCOME_REJECTED,
    LogHistogram,
    ResultColumns,
    Timeline,
)
from sim.step import BATCH_COLUMNS, BatchLog

if TYPE_CHECKING:
    from sim.loop import Simulation

__all__ = ["QUEUE_COLUMNS", "RESULT_COLUMNS", "SimResult", "distribution"]

#: Columns of ``results.parquet``, in order.
RESULT_COLUMNS: tuple[str, ...] = (
    "request_id",
    "arrival_s",
    "dispatch_s",
    "prefill_start_s",
    "first_token_s",
    "finish_s",
    "prompt_tokens",
    "cached_tokens",
    "output_tokens",
    "instance",
    "decode_instance",
    "policy",
    "outcome",
    "n_preemptions",
    "ttft_s",
    "tpot_s",
    "e2e_s",
    "router_queue_s",
    "prefill_queue_s",
    "prefill_s",
    "kv_transfer_s",
    "first_decode_s",
)

#: Columns of ``queue.parquet``.
QUEUE_COLUMNS: tuple[str, ...] = ("time_s", "instance", "waiting", "running", "kv_used_tokens")

_QUANTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99))


def distribution(prefix: str, values: np.ndarray) -> dict[str, float]:
    """``{prefix}_mean_s``, ``_p50_s``, ``_p90_s``, ``_p99_s`` of ``values`` (NaN when empty)."""
    values = values[~np.isnan(values)]
    out = {f"{prefix}_mean_s": float(values.mean()) if len(values) else math.nan}
    for name, q in _QUANTILES:
        out[f"{prefix}_{name}_s"] = float(np.quantile(values, q)) if len(values) else math.nan
    return out


@dataclass
class SimResult:
    """Everything a run produced; :meth:`frame`, :meth:`summary` and :meth:`write` present it."""

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
    #: One row per prefill or mixed step (:class:`sim.step.BatchLog`), when recorded.
    batches: BatchLog | None = None

    @classmethod
    def from_run(cls, sim: Simulation) -> SimResult:
        """Collect a finished :class:`sim.loop.Simulation`."""
        f = sim.trace.frame
        engines = sim.cluster.engines
        return cls(
            policy=sim.policy.name or type(sim.policy).__name__,
            roles=sim.cluster.roles,
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
        )

    # -- derived columns -----------------------------------------------------------

    @property
    def completed(self) -> np.ndarray:
        """Mask of requests served to the end."""
        return self.columns.outcome == OUTCOME_OK

    @property
    def ttft_s(self) -> np.ndarray:
        return self.columns.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> np.ndarray:
        return self.columns.finish_s - self.arrival_s

    @property
    def tpot_s(self) -> np.ndarray:
        c = self.columns
        steps = self.output_tokens - 1
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(steps > 0, (c.finish_s - c.first_token_s) / steps, np.nan)

    @property
    def queue_delay_s(self) -> np.ndarray:
        return self.columns.prefill_start_s - self.arrival_s

    @property
    def duration_s(self) -> float:
        """Last finish minus first arrival (0 when nothing completed)."""
        done = self.completed
        if not done.any():
            return 0.0
        return float(np.max(self.columns.finish_s[done]) - np.min(self.arrival_s))

    def frame(self) -> pd.DataFrame:
        """One row per request, :data:`RESULT_COLUMNS` (the ``results.parquet`` schema)."""
        c = self.columns
        n = len(self.arrival_s)
        data: dict[str, Any] = {
            "request_id": self.request_id,
            "arrival_s": self.arrival_s,
            "dispatch_s": c.dispatch_s,
            "prefill_start_s": c.prefill_start_s,
            "first_token_s": c.first_token_s,
            "finish_s": c.finish_s,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": c.cached_tokens,
            "output_tokens": self.output_tokens,
            "instance": c.instance,
            "decode_instance": c.decode_instance,
            "policy": pd.Categorical([self.policy] * n) if n else pd.Categorical([]),
            "outcome": pd.Categorical.from_codes(c.outcome.astype(np.int8), OUTCOME_NAMES),
            "n_preemptions": c.n_preemptions,
            "ttft_s": self.ttft_s,
            "tpot_s": self.tpot_s,
            "e2e_s": self.e2e_s,
            "router_queue_s": c.dispatch_s - self.arrival_s,
            "prefill_queue_s": c.prefill_start_s - c.dispatch_s,
            "prefill_s": c.first_token_s - c.prefill_start_s,
            "kv_transfer_s": c.kv_transfer_s,
            "first_decode_s": c.first_decode_s,
        }
        return pd.DataFrame(data, columns=list(RESULT_COLUMNS))

    def batches_frame(self) -> pd.DataFrame:
        """One row per prefill or mixed step, :data:`sim.step.BATCH_COLUMNS`.

        Batch sizes (``n_prefill``), new tokens, the tokens the step's shape
        computed, padding, and CUDA-graph use; empty when not recorded.
        """
        cols = self.batches.columns() if self.batches is not None else BatchLog().columns()
        return pd.DataFrame(cols, columns=list(BATCH_COLUMNS))

    def queue_frame(self) -> pd.DataFrame:
        """The queue timeline, :data:`QUEUE_COLUMNS` (the ``queue.parquet`` schema)."""
        return pd.DataFrame(self.timeline.columns(), columns=list(QUEUE_COLUMNS))

    # -- summary -------------------------------------------------------------------

    def slo_met(self, slo_ttft_s: float | None, slo_tpot_s: float | None) -> np.ndarray:
        """Mask of completed requests meeting both SLOs (per-request SLOs win)."""
        ttft_lim = _limits(self.slo_ttft_s, slo_ttft_s)
        tpot_lim = _limits(self.slo_tpot_s, slo_tpot_s)
        with np.errstate(invalid="ignore"):
            ttft_ok = np.isnan(ttft_lim) | (self.ttft_s <= ttft_lim)
            tpot = self.tpot_s
            tpot_ok = np.isnan(tpot_lim) | np.isnan(tpot) | (tpot <= tpot_lim)
        return self.completed & ttft_ok & tpot_ok

    def summary(
        self, slo_ttft_s: float | None = None, slo_tpot_s: float | None = None
    ) -> dict[str, Any]:
        """The run's headline numbers, under stable snake_case keys (seconds, tokens, rates)."""
        done = self.completed
        c = self.columns
        n_done = int(done.sum())
        duration = self.duration_s
        rate = (lambda x: x / duration) if duration > 0 else (lambda x: math.nan)
        met = int(self.slo_met(slo_ttft_s, slo_tpot_s).sum())
        # Without any SLO, attainment and goodput are undefined, not 100%.
        has_slo = (
            slo_ttft_s is not None
            or slo_tpot_s is not None
            or not np.isnan(self.slo_ttft_s).all()
            or not np.isnan(self.slo_tpot_s).all()
        )
        out: dict[str, Any] = {
            "policy": self.policy,
            "n_instances": len(self.roles),
            "roles": list(self.roles),
            "n_requests": len(self.arrival_s),
            "n_completed": n_done,
            "n_failed": int((c.outcome == OUTCOME_FAILED).sum()),
            "n_rejected": int((c.outcome == OUTCOME_REJECTED).sum()),
            "duration_s": duration,
        }
        out |= distribution("ttft", self.ttft_s[done])
        out |= distribution("tpot", self.tpot_s[done])
        itl = self.itl
        out["itl_mean_s"] = itl.mean
        for name, q in _QUANTILES:
            out[f"itl_{name}_s"] = itl.quantile(q)
        out |= distribution("e2e", self.e2e_s[done])
        out |= distribution("queue_delay", self.queue_delay_s[done])
        prompt = int(self.prompt_tokens[done].sum())
        out |= {
            "throughput_rps": rate(n_done),
            "input_tokens_per_s": rate(prompt),
            "output_tokens_per_s": rate(int(self.output_tokens[done].sum())),
            "slo_ttft_s": slo_ttft_s,
            "slo_tpot_s": slo_tpot_s,
            "slo_attainment": met / n_done if n_done and has_slo else math.nan,
            "goodput_rps": rate(met) if has_slo else math.nan,
            "prefix_hit_rate": int(c.cached_tokens[done].sum()) / prompt if prompt else math.nan,
            "n_preemptions": int(c.n_preemptions.sum()),
            "utilization": [float(b / duration) if duration > 0 else math.nan for b in self.busy_s],
        }
        return out

    def write(
        self,
        out_dir: str | Path,
        *,
        slo_ttft_s: float | None = None,
        slo_tpot_s: float | None = None,
        config: dict[str, Any] | None = None,
    ) -> dict[str, Path]:
        """Write ``results.parquet``, ``summary.json`` and ``queue.parquet`` into ``out_dir``.

        ``config`` (how the run was set up) is stored under ``"config"`` in the summary.
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
        summary = self.summary(slo_ttft_s, slo_tpot_s)
        if config is not None:
            summary["config"] = config
        summary = _json_safe(summary)
        paths["summary"].write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
        return paths


def _limits(per_request: np.ndarray, default: float | None) -> np.ndarray:
    fill = math.nan if default is None else float(default)
    return np.where(np.isnan(per_request), fill, per_request)


def _json_safe(value: Any) -> Any:
    """NaN and infinities become null (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value
