"""Numbers behind the report's plots, computed from result records (no plotting here).

* TTFT distribution: quantiles of completed requests' TTFT at fixed
  probabilities, a few hundred points however many requests there were.
* Occupancy over time, from the records alone, so simulated and measured
  runs are drawn alike: *queued* requests have arrived and not started
  prefill (``prefill_start_s``, else ``first_token_s``); *in flight* have
  started and not finished. KV-cache tokens in use come from
  ``queue.parquet`` (simulated runs), summed over instances.
* Every time series is cut into bins and each bin shows its maximum, so a
  short spike survives the thinning.
* Short and long requests: at most ``threshold`` uncached prompt tokens
  (prompt minus cached tokens, where the records have them) is short.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = [
    "completed",
    "kv_series",
    "occupancy",
    "quantile_curve",
    "short_long",
    "ttft_ms",
]

#: Bins of a time series in a plot.
TIME_BINS = 600


def completed(results: pd.DataFrame) -> pd.DataFrame:
    """Requests served to the end (outcome ``ok``, or a finish time where there is no outcome)."""
    if "outcome" in results.columns:
        return results[results["outcome"].astype(str) == "ok"]
    return results[results["finish_s"].notna()]


def ttft_ms(results: pd.DataFrame) -> np.ndarray:
    """TTFT of completed requests, ms (NaN rows dropped)."""
    done = completed(results)
    ttft = (done["first_token_s"] - done["arrival_s"]).to_numpy(dtype=float) * 1000.0
    return ttft[np.isfinite(ttft)]


def quantile_curve(values: np.ndarray, points: int = 201) -> tuple[np.ndarray, np.ndarray]:
    """``(x, percent)``: the empirical CDF at ``points`` evenly spaced probabilities."""
    if len(values) == 0:
        return np.array([]), np.array([])
    p = np.linspace(0.0, 1.0, points)
    return np.quantile(values, p), p * 100.0


def _binned_max(
    times: np.ndarray, values: np.ndarray, end_s: float, bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """A step function (``values[i]`` from ``times[i]``, 0 before) as per-bin maxima."""
    edges = np.linspace(0.0, end_s, bins + 1)
    start_idx = np.searchsorted(times, edges[:-1], side="right") - 1
    out = np.where(start_idx >= 0, values[np.maximum(start_idx, 0)], 0).astype(float)
    inside = np.clip(np.searchsorted(edges, times, side="right") - 1, 0, bins - 1)
    keep = times <= end_s
    np.maximum.at(out, inside[keep], values[keep].astype(float))
    return edges[:-1], out


def _step(times: np.ndarray, deltas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(times, kind="stable")
    return times[order], np.cumsum(deltas[order])


def occupancy(
    results: pd.DataFrame, bins: int = TIME_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(time_s, queued, in_flight)``, binned (see the module docstring)."""
    arrival = results["arrival_s"].to_numpy(dtype=float)
    start = results["first_token_s"].to_numpy(dtype=float)
    if "prefill_start_s" in results.columns:
        ps = results["prefill_start_s"].to_numpy(dtype=float)
        start = np.where(np.isfinite(ps), ps, start)
    finish = results["finish_s"].to_numpy(dtype=float)
    ok = np.isfinite(arrival) & np.isfinite(start) & np.isfinite(finish)
    arrival, start, finish = arrival[ok], start[ok], finish[ok]
    if not len(arrival):
        return np.array([]), np.array([]), np.array([])
    end = float(finish.max())
    ones = np.ones(len(arrival))
    qt, qv = _step(np.concatenate([arrival, start]), np.concatenate([ones, -ones]))
    ft, fv = _step(np.concatenate([start, finish]), np.concatenate([ones, -ones]))
    t, queued = _binned_max(qt, qv, end, bins)
    _, in_flight = _binned_max(ft, fv, end, bins)
    return t, queued, in_flight


def kv_series(queue: pd.DataFrame, end_s: float, bins: int = TIME_BINS) -> tuple[np.ndarray, ...]:
    """``(time_s, kv_used_tokens)`` summed over instances, binned."""
    if queue is None or not len(queue) or "kv_used_tokens" not in queue.columns:
        return np.array([]), np.array([])
    q = queue.sort_values(["instance", "time_s"], kind="stable")
    kv = q["kv_used_tokens"].to_numpy(dtype=float)
    inst = q["instance"].to_numpy()
    prev = np.concatenate([[0.0], kv[:-1]])
    first = np.concatenate([[True], inst[1:] != inst[:-1]])
    deltas = np.where(first, kv, kv - prev)
    t, total = _step(q["time_s"].to_numpy(dtype=float), deltas)
    return _binned_max(t, total, max(end_s, float(t.max())), bins)


def short_long(results: pd.DataFrame, threshold: int) -> dict[str, np.ndarray]:
    """TTFT (ms) of completed requests with at most (``short``) or more uncached prompt tokens."""
    done = completed(results)
    prompt = done["prompt_tokens"].to_numpy(dtype=float)
    if "cached_tokens" in done.columns:
        prompt = prompt - pd.to_numeric(done["cached_tokens"]).fillna(0).to_numpy(dtype=float)
    ttft = (done["first_token_s"] - done["arrival_s"]).to_numpy(dtype=float) * 1000.0
    fine = np.isfinite(ttft)
    return {
        "short": ttft[fine & (prompt <= threshold)],
        "long": ttft[fine & (prompt > threshold)],
    }
