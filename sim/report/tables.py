"""The report's tables: one row per run (``summary.csv``) and the headline per policy and load.

The headline averages each metric over a point's seeds (a run's quantiles
are its own; the mean of per-seed p90s is shown, not the p90 of the pooled
requests). At each load the best value of every column is marked: lowest
for latencies, highest for SLO attainment, goodput and throughput; nothing
is marked where one policy stands alone.

The page's headline shows :data:`GLANCE`, the columns that fit a 1024 px
window (the verdict first: SLO attainment, goodput, throughput; then the
latency quantiles that explain it); every column of :data:`HEADLINE` is in
the full table below it, ``summary.md`` and ``summary.csv``.

**Bands.** A summary may carry ``<key>_lo`` and ``<key>_hi`` beside a
headline figure ``<key>`` (``ttft_p90_s_lo``, ``slo_attainment_hi``): the
same figure from runs with every step cost scaled down (``_lo``) and up
(``_hi``) by the calibration's error, with the two factors as
``band_cost_scale_lo`` and ``band_cost_scale_hi`` (``0.95``, ``1.05``). The
headline averages them over seeds like the figure itself, and :func:`band`
reads them back as the range of the three runs, lower bound first (scaling
costs up raises latencies but lowers SLO attainment, so either end may be the
smaller; near saturation a tail figure can even fall at both ends, so the
range spans the figure itself too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from sim.report.records import RunRecords

__all__ = [
    "GLANCE",
    "HEADLINE",
    "STEP_TIME_SHARE",
    "Metric",
    "band",
    "band_scales",
    "band_span",
    "best_marks",
    "headline",
    "markdown",
    "run_table",
]


@dataclass(frozen=True)
class Metric:
    """One headline column: the summary key, its header, display scale and which way is better."""

    key: str
    group: str
    name: str
    unit: str
    scale: float
    better: str  # "min" or "max"

    def fmt(self, value: float) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        v = value * self.scale
        if self.unit == "%":
            return f"{v:.1f}"
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.2f}" if abs(v) < 10 else f"{v:,.1f}"


def _quartet(prefix: str, group: str, unit: str, scale: float) -> list[Metric]:
    return [
        Metric(f"{prefix}_{q}_s", group, q, unit, scale, "min")
        for q in ("mean", "p50", "p90", "p99")
    ]


#: The headline's metric columns, in order.
HEADLINE: tuple[Metric, ...] = (
    *_quartet("ttft", "TTFT", "ms", 1000.0),
    *_quartet("tpot", "TPOT", "ms", 1000.0),
    *_quartet("e2e", "E2E", "s", 1.0),
    Metric("slo_attainment", "SLO", "attainment", "%", 100.0, "max"),
    Metric("goodput_rps", "goodput", "req/s", "req/s", 1.0, "max"),
    Metric("throughput_rps", "throughput", "req/s", "req/s", 1.0, "max"),
)


def _pick_metrics(*keys: str) -> tuple[Metric, ...]:
    by_key = {m.key: m for m in HEADLINE}
    return tuple(by_key[k] for k in keys)


#: The page's headline columns, in order (see the module docstring).
GLANCE: tuple[Metric, ...] = _pick_metrics(
    "slo_attainment",
    "goodput_rps",
    "throughput_rps",
    "ttft_p50_s",
    "ttft_p90_s",
    "ttft_p99_s",
    "tpot_p50_s",
    "tpot_p90_s",
    "e2e_p50_s",
    "e2e_p90_s",
)

#: summary.csv's column for the mean over instances of the summary's ``utilization``:
#: the share of the run each instance spent running engine steps (100% is never
#: idle, which says nothing of queues or latency).
STEP_TIME_SHARE = "share_of_time_running_steps"


def band(row: pd.Series, key: str) -> tuple[float, float] | None:
    """A headline row's band for ``key``: (lower, upper), or None without a finite one."""
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    if lo is None or hi is None:
        return None
    return band_span(float(lo), float(row.get(key, math.nan)), float(hi))


def band_span(lo: float, figure: float, hi: float) -> tuple[float, float] | None:
    """The range of a figure and its band's two ends, lower first; None without finite ends.

    Not just the ends: with step costs scaled up a tail quantile near
    saturation can fall (a queue that empties in another order), so both
    ends may lie on one side of the figure they bound.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    ends = (lo, hi, figure) if math.isfinite(figure) else (lo, hi)
    return (min(ends), max(ends))


def band_scales(table: pd.DataFrame) -> tuple[float, float] | None:
    """The step-cost factors of the table's bands (lowest and highest), or None without bands."""
    cols = ["band_cost_scale_lo", "band_cost_scale_hi"]
    if not set(cols) <= set(table.columns):
        return None
    values = table[cols].to_numpy(dtype=float).ravel()
    values = values[np.isfinite(values)]
    return (float(values.min()), float(values.max())) if len(values) else None


def run_table(runs: list[RunRecords]) -> pd.DataFrame:
    """One row per run: identity, offered rate, its writer and options, every summary scalar.

    ``records_from`` is the ``run.json`` source (empty for older folders);
    each of its options is an ``option_<name>`` column; the per-instance
    ``utilization`` list becomes its mean, :data:`STEP_TIME_SHARE`.
    """
    rows = []
    for r in runs:
        row: dict[str, Any] = {
            "source": r.source,
            "label": r.label,
            "policy": r.config.get("policy", r.summary.get("policy")),
            "decode_policy": r.config.get("decode_policy"),
            "load": r.load,
            "seed": r.seed,
            "offered_rps": r.offered_rps,
            "records_from": r.run.source if r.run is not None else None,
        }
        if r.run is not None:
            row |= {f"option_{k}": v for k, v in r.run.options.items()}
        for key, value in r.summary.items():
            if key in ("config", "policy") or isinstance(value, dict):
                continue
            if isinstance(value, list):
                if key == "utilization":
                    nums = [v for v in value if isinstance(v, int | float)]
                    row[STEP_TIME_SHARE] = float(np.mean(nums)) if nums else math.nan
                continue
            row[key] = math.nan if value is None else value
        rows.append(row)
    return pd.DataFrame(rows)


def headline(runs: list[RunRecords]) -> pd.DataFrame:
    """Per label and load (labels in first-seen order, loads ascending): seed means."""
    table = run_table(runs)
    order = {label: i for i, label in enumerate(dict.fromkeys(r.label for r in runs))}
    scales = ["band_cost_scale_lo", "band_cost_scale_hi"]
    keys = [
        k for m in HEADLINE for k in (m.key, f"{m.key}_lo", f"{m.key}_hi") if k in table.columns
    ] + [k for k in scales if k in table.columns]
    for m in HEADLINE:
        if m.key not in table.columns:
            table[m.key] = math.nan
    grouped = table.groupby(["label", "load"], sort=False)
    out = grouped[[*keys, "offered_rps"]].mean(numeric_only=True)
    out["n_seeds"] = grouped.size()
    out = out.reset_index()
    for m in HEADLINE:
        if m.key not in out.columns:
            out[m.key] = math.nan
    out["_order"] = out["label"].map(order)
    out = out.sort_values(["load", "_order"], kind="stable").drop(columns="_order")
    return out.reset_index(drop=True)


def best_marks(table: pd.DataFrame) -> pd.DataFrame:
    """Booleans: the best value of each headline column among the rows of its load."""
    marks = pd.DataFrame(False, index=table.index, columns=[m.key for m in HEADLINE])
    for _, rows in table.groupby("load", sort=False):
        if len(rows) < 2:
            continue
        for m in HEADLINE:
            values = rows[m.key].astype(float)
            if values.isna().all():
                continue
            best = values.min() if m.better == "min" else values.max()
            # Equal to display precision counts as a tie.
            shown = values.map(m.fmt)
            marks.loc[rows.index, m.key] = shown == m.fmt(best)
    return marks


def markdown(table: pd.DataFrame, marks: pd.DataFrame) -> str:
    """The headline as a Markdown table; the best values in bold, bands in brackets after."""
    headers = ["policy", "load", "offered req/s"] + [
        f"{m.group} {m.name} ({m.unit})" if m.unit not in (m.name,) else f"{m.group} ({m.unit})"
        for m in HEADLINE
    ]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for i, row in table.iterrows():
        cells = [str(row["label"]), f"{row['load']:g}", _rate(row["offered_rps"])]
        for m in HEADLINE:
            text = m.fmt(row[m.key])
            text = f"**{text}**" if marks.loc[i, m.key] else text
            rng = band(row, m.key)
            cells.append(text if rng is None else f"{text} ({m.fmt(rng[0])}–{m.fmt(rng[1])})")
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _rate(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.2f}"
