"""The report page: one self-contained HTML file (plotly.js inline once, no network)."""

from __future__ import annotations

import html
import json
import math
from typing import Any

import pandas as pd
from plotly.offline import get_plotlyjs

from sim.report.plots import Plot
from sim.report.tables import GLANCE, HEADLINE, Metric, band, band_scales

__all__ = ["render"]

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2330;background:#fafbfc}
main{max-width:1280px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:34px 0 8px;border-bottom:1px solid #dde1e6;padding-bottom:4px}
h3{font-size:15px;margin:0 0 4px}.meta{color:#5b6472;font-size:13px}
nav a{margin-right:14px;color:#2457a6;text-decoration:none;font-size:13px}
.takeaway{font-size:15px;background:#fff;border-left:4px solid #2457a6;padding:8px 12px;margin:10px 0 12px}
.scroll{overflow-x:auto;background:#fff;border:1px solid #dde1e6;border-radius:6px}
table{border-collapse:collapse;font-size:12.5px;font-variant-numeric:tabular-nums;width:100%}
th,td{padding:4px 6px;text-align:right;white-space:nowrap;border-bottom:1px solid #eef0f3}
th{background:#f3f5f8;font-weight:600;position:sticky;top:0}
td.l,th.l{text-align:left}tr.first td{border-top:2px solid #c9ced6}
th.g,td.g{border-left:1px solid #dde1e6}
td.best{background:#dff3e3;font-weight:700;color:#0f5a23}
.band{display:block;font-size:10.5px;font-weight:400;color:#6b7480;white-space:normal}
details{margin-top:10px}summary{cursor:pointer;font-size:13px;color:#2457a6}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(560px,1fr));gap:18px}
figure{margin:0;background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:12px;min-width:0}
figure.wide{grid-column:1/-1}figcaption{color:#5b6472;font-size:12.5px;margin-top:6px}
pre{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:10px;overflow-x:auto;font-size:12px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;font-size:13px}dt{font-weight:600}
"""

_DEFINITIONS = (
    ("TTFT", "first token − arrival (router queue, prefill queue and prefill)"),
    ("TPOT", "(finish − first token) / (output tokens − 1), requests with 2+ output tokens"),
    ("E2E", "finish − arrival"),
    ("SLO attainment", "completed requests meeting both the TTFT and TPOT SLO"),
    ("goodput", "completed requests meeting the SLOs, per second of the run"),
    ("throughput", "completed requests per second (last finish − first arrival)"),
    ("load", "× the trace's arrival rate (arrival times divided by the load)"),
    (
        "time running steps",
        "share of the run each instance spent running engine steps, mean over instances "
        "(summary.csv: share_of_time_running_steps); 100% means never idle, not overloaded",
    ),
    (
        "band",
        "where a run carries one: the same figure with every step cost scaled down and up "
        "by the calibration's error, shown under the figure and shaded in the plots",
    ),
)


def _e(value: Any) -> str:
    return html.escape(str(value))


def _headline_table(
    table: pd.DataFrame, marks: pd.DataFrame, metrics: tuple[Metric, ...], table_id: str
) -> str:
    """Policy, load and offered rate, then ``metrics`` under their group headers; bands beneath."""
    groups: dict[str, int] = {}
    for m in metrics:
        groups[m.group] = groups.get(m.group, 0) + 1
    units = {m.group: m.unit for m in metrics}
    top = '<tr><th class="l" rowspan="2">policy</th><th rowspan="2">load</th>'
    top += '<th rowspan="2">offered<br>req/s</th>'
    # A group of one column names its unit underneath, so the header is no wider than it.
    top += "".join(
        f'<th class="g" colspan="{n}">{_e(g)}{f" ({_e(units[g])})" if n > 1 else ""}</th>'
        for g, n in groups.items()
    )
    starts = {next(m.key for m in metrics if m.group == g) for g in groups}

    def sub_header(m: Metric) -> str:
        if groups[m.group] > 1:
            return _e(m.name)
        return _e(m.unit) if m.name == m.unit else f"{_e(m.name)}<br>({_e(m.unit)})"

    sub = "".join(
        f"<th{' class=g' if m.key in starts else ''}>{sub_header(m)}</th>" for m in metrics
    )
    body = []
    last_load = None
    for i, row in table.iterrows():
        first = row["load"] != last_load
        last_load = row["load"]
        offered = row["offered_rps"]
        cells = [
            f'<td class="l">{_e(row["label"])}</td>',
            f"<td>×{row['load']:g}</td>",
            f"<td>{'-' if math.isnan(offered) else f'{offered:,.2f}'}</td>",
        ]
        for m in metrics:
            classes = (["g"] if m.key in starts else []) + (["best"] if marks.loc[i, m.key] else [])
            attrs = f' class="{" ".join(classes)}"' if classes else ""
            if marks.loc[i, m.key]:
                attrs += ' title="best at this load"'
            text = _e(m.fmt(row[m.key]))
            rng = band(row, m.key)
            if rng is not None:
                # The range may break after its dash when the window is narrow.
                lo, hi = _e(_short(m, rng[0])), _e(_short(m, rng[1]))
                text += f'<span class="band">{lo}–<wbr>{hi}</span>'
            cells.append(f"<td{attrs}>{text}</td>")
        body.append(f"<tr{' class=first' if first else ''}>{''.join(cells)}</tr>")
    return (
        f'<div class="scroll"><table id="{table_id}"><thead>{top}</tr><tr>{sub}</tr>'
        f"</thead><tbody>{''.join(body)}</tbody></table></div>"
    )


def _short(metric: Metric, value: float) -> str:
    """A band's end in three figures (``1.25k``, ``102k``), so a range fits under its value."""
    shown = value * metric.scale
    if metric.unit != "%" and abs(shown) >= 1000:
        return f"{shown / 1000:.3g}k"
    return metric.fmt(value)


def _band_note(table: pd.DataFrame) -> str:
    scales = band_scales(table)
    if scales is None:
        return ""
    return _e(
        f" Small figures under a value are its band: the same runs with every step cost "
        f"scaled ×{scales[0]:g} and ×{scales[1]:g}."
    )


def _wide(plots: list[Plot]) -> list[bool]:
    """Which figures span the grid's row: the wide ones, and the last of an odd run of others.

    So that no figure sits alone in a half-empty row when the grid has two columns.
    """
    wide = [p.id in _WIDE for p in plots]
    run: list[int] = []
    for i in [*range(len(plots)), None]:
        if i is None or wide[i]:
            if len(run) % 2:
                wide[run[-1]] = True
            run = []
        else:
            run.append(i)
    return wide


#: Figures that always take a whole row (time on the x axis, or many lines).
_WIDE = frozenset({"ttft-cdf", "timeline"})


def _figure(plot: Plot, wide: bool) -> str:
    div = plot.figure.to_html(
        full_html=False,
        include_plotlyjs=False,
        div_id=f"plot-{plot.id}",
        config={"displaylogo": False, "responsive": True},
    )
    cls = ' class="wide"' if wide else ""
    return (
        f'<figure{cls}><h3>{_e(plot.title)}</h3><div class="plot" data-plot="{_e(plot.id)}">'
        f"{div}</div><figcaption>{_e(plot.caption)}</figcaption></figure>"
    )


def _origins(rows: list[dict[str, Any]]) -> str:
    """Each run's writer, target, instances and policy-feeding options (from ``run.json``)."""
    if not rows:
        return ""
    head = "".join(
        f'<th class="l">{h}</th>' for h in ("run", "records from", "instances", "options")
    )
    body = []
    for r in rows:
        source = r.get("source") or "unknown (no run.json)"
        if r.get("target_url"):
            source += f" → {r['target_url']}"
        options = ", ".join(f"{k}={v}" for k, v in (r.get("options") or {}).items()) or "-"
        cells = (r["run"], source, r.get("instances") or "-", options)
        body.append("<tr>" + "".join(f'<td class="l">{_e(c)}</td>' for c in cells) + "</tr>")
    return (
        f"<details open><summary>Where each run's records come from</summary>"
        f'<div class="scroll"><table id="run-origins"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div></details>"
    )


def render(
    *,
    title: str,
    subtitle: str,
    table: pd.DataFrame,
    marks: pd.DataFrame,
    plots: list[Plot],
    reproduce: dict[str, Any],
    takeaway: str = "",
) -> str:
    """The whole page.

    ``takeaway`` is the line over the headline (:func:`sim.report.verdict.takeaway`).
    ``reproduce`` holds ``records_command`` (what reruns the records),
    ``command`` (what made this report), ``versions`` (name -> version),
    ``seeds``, ``code_version`` (one line: git commit, dirty or not, and the
    simulation code's digest), ``scenario`` (the file's text), ``resolved``
    (the scenarios as run), ``configs`` (per-run set-ups, for runs outside a
    sweep), ``sources`` (folder names), ``runs`` (per run: ``run``,
    ``source``, ``target_url``, ``instances``, ``options``, from its
    ``run.json``), ``records_created_at`` and ``created_at``.
    """
    figures = "".join(_figure(p, w) for p, w in zip(plots, _wide(plots), strict=True))
    versions = "".join(
        f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in reproduce.get("versions", {}).items()
    )
    facts = [
        ("records made by", reproduce.get("records_command")),
        ("report made by", reproduce.get("command")),
        ("seeds", ", ".join(map(str, reproduce.get("seeds", []))) or "-"),
        ("code version", reproduce.get("code_version") or "-"),
        ("records from", ", ".join(reproduce.get("sources", []))),
        ("records written", reproduce.get("records_created_at")),
        ("report written", reproduce.get("created_at")),
    ]
    fact_html = "".join(
        f"<dt>{_e(k)}</dt><dd><code>{_e(v)}</code></dd>" for k, v in facts if v is not None
    )
    definitions = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in _DEFINITIONS)
    scenario = reproduce.get("scenario")
    scenario_html = f"<h3>Scenario</h3><pre>{_e(scenario)}</pre>" if scenario else ""
    resolved = reproduce.get("resolved")
    if resolved:
        text = json.dumps(resolved[0] if len(resolved) == 1 else resolved, indent=2)
        scenario_html += (
            "<details><summary>Scenario as run (every default filled in)</summary>"
            f"<pre>{_e(text)}</pre></details>"
        )
    configs = reproduce.get("configs")
    if configs:
        text = json.dumps(configs, indent=2, default=str)
        scenario_html += (
            f"<details><summary>Run configurations</summary><pre>{_e(text)}</pre></details>"
        )
    scenario_html += _origins(reproduce.get("runs") or [])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><style>{_CSS}</style>
<script>{get_plotlyjs()}</script>
</head><body><main>
<header><h1>{_e(title)}</h1><p class="meta">{_e(subtitle)}</p>
<nav><a href="#headline">Headline</a><a href="#plots">Plots</a><a href="#reproduce">Reproduce</a>
<a href="#definitions">Definitions</a></nav></header>
<section id="headline"><h2>Headline</h2>
{f'<p class="takeaway" id="takeaway">{_e(takeaway)}</p>' if takeaway else ""}
<p class="meta">Per policy at each load, averaged over seeds; the best value of each column
at each load is highlighted.{_band_note(table)}</p>{_headline_table(table, marks, GLANCE, "headline-table")}
<details><summary>Every figure: means and p99s too</summary>
{_headline_table(table, marks, HEADLINE, "full-table")}</details></section>
<section id="plots"><h2>Plots</h2><div class="grid">{figures}</div></section>
<section id="reproduce"><h2>Reproduce</h2><dl>{fact_html}</dl>
<h3>Versions</h3><dl>{versions}</dl>{scenario_html}</section>
<section id="definitions"><h2>Definitions</h2><dl>{definitions}</dl></section>
</main></body></html>
"""
