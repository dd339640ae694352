"""The report's plots, as plotly figures (rendered offline by the page's one copy of plotly.js).

Each policy keeps one colour in every plot. Plots of one point (the TTFT
CDF, the timeline, the short/long split, the batch histograms) show the
chosen load (for a policy without runs at that load, its nearest load); the
CDF has a button per load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from sim.report import series
from sim.report.records import RunRecords
from sim.report.tables import band_span

__all__ = ["Plot", "build_plots", "colors_for"]

_HEIGHT = 400


@dataclass
class Plot:
    """One figure of the report, with the element id it is drawn into."""

    id: str
    title: str
    caption: str
    figure: go.Figure


def colors_for(labels: list[str]) -> dict[str, str]:
    """One colour per label, stable in label order."""
    palette = qualitative.Plotly + qualitative.D3 + qualitative.Dark24
    return {label: palette[i % len(palette)] for i, label in enumerate(labels)}


def _layout(fig: go.Figure, **extra: Any) -> go.Figure:
    base: dict[str, Any] = {
        "template": "plotly_white",
        "height": _HEIGHT,
        "margin": {"l": 60, "r": 20, "t": 40, "b": 50},
        "legend": {"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 0},
        "font": {"family": "system-ui, sans-serif", "size": 12},
        "hovermode": "closest",
    }
    fig.update_layout(**(base | extra))
    return fig


def _subplot_layout(fig: go.Figure) -> None:
    """Side-by-side bar panels: the legend above the panel titles."""
    _layout(
        fig,
        barmode="group",
        margin={"l": 60, "r": 20, "t": 80, "b": 50},
        legend={"orientation": "h", "y": 1.12, "yanchor": "bottom", "x": 0},
    )


def _ms_label(value_ms: float) -> str:
    if value_ms < 1000:
        return f"{value_ms:g} ms"
    return f"{value_ms / 1000:,.10g} s"


def log_ticks_ms(values_ms: Any) -> dict[str, Any]:
    """Tick values and labels of a log axis in ms: the decades (1 ms, 10 ms, 100 ms, 1 s ...).

    Spans under three decades also get the 2s and 5s between them, so an
    axis always has a few labels; nothing else is labelled.
    """
    v = np.asarray(values_ms, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    if not len(v):
        return {}
    lo, hi = float(v.min()), float(v.max())
    first, last = int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi)))
    steps = (1, 2, 5) if hi / lo < 1000 else (1,)
    ticks = [
        m * 10.0**e
        for e in range(first, last + 1)
        for m in steps
        if lo / 1.5 <= m * 10.0**e <= hi * 1.5
    ]
    if len(ticks) < 2:  # a sliver of an axis: the decades around it
        ticks = [10.0**first, 10.0**last]
    return {"tickvals": ticks, "ticktext": [_ms_label(t) for t in ticks]}


def build_plots(
    runs: list[RunRecords],
    table: pd.DataFrame,
    *,
    load: float,
    seed: int,
    short_prompt_tokens: int,
    slo_ttft_ms: float | None,
) -> list[Plot]:
    """Every plot the runs support; ``load`` and ``seed`` choose the single-point plots."""
    labels = list(dict.fromkeys(r.label for r in runs))
    colors = colors_for(labels)
    at_load = _nearest_load(runs, labels, load)
    plots = [
        _ttft_cdf(runs, labels, colors, load, slo_ttft_ms),
        _vs_load(
            table,
            labels,
            colors,
            "ttft_p90_s",
            1000.0,
            "p90 TTFT (log scale)",
            "p90-ttft",
            "p90 TTFT against load",
            "Where each curve turns up is the load the policy can take. Log scale; "
            "the dashed line is the TTFT SLO.",
            log=True,
            hline=slo_ttft_ms,
        ),
        _vs_load(
            table,
            labels,
            colors,
            "slo_attainment",
            100.0,
            "SLO attainment (%)",
            "slo-attainment",
            "SLO attainment against load",
            "Share of completed requests meeting both the TTFT and the TPOT SLO.",
        ),
        _vs_load(
            table,
            labels,
            colors,
            "goodput_rps",
            1.0,
            "goodput (req/s)",
            "goodput",
            "Goodput against load",
            "Completed requests meeting the SLOs, per second; the grey dashed line is "
            "the offered rate.",
            offered=True,
        ),
        _short_long(at_load, labels, colors, load, short_prompt_tokens),
        _timeline([r for r in at_load if r.seed == seed] or at_load, labels, colors, load, seed),
    ]
    batches = _batches(at_load, labels, colors, load)
    if batches is not None:
        plots.append(batches)
    return plots


def _nearest_load(runs: list[RunRecords], labels: list[str], load: float) -> list[RunRecords]:
    """Each label's runs at ``load``, or at its load nearest to it (a run from elsewhere)."""
    out = []
    for label in labels:
        mine = [r for r in runs if r.label == label]
        best = min({r.load for r in mine}, key=lambda x: (abs(x - load), x))
        out += [r for r in mine if r.load == best]
    return out


def _one_seed(runs: list[RunRecords], labels: list[str], seed: int) -> list[RunRecords]:
    """Each label's run with ``seed``, or its first."""
    out = []
    for label in labels:
        mine = [r for r in runs if r.label == label]
        out.append(next((r for r in mine if r.seed == seed), mine[0]))
    return out


def _ttft_cdf(
    runs: list[RunRecords],
    labels: list[str],
    colors: dict[str, str],
    chosen: float,
    slo_ttft_ms: float | None,
) -> Plot:
    loads = sorted({r.load for r in runs})
    fig = go.Figure()
    visible_sets = []
    for load in loads:
        for label in labels:
            parts = [series.ttft_ms(r.results) for r in runs if r.label == label and r.load == load]
            values = np.concatenate(parts) if parts else np.array([])
            x, y = series.quantile_curve(np.maximum(values, 1e-3))
            fig.add_trace(
                go.Scatter(
                    x=np.round(x, 4),
                    y=np.round(y, 2),
                    mode="lines",
                    name=label,
                    legendgroup=label,
                    line={"color": colors[label]},
                    visible=load == chosen,
                    hovertemplate=f"{label}<br>%{{y:.1f}}% under %{{x:,.1f}} ms<extra></extra>",
                )
            )
            visible_sets.append(load)
    if len(loads) > 1:
        buttons = [
            {
                "label": f"load ×{load:g}",
                "method": "update",
                "args": [{"visible": [v == load for v in visible_sets]}],
            }
            for load in loads
        ]
        fig.update_layout(
            updatemenus=[
                {
                    # A row of their own above the legend's, so neither hides the other.
                    "type": "buttons",
                    "direction": "right",
                    "x": 0.0,
                    "xanchor": "left",
                    "y": 1.15,
                    "yanchor": "bottom",
                    "pad": {"t": 0, "b": 0, "l": 0, "r": 0},
                    "buttons": buttons,
                    "active": loads.index(chosen),
                    "showactive": True,
                }
            ]
        )
    _slo_line(fig, slo_ttft_ms, vertical=True)
    _layout(fig, margin={"l": 60, "r": 20, "t": 90, "b": 50})
    shown = [v for t in fig.data for v in (t.x if t.x is not None else ())]
    shown += [slo_ttft_ms] if slo_ttft_ms else []
    fig.update_xaxes(type="log", title="TTFT (log scale)", **log_ticks_ms(shown))
    fig.update_yaxes(title="requests (%)", range=[0, 100.5])
    return Plot(
        "ttft-cdf",
        "TTFT distribution",
        f"Share of completed requests with a TTFT up to x, seeds pooled; the buttons pick "
        f"the load (shown: ×{chosen:g}). Log scale; the dashed line is the TTFT SLO.",
        fig,
    )


def _slo_line(fig: go.Figure, value: float | None, *, vertical: bool) -> None:
    if value is None:
        return
    style = {"dash": "dash", "color": "#888", "width": 1}
    if vertical:
        fig.add_vline(x=value, line=style)  # shapes take data values, log axis or not
    else:
        fig.add_hline(y=value, line=style)


def _vs_load(
    table: pd.DataFrame,
    labels: list[str],
    colors: dict[str, str],
    key: str,
    scale: float,
    y_title: str,
    plot_id: str,
    title: str,
    caption: str,
    *,
    log: bool = False,
    hline: float | None = None,
    offered: bool = False,
) -> Plot:
    fig = go.Figure()
    banded = False
    for label in labels:
        rows = table[table["label"] == label].sort_values("load")
        banded |= _band(fig, rows, key, scale, label, colors[label])
        fig.add_trace(
            go.Scatter(
                x=rows["load"].tolist(),
                y=(rows[key].astype(float) * scale).round(4).tolist(),
                customdata=rows["offered_rps"].round(3).tolist(),
                mode="lines+markers",
                name=label,
                line={"color": colors[label]},
                hovertemplate=(
                    f"{label}<br>load ×%{{x:g}} (%{{customdata:,.2f}} req/s)"
                    f"<br>%{{y:,.2f}}<extra></extra>"
                ),
            )
        )
    if offered:
        mean = table.groupby("load")["offered_rps"].mean().sort_index()
        fig.add_trace(
            go.Scatter(
                x=mean.index.tolist(),
                y=mean.round(4).tolist(),
                mode="lines",
                name="offered",
                line={"color": "#999", "dash": "dash"},
                hovertemplate="offered %{y:,.2f} req/s<extra></extra>",
            )
        )
    _slo_line(fig, hline, vertical=False)
    # Bands share their line's legend group; "normal" keeps the legend on one row.
    _layout(fig, legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 0,
                         "traceorder": "normal"})  # fmt: skip
    fig.update_xaxes(title="load (× the trace's arrival rate)")
    fig.update_yaxes(title=y_title, type="log" if log else "linear")
    if log:
        shown = [v for t in fig.data for v in (t.y if t.y is not None else ()) if v is not None]
        fig.update_yaxes(**log_ticks_ms([*shown, *([hline] if hline else [])]))
    if key == "slo_attainment":
        fig.update_yaxes(range=[0, 101])
    elif not log:
        # From zero, and high enough for every line drawn (the offered rate included).
        drawn = [v for t in fig.data for v in (t.y if t.y is not None else ()) if v is not None]
        top = float(np.nanmax(drawn)) if drawn and not np.isnan(drawn).all() else 1.0
        fig.update_yaxes(range=[0, top * 1.08 or 1.0])
    if banded:
        caption += " Shaded: each policy's band (its step costs scaled down and up)."
    return Plot(plot_id, title, caption, fig)


def _band(
    fig: go.Figure, rows: pd.DataFrame, key: str, scale: float, label: str, color: str
) -> bool:
    """Shade a label's band (``<key>_lo`` to ``<key>_hi``, see :mod:`sim.report.tables`).

    Returns whether there was one to shade.
    """
    lo_key, hi_key = f"{key}_lo", f"{key}_hi"
    if lo_key not in rows.columns or hi_key not in rows.columns:
        return False
    have = rows[rows[lo_key].notna() & rows[hi_key].notna()]
    if not len(have):
        return False
    spans = [
        (load, band_span(float(lo) * scale, float(mid) * scale, float(hi) * scale))
        for load, lo, mid, hi in zip(
            have["load"], have[lo_key], have[key], have[hi_key], strict=True
        )
    ]
    spans = [(load, span) for load, span in spans if span is not None]
    if not spans:
        return False
    x = [load for load, _ in spans]
    lower = [span[0] for _, span in spans]
    upper = [span[1] for _, span in spans]
    fig.add_trace(
        go.Scatter(
            x=x + x[::-1],
            y=[round(v, 4) for v in upper + lower[::-1]],
            fill="toself",
            fillcolor=_rgba(color, 0.18),
            line={"width": 0},
            mode="lines",
            name=f"{label} band",
            legendgroup=label,
            showlegend=False,
            hoverinfo="skip",
        )
    )
    return True


def _rgba(color: str, alpha: float) -> str:
    """``#rrggbb`` or ``rgb(r, g, b)`` with an alpha."""
    if color.startswith("#") and len(color) == 7:
        r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    else:
        r, g, b = (int(float(c)) for c in color[color.index("(") + 1 : -1].split(",")[:3])
    return f"rgba({r},{g},{b},{alpha})"


def _timeline(
    runs: list[RunRecords], labels: list[str], colors: dict[str, str], load: float, seed: int
) -> Plot:
    has_kv = any(r.queue is not None and len(r.queue) for r in runs)
    rows = 3 if has_kv else 2
    titles = [
        "queued requests",
        "in-flight requests",
        "KV cache in use: token slots held by requests and cached prefixes",
    ][:rows]
    units = ["requests", "requests", "KV slots (tokens)"][:rows]
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, subplot_titles=titles)
    for label in labels:
        run = next((r for r in runs if r.label == label), None)
        if run is None:
            continue
        t, queued, in_flight = series.occupancy(run.results)
        t = np.round(t, 3)
        panels = [queued, in_flight]
        if has_kv:
            end = float(t[-1]) if len(t) else 0.0
            kt, kv = series.kv_series(run.queue, end)
            panels.append(np.interp(t, kt, kv) if len(kt) else np.zeros(len(t)))
        for i, values in enumerate(panels):
            fig.add_trace(
                go.Scatter(
                    x=t,
                    y=np.round(values, 1),
                    mode="lines",
                    line={"color": colors[label], "width": 1.2, "shape": "hv"},
                    name=label,
                    legendgroup=label,
                    showlegend=i == 0,
                    hovertemplate=f"{label}<br>t=%{{x:,.1f}} s: %{{y:,.0f}}<extra></extra>",
                ),
                row=i + 1,
                col=1,
            )
    _layout(fig, height=220 * rows)
    fig.update_xaxes(title="time (s)", row=rows, col=1)
    for i, unit in enumerate(units):
        fig.update_yaxes(title=unit, row=i + 1, col=1)
    return Plot(
        "timeline",
        "Queue and in-flight work over time",
        f"Load ×{load:g}, seed {seed}. Queued: arrived, prefill not started; in flight: "
        "prefilling or decoding; each point is the maximum over its time bin.",
        fig,
    )


def _short_long(
    runs: list[RunRecords], labels: list[str], colors: dict[str, str], load: float, threshold: int
) -> Plot:
    fig = make_subplots(rows=1, cols=2, subplot_titles=["p50 TTFT", "p90 TTFT"])
    drawn: list[float] = []
    classes = [f"short (≤ {threshold})", f"long (> {threshold})"]
    for label in labels:
        parts = [series.short_long(r.results, threshold) for r in runs if r.label == label]
        if not parts:
            continue
        pooled = {k: np.concatenate([p[k] for p in parts]) for k in ("short", "long")}
        counts = [len(pooled["short"]), len(pooled["long"])]
        for col, q in ((1, 0.5), (2, 0.9)):
            ys = [float(np.quantile(v, q)) if len(v) else None for v in pooled.values()]
            drawn += [y for y in ys if y is not None]
            fig.add_trace(
                go.Bar(
                    x=classes,
                    y=[None if y is None else round(y, 3) for y in ys],
                    customdata=counts,
                    name=label,
                    legendgroup=label,
                    showlegend=col == 1,
                    marker={"color": colors[label]},
                    hovertemplate=(
                        f"{label}<br>%{{x}}: %{{y:,.1f}} ms (%{{customdata:,}} requests)"
                        "<extra></extra>"
                    ),
                ),
                row=1,
                col=col,
            )
    _subplot_layout(fig)
    # One log scale for both panels, so short requests show beside long ones and the
    # panels compare at a glance.
    ticks = log_ticks_ms(drawn)
    positive = [y for y in drawn if y > 0]
    if positive:
        span = [np.log10(min(positive)) - 0.3, np.log10(max(positive)) + 0.15]
        fig.update_yaxes(type="log", range=span, **ticks)
    fig.update_yaxes(title="TTFT (log scale)", row=1, col=1)
    fig.update_xaxes(title="uncached prompt tokens")
    return Plot(
        "short-long",
        "Short and long requests",
        f"TTFT of requests with at most {threshold} uncached prompt tokens (short) and the "
        f"rest (long), at load ×{load:g}, seeds pooled. Log scale, shared by both panels.",
        fig,
    )


def _graph_steps(batches: pd.DataFrame | None) -> pd.DataFrame | None:
    """Prefill steps replayed as CUDA graphs (or padded), or None when there are none."""
    if batches is None or not len(batches):
        return None
    if "cuda_graph" in batches.columns and batches["cuda_graph"].astype(bool).any():
        return batches[batches["cuda_graph"].astype(bool)]
    if "padding_tokens" in batches.columns and (batches["padding_tokens"] > 0).any():
        return batches[batches["padding_tokens"] > 0]
    return None


def _batches(
    runs: list[RunRecords], labels: list[str], colors: dict[str, str], load: float
) -> Plot | None:
    steps = {}
    for label in labels:
        frames = [_graph_steps(r.batches) for r in runs if r.label == label]
        frames = [f for f in frames if f is not None]
        if frames:
            steps[label] = pd.concat(frames, ignore_index=True)
    if not steps:
        return None
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=["sequences per step", "padding (% of the shape's tokens)"]
    )
    top = max(int(f["n_prefill"].max()) for f in steps.values())
    edges = np.linspace(0, 100, 21)
    for label, f in steps.items():
        sizes = np.bincount(f["n_prefill"].to_numpy(dtype=int), minlength=top + 1)[1:]
        shape = f["shape_tokens"].to_numpy(dtype=float)
        pad = np.where(shape > 0, f["padding_tokens"].to_numpy(dtype=float) / shape * 100, 0.0)
        pad_counts, _ = np.histogram(pad, bins=edges)
        for col, x, counts in (
            (1, np.arange(1, top + 1), sizes),
            (2, edges[:-1] + 2.5, pad_counts),
        ):
            fig.add_trace(
                go.Bar(
                    x=x.tolist(),
                    y=np.round(counts / max(len(f), 1) * 100, 2).tolist(),
                    name=label,
                    legendgroup=label,
                    showlegend=col == 1,
                    marker={"color": colors[label]},
                    hovertemplate=f"{label}<br>%{{x}}: %{{y:.1f}}% of steps<extra></extra>",
                ),
                row=1,
                col=col,
            )
    _subplot_layout(fig)
    fig.update_xaxes(dtick=1 if top <= 16 else None, row=1, col=1)
    fig.update_xaxes(title="sequences in the step", row=1, col=1)
    fig.update_xaxes(title="padding (% of the shape's tokens)", row=1, col=2)
    fig.update_yaxes(title="steps (%)")
    return Plot(
        "batches",
        "Batch size and padding of graph-bucket prefills",
        f"Prefill steps replayed as CUDA graphs at load ×{load:g}: how many sequences each "
        "held, and how much of its padded shape was padding. Only policies that pad show.",
        fig,
    )
