"""Workload statistics: what a serving engineer asks of a trace first.

Definitions (the ones the published trace tables use):

- rows are taken in arrival order; the span is last minus first arrival;
- mean rate = rows / span;
- peak rates are the largest request count in fixed 1 s and 60 s bins
  aligned on the first arrival, as requests per second;
- index of dispersion = variance / mean of those per-bin counts (1 for
  Poisson arrivals);
- inter-arrival CV = population std / mean of consecutive gaps;
- token percentiles use linear interpolation;
- ``prompt_share_over_N`` counts prompts strictly longer than N tokens;
- prefix reuse = share of all prefix-block references that point to a block
  already referenced earlier in the trace.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from traces.trace import Trace

__all__ = ["PROMPT_THRESHOLDS", "TraceStats", "trace_stats"]

#: Prompt lengths whose exceedance share is reported.
PROMPT_THRESHOLDS = (1024, 2048, 4096)


class TraceStats(BaseModel):
    """Summary statistics of one trace. Field names are the stable JSON keys."""

    model_config = ConfigDict(frozen=True)

    name: str
    n_requests: int
    n_failed: int
    span_s: float
    rate_mean_rps: float
    rate_peak_1s_rps: float
    rate_peak_60s_rps: float
    dispersion_1s: float
    dispersion_60s: float
    interarrival_cv: float
    tokens_per_s_mean: float
    prompt_tokens_mean: float
    prompt_tokens_p50: float
    prompt_tokens_p90: float
    prompt_tokens_p99: float
    prompt_tokens_max: int
    output_tokens_mean: float
    output_tokens_p50: float
    output_tokens_p90: float
    output_tokens_p99: float
    output_tokens_max: int
    prompt_share_over_1024: float
    prompt_share_over_2048: float
    prompt_share_over_4096: float
    n_sessions: int | None
    n_multi_turn_sessions: int | None
    turns_per_session_mean: float | None
    turns_per_session_max: int | None
    prefix_reuse_share: float | None
    models: dict[str, int]
    log_types: dict[str, int]


def trace_stats(trace: Trace) -> TraceStats:
    """Compute :class:`TraceStats` for ``trace`` (vectorized; fine for millions of rows)."""
    f = trace.frame
    n = len(f)
    arrivals = trace.arrival_s
    prompt = trace.prompt_tokens
    output = trace.output_tokens
    span = trace.span_s
    gaps = np.diff(arrivals)

    out: dict[str, Any] = {
        "name": trace.name,
        "n_requests": n,
        "n_failed": int(f["failed"].sum()),
        "span_s": span,
        "rate_mean_rps": n / span if span > 0 else 0.0,
        "interarrival_cv": _cv(gaps),
        "tokens_per_s_mean": float(prompt.sum() + output.sum()) / span if span > 0 else 0.0,
    }
    for width_s, key in ((1.0, "1s"), (60.0, "60s")):
        peak, dispersion = _binned_rates(arrivals, width_s)
        out[f"rate_peak_{key}_rps"] = peak / width_s
        out[f"dispersion_{key}"] = dispersion
    for label, values in (("prompt_tokens", prompt), ("output_tokens", output)):
        out.update(_distribution(label, values))
    for threshold in PROMPT_THRESHOLDS:
        share = float(np.count_nonzero(prompt > threshold)) / n if n else 0.0
        out[f"prompt_share_over_{threshold}"] = share
    out.update(_sessions(f["session_id"]))
    out["prefix_reuse_share"] = _prefix_reuse(f["prefix_hashes"])
    out["models"] = _counts(f["model"])
    out["log_types"] = _counts(f["log_type"])
    return TraceStats(**out)


def _cv(gaps: np.ndarray) -> float:
    if gaps.size == 0:
        return 0.0
    mean = gaps.mean()
    return float(gaps.std() / mean) if mean > 0 else 0.0


def _binned_rates(arrivals: np.ndarray, width_s: float) -> tuple[float, float]:
    """(largest count, variance / mean of the counts) over ``width_s`` bins from the first arrival.

    Only the occupied bins are counted, so memory grows with the requests,
    not with the span: a trace whose timestamps span 1e11 s has 1e11 bins,
    nearly all empty, and those enter the mean and variance as zeros.
    """
    if arrivals.size == 0:
        return 0.0, 0.0
    # Bin indices stay floats: an absurd span would overflow an integer index.
    bins = np.floor((arrivals - arrivals.min()) / width_s)
    _, counts = np.unique(bins, return_counts=True)
    n_bins = float(bins.max()) + 1.0
    mean = arrivals.size / n_bins
    variance = max(float(np.square(counts, dtype=np.float64).sum()) / n_bins - mean * mean, 0.0)
    return float(counts.max()), variance / mean


def _distribution(label: str, values: np.ndarray) -> dict[str, float | int]:
    if values.size == 0:
        return {f"{label}_{k}": 0 for k in ("mean", "p50", "p90", "p99", "max")}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        f"{label}_mean": float(values.mean()),
        f"{label}_p50": float(p50),
        f"{label}_p90": float(p90),
        f"{label}_p99": float(p99),
        f"{label}_max": int(values.max()),
    }


def _sessions(session_id) -> dict[str, Any]:
    known = session_id.dropna()
    if known.empty:
        return {
            "n_sessions": None,
            "n_multi_turn_sessions": None,
            "turns_per_session_mean": None,
            "turns_per_session_max": None,
        }
    turns = known.value_counts()
    return {
        "n_sessions": int(turns.size),
        "n_multi_turn_sessions": int((turns > 1).sum()),
        "turns_per_session_mean": float(turns.mean()),
        "turns_per_session_max": int(turns.max()),
    }


def _prefix_reuse(prefix_hashes) -> float | None:
    arrays = [h for h in prefix_hashes if h is not None]
    if not arrays:
        return None
    refs = np.concatenate(arrays)
    if refs.size == 0:
        return 0.0
    return 1.0 - np.unique(refs).size / refs.size


def _counts(column) -> dict[str, int]:
    counts = column.value_counts(dropna=True)
    return {str(k): int(v) for k, v in counts.items() if v > 0}
