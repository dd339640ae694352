"""Metrics over result records, defined once for every driver.

The input is a run's records (:mod:`traces.records`): a ``results.parquet``
frame, or the same columns as arrays (:class:`RecordArrays`, what the
simulator builds without a DataFrame). Definitions:

* ``ttft_s`` = first_token_s - arrival_s (from the *scheduled* arrival, so a
  live client that sends late is charged its lag, as a user would be);
* ``tpot_s`` = (finish_s - first_token_s) / (output_tokens - 1), for
  requests with more than one output token;
* ``itl_s``: gaps between a request's consecutive tokens as the client sees
  them, one sample per token after the first. Pooled over a run they come
  from a quantile sketch the writer kept while running (:class:`LogHistogram`:
  log-spaced bins, quantiles exact to about 1 %; a stretch of simulated
  decode steps adds its arithmetic sequence of durations in time
  proportional to the bins it spans, not to its length); records alone
  carry only per-request figures, which do not pool into run percentiles,
  so without a sketch the ITL keys are NaN;
* ``e2e_s`` = finish_s - arrival_s;
* ``queue_delay_s`` = prefill_start_s - arrival_s (held by the router, then
  queued on the instance; NaN where the writer cannot see prefill start);
* ``duration_s`` = last finish of a completed request - first arrival;
  throughputs divide by it;
* ``slo_attainment``: share of completed requests meeting both the TTFT and
  the TPOT SLO (a request's own ``slo_*`` columns override the run's; a
  request with one output token has no TPOT to miss; an SLO unset
  everywhere is not checked; with no SLO at all it is NaN, not 100 %);
  ``goodput_rps`` counts those requests per second of ``duration_s``;
* ``prefix_hit_rate``: cached over prompt tokens of completed requests;
* ``utilization``: per instance, the share of ``duration_s`` spent running
  steps (only a writer that knows busy time has it; NaN otherwise).

Percentiles interpolate linearly between samples (``numpy.quantile``).
Only completed requests (outcome ``ok``) enter the latency distributions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from traces.histogram import LogHistogram, QuantileSketch
from traces.records import (
    OUTCOME_CANCELLED,
    OUTCOME_ERROR,
    OUTCOME_FAILED,
    OUTCOME_OK,
    OUTCOME_REJECTED,
    OUTCOME_TIMEOUT,
    outcome_codes,
)

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "QUANTILES",
    "WRITER_ONLY_KEYS",
    "LogHistogram",
    "QuantileSketch",
    "RecordArrays",
    "completed",
    "distribution",
    "duration_s",
    "e2e_s",
    "has_slo",
    "queue_delay_s",
    "slo_met",
    "summarize",
    "tpot_s",
    "ttft_s",
]

#: Summary keys that records alone cannot give: they need the writer's ITL
#: sketch or its busy time, so a summary recomputed from records keeps them
#: from the one the writer left, where there is one.
WRITER_ONLY_KEYS: tuple[str, ...] = (
    "itl_mean_s",
    "itl_p50_s",
    "itl_p90_s",
    "itl_p99_s",
    "utilization",
)

#: Summary quantiles: key suffix and level.
QUANTILES: tuple[tuple[str, float], ...] = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99))


@dataclass(frozen=True)
class RecordArrays:
    """The record columns the metrics read, one numpy array each, one entry per request.

    Times are float64 seconds (NaN when unset), token counts int64,
    ``outcome`` int8 codes (:data:`traces.records.OUTCOME_NAMES`),
    ``instance`` int (-1: none), per-request SLOs float64 (NaN: none).
    """

    arrival_s: np.ndarray
    prefill_start_s: np.ndarray
    first_token_s: np.ndarray
    finish_s: np.ndarray
    prompt_tokens: np.ndarray
    cached_tokens: np.ndarray
    output_tokens: np.ndarray
    outcome: np.ndarray
    n_preemptions: np.ndarray
    slo_ttft_s: np.ndarray
    slo_tpot_s: np.ndarray
    instance: np.ndarray

    def __len__(self) -> int:
        return len(self.arrival_s)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> RecordArrays:
        """Read a records frame; columns beyond the required ones may be missing.

        Missing columns take their "unknown" value: NaN times and SLOs, zero
        cached tokens and preemptions, instance -1, and outcomes inferred
        from the finish time (:func:`traces.records.outcome_codes`).
        """
        import pandas as pd  # records frames only; arrays need no pandas

        n = len(frame)

        def floats(name: str) -> np.ndarray:
            if name not in frame.columns:
                return np.full(n, np.nan)
            series = pd.to_numeric(frame[name]).astype("float64")
            return series.to_numpy(dtype=np.float64, na_value=np.nan)

        def ints(name: str, fill: int) -> np.ndarray:
            if name not in frame.columns:
                return np.full(n, fill, dtype=np.int64)
            return pd.to_numeric(frame[name]).fillna(fill).to_numpy(dtype=np.int64)

        finish = floats("finish_s")
        outcomes = frame["outcome"] if "outcome" in frame.columns else None
        return cls(
            arrival_s=floats("arrival_s"),
            prefill_start_s=floats("prefill_start_s"),
            first_token_s=floats("first_token_s"),
            finish_s=finish,
            prompt_tokens=ints("prompt_tokens", 0),
            cached_tokens=ints("cached_tokens", 0),
            output_tokens=ints("output_tokens", 0),
            outcome=outcome_codes(outcomes, finish),
            n_preemptions=ints("n_preemptions", 0),
            slo_ttft_s=floats("slo_ttft_s"),
            slo_tpot_s=floats("slo_tpot_s"),
            instance=ints("instance", -1),
        )


def _arrays(records: RecordArrays | pd.DataFrame) -> RecordArrays:
    return records if isinstance(records, RecordArrays) else RecordArrays.from_frame(records)


# -- per-request metrics -----------------------------------------------------------


def completed(r: RecordArrays) -> np.ndarray:
    """Mask of requests served to the end (outcome ``ok``)."""
    return r.outcome == OUTCOME_OK


def ttft_s(r: RecordArrays) -> np.ndarray:
    """Time to first token per request, seconds (NaN without a first token)."""
    return r.first_token_s - r.arrival_s


def tpot_s(r: RecordArrays) -> np.ndarray:
    """Time per output token after the first, seconds (NaN below two output tokens)."""
    steps = r.output_tokens - 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(steps > 0, (r.finish_s - r.first_token_s) / steps, np.nan)


def e2e_s(r: RecordArrays) -> np.ndarray:
    """Arrival to last token per request, seconds."""
    return r.finish_s - r.arrival_s


def queue_delay_s(r: RecordArrays) -> np.ndarray:
    """Arrival to prefill start per request, seconds."""
    return r.prefill_start_s - r.arrival_s


def duration_s(r: RecordArrays) -> float:
    """Last finish of a completed request minus the first arrival, seconds (0 when none)."""
    done = completed(r)
    if not done.any():
        return 0.0
    return float(np.max(r.finish_s[done]) - np.min(r.arrival_s))


def _limits(per_request: np.ndarray, default: float | None) -> np.ndarray:
    fill = math.nan if default is None else float(default)
    return np.where(np.isnan(per_request), fill, per_request)


def slo_met(r: RecordArrays, slo_ttft_s: float | None, slo_tpot_s: float | None) -> np.ndarray:
    """Mask of completed requests meeting both SLOs (a request's own SLOs win over these)."""
    ttft_lim = _limits(r.slo_ttft_s, slo_ttft_s)
    tpot_lim = _limits(r.slo_tpot_s, slo_tpot_s)
    with np.errstate(invalid="ignore"):
        ttft_ok = np.isnan(ttft_lim) | (ttft_s(r) <= ttft_lim)
        tpot = tpot_s(r)
        tpot_ok = np.isnan(tpot_lim) | np.isnan(tpot) | (tpot <= tpot_lim)
    return completed(r) & ttft_ok & tpot_ok


def has_slo(r: RecordArrays, slo_ttft_s: float | None, slo_tpot_s: float | None) -> bool:
    """Whether any SLO applies: a run-wide one, or any request's own."""
    return (
        slo_ttft_s is not None
        or slo_tpot_s is not None
        or not np.isnan(r.slo_ttft_s).all()
        or not np.isnan(r.slo_tpot_s).all()
    )


# -- the summary -------------------------------------------------------------------


def distribution(prefix: str, values: np.ndarray) -> dict[str, float]:
    """``{prefix}_mean_s``, ``_p50_s``, ``_p90_s``, ``_p99_s`` of ``values`` (NaN when empty)."""
    values = values[~np.isnan(values)]
    out = {f"{prefix}_mean_s": float(values.mean()) if len(values) else math.nan}
    for name, q in QUANTILES:
        out[f"{prefix}_{name}_s"] = float(np.quantile(values, q)) if len(values) else math.nan
    return out


def summarize(
    records: RecordArrays | pd.DataFrame,
    slo_ttft_s: float | None = None,
    slo_tpot_s: float | None = None,
    *,
    policy: str | None = None,
    roles: Sequence[str] | None = None,
    itl: QuantileSketch | None = None,
    busy_s: Sequence[float] | None = None,
) -> dict[str, Any]:
    """A run's headline numbers under stable snake_case keys (seconds, tokens, rates).

    Args:
        records: the run's records (a ``results.parquet`` frame or :class:`RecordArrays`).
        slo_ttft_s, slo_tpot_s: run-wide SLOs, seconds (per-request ones win).
        policy: the run's policy name (default: the frame's ``policy`` column, else "").
        roles: instance roles in id order (default: ``mixed`` for every id
            the ``instance`` column names, at least one).
        itl: the pooled inter-token latencies (default: none; ITL keys NaN).
        busy_s: seconds each instance spent running steps (default: unknown).
    """
    r = _arrays(records)
    if policy is None:
        has_col = not isinstance(records, RecordArrays) and "policy" in records.columns
        policy = str(records["policy"].iloc[0]) if has_col and len(records) else ""
    if roles is None:
        top = int(r.instance.max()) if len(r) else -1
        roles = ("mixed",) * max(top + 1, 1)
    done = completed(r)
    n_done = int(done.sum())
    duration = duration_s(r)
    rate = (lambda x: x / duration) if duration > 0 else (lambda x: math.nan)
    met = int(slo_met(r, slo_ttft_s, slo_tpot_s).sum())
    # Without any SLO, attainment and goodput are undefined, not 100%.
    slo_set = has_slo(r, slo_ttft_s, slo_tpot_s)
    out: dict[str, Any] = {
        "policy": policy,
        "n_instances": len(roles),
        "roles": list(roles),
        "n_requests": len(r),
        "n_completed": n_done,
        "n_failed": int((r.outcome == OUTCOME_FAILED).sum()),
        "n_rejected": int((r.outcome == OUTCOME_REJECTED).sum()),
        "n_error": int((r.outcome == OUTCOME_ERROR).sum()),
        "n_timeout": int((r.outcome == OUTCOME_TIMEOUT).sum()),
        "n_cancelled": int((r.outcome == OUTCOME_CANCELLED).sum()),
        "duration_s": duration,
    }
    out |= distribution("ttft", ttft_s(r)[done])
    out |= distribution("tpot", tpot_s(r)[done])
    out["itl_mean_s"] = itl.mean if itl is not None else math.nan
    for name, q in QUANTILES:
        out[f"itl_{name}_s"] = itl.quantile(q) if itl is not None else math.nan
    out |= distribution("e2e", e2e_s(r)[done])
    out |= distribution("queue_delay", queue_delay_s(r)[done])
    prompt = int(r.prompt_tokens[done].sum())
    busy = [math.nan] * len(roles) if busy_s is None else list(busy_s)
    out |= {
        "throughput_rps": rate(n_done),
        "input_tokens_per_s": rate(prompt),
        "output_tokens_per_s": rate(int(r.output_tokens[done].sum())),
        "slo_ttft_s": slo_ttft_s,
        "slo_tpot_s": slo_tpot_s,
        "slo_attainment": met / n_done if n_done and slo_set else math.nan,
        "goodput_rps": rate(met) if slo_set else math.nan,
        "prefix_hit_rate": int(r.cached_tokens[done].sum()) / prompt if prompt else math.nan,
        "n_preemptions": int(r.n_preemptions.sum()),
        "utilization": [float(b / duration) if duration > 0 else math.nan for b in busy],
    }
    return out
