"""Build a report: read result records, tabulate, plot, write the files."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from sim.report.html import render
from sim.report.plots import build_plots
from sim.report.records import RunRecords, Sources, load_sources
from sim.report.tables import best_marks, headline, markdown, run_table
from sim.report.verdict import takeaway
from traces.errors import ConfigError

__all__ = ["ReportOptions", "ReportPaths", "build_report", "check_slo_ms", "write_report"]


@dataclass(frozen=True)
class ReportOptions:
    """What the report shows; unset values come from the sweep's scenario, else defaults.

    Attributes:
        title: page title.
        slo_ttft_ms, slo_tpot_ms: recompute every summary under these SLOs.
        short_prompt_tokens: the short/long split (uncached prompt tokens; default 256).
        timeline_load, timeline_seed: the point of the single-point plots
            (default: the highest load, its first seed).
        command: the command line shown under "Reproduce".
    """

    title: str | None = None
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    short_prompt_tokens: int | None = None
    timeline_load: float | None = None
    timeline_seed: int | None = None
    command: str | None = None

    def __post_init__(self) -> None:
        check_slo_ms(self.slo_ttft_ms, "slo_ttft_ms")
        check_slo_ms(self.slo_tpot_ms, "slo_tpot_ms")


def check_slo_ms(value: float | None, name: str) -> None:
    """Refuse an SLO that is not a finite number of ms above 0 (``name``: the field or flag).

    Raises:
        ConfigError: naming ``name``, the value and what was expected.
    """
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name}: expected an SLO above 0 ms, got {value:g}")


@dataclass(frozen=True)
class ReportPaths:
    """The files a report wrote, its headline table (:func:`sim.report.tables.headline`)
    and its one-line takeaway (:func:`sim.report.verdict.takeaway`)."""

    html: Path
    csv: Path
    markdown: Path
    table: pd.DataFrame
    takeaway: str = ""


def _scenario_report(sources: Sources) -> dict[str, Any]:
    if len(sources.sweeps) != 1:
        return {}
    return dict(sources.sweeps[0].get("scenario", {}).get("report") or {})


def _pick(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def build_report(sources: Sources, options: ReportOptions = ReportOptions()) -> dict[str, Any]:
    """The report's parts: ``html``, ``table`` (headline), ``marks``, ``runs`` (summary.csv)."""
    runs = sources.runs
    defaults = _scenario_report(sources)
    loads = sorted({r.load for r in runs})
    load = _pick(options.timeline_load, defaults.get("timeline_load"), loads[-1])
    if load not in loads:
        load = min(loads, key=lambda x: abs(x - load))
    seeds = sorted({r.seed for r in runs if r.load == load})
    seed = _pick(options.timeline_seed, defaults.get("timeline_seed"), seeds[0])
    threshold = int(_pick(options.short_prompt_tokens, defaults.get("short_prompt_tokens"), 256))
    slo_ttft_ms = _pick(options.slo_ttft_ms, _slo_ms(runs, "slo_ttft_s"))
    table = headline(runs)
    marks = best_marks(table)
    plots = build_plots(
        runs,
        table,
        load=load,
        seed=seed,
        short_prompt_tokens=threshold,
        slo_ttft_ms=slo_ttft_ms,
    )
    scenario = sources.sweeps[0].get("scenario", {}) if len(sources.sweeps) == 1 else {}
    title = _pick(
        options.title, defaults.get("title"), scenario.get("name"), "llmsched policy comparison"
    )
    labels = list(dict.fromkeys(r.label for r in runs))
    subtitle = (
        f"{scenario.get('description', '')} {len(labels)} policies × {len(loads)} loads × "
        f"{len({r.seed for r in runs})} seeds ({len(runs)} runs)."
    ).strip()
    slo_tpot = _slo_ms(runs, "slo_tpot_s")
    subtitle += f" SLOs: TTFT {_ms(slo_ttft_ms)}, TPOT {_ms(options.slo_tpot_ms or slo_tpot)}."
    sweep = sources.sweeps[0] if sources.sweeps else {}
    report_commit = _current_commit()
    command = options.command
    if command and report_commit:
        command += f"   (at git {report_commit})"
    reproduce = {
        "records_command": "\n".join(_sweep_command(s) for s in sources.sweeps) or None,
        "command": command,
        "versions": sweep.get("versions") or _current_versions(),
        "seeds": sorted({r.seed for r in runs}),
        "code_version": _code_version(sources.sweeps),
        "records_created_at": ", ".join(
            dict.fromkeys(str(s["created_at"]) for s in sources.sweeps if s.get("created_at"))
        )
        or None,
        "scenario": "\n\n".join(
            s.get("scenario_text") or "" for s in sources.sweeps if s.get("scenario_text")
        )
        or None,
        "sources": sorted({r.source for r in runs}),
        "created_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "resolved": [s.get("scenario") for s in sources.sweeps if s.get("scenario")] or None,
        "configs": None
        if sources.sweeps
        else {f"{r.label} (×{r.load:g}, seed {r.seed})": r.config for r in runs if r.config},
        "runs": [_run_origin(r) for r in runs],
    }
    line = takeaway(runs, short_prompt_tokens=threshold)
    page = render(
        title=title,
        subtitle=subtitle,
        table=table,
        marks=marks,
        plots=plots,
        reproduce=reproduce,
        takeaway=line,
    )
    return {
        "html": page,
        "table": table,
        "marks": marks,
        "runs": run_table(runs),
        "takeaway": line,
    }


def _sweep_command(sweep: dict[str, Any]) -> str:
    """The command that reruns a sweep from the scenario copy in its own folder.

    A band (``sim.band``) given by ``--band`` is in the resolved scenario but not in
    the copy, so it is passed again.
    """
    folder = Path(sweep["path"])
    files = sorted(folder.glob("scenario.*"))
    scenario = files[0] if files else folder / "scenario.toml"
    band = (sweep.get("scenario") or {}).get("band")
    flag = "" if band is None else " --band" if band == "profile" else f" --band {band:g}"
    return f"llmsched compare {scenario} --out {folder}{flag}"


def _code_version(sweeps: list[dict[str, Any]]) -> str | None:
    """The records' code: git commit (``-dirty``: uncommitted edits) and simulation digest."""
    parts = []
    for sweep in sweeps:
        digest = sweep.get("code_version")
        commit = sweep.get("git_commit")
        text = f"git {commit}" if commit else "git commit not recorded"
        if commit and commit.endswith("-dirty"):
            text += " (uncommitted edits)"
        if digest:
            text += f"; simulation code {digest}"
        parts.append(text)
    return " | ".join(dict.fromkeys(parts)) or None


def _run_origin(run: RunRecords) -> dict[str, Any]:
    """Where one run's records come from, for the page (``run.json``; older folders: unknown)."""
    meta = run.run
    row: dict[str, Any] = {"run": f"{run.label} (×{run.load:g}, seed {run.seed})"}
    if meta is None:
        return row | {"source": None, "target_url": None, "instances": None, "options": {}}
    instances = ", ".join(
        f"{i.name} ({i.role})" + (f" {i.url}" if i.url else "") for i in meta.instances
    )
    return row | {
        "source": meta.source,
        "target_url": meta.target_url,
        "instances": instances or None,
        "options": meta.options,
    }


def _slo_ms(runs: list, key: str) -> float | None:
    values = {r.summary.get(key) for r in runs} - {None}
    values = {v for v in values if not (isinstance(v, float) and math.isnan(v))}
    return float(next(iter(values))) * 1000.0 if len(values) == 1 else None


def _ms(value: float | None) -> str:
    return "unset" if value is None else f"{value:g} ms"


def _current_commit() -> str | None:
    from sim.sweep import git_commit

    return git_commit()


def _current_versions() -> dict[str, str]:
    from sim.sweep import versions

    return versions()


def write_report(
    dirs: list[str | Path], out_dir: str | Path, options: ReportOptions = ReportOptions()
) -> ReportPaths:
    """Read the records under ``dirs``; write ``report.html``, ``summary.csv``, ``summary.md``.

    ``summary.md`` opens with the takeaway line, then the headline table.

    Raises:
        ConfigError: a folder without result records (see :func:`load_sources`).
    """
    slo_ttft_s = None if options.slo_ttft_ms is None else options.slo_ttft_ms / 1000.0
    slo_tpot_s = None if options.slo_tpot_ms is None else options.slo_tpot_ms / 1000.0
    sources = load_sources(list(dirs), slo_ttft_s=slo_ttft_s, slo_tpot_s=slo_tpot_s)
    parts = build_report(sources, options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = ReportPaths(
        out / "report.html",
        out / "summary.csv",
        out / "summary.md",
        parts["table"],
        parts["takeaway"],
    )
    paths.html.write_text(parts["html"], encoding="utf-8")
    parts["runs"].to_csv(paths.csv, index=False)
    lead = f"{parts['takeaway']}\n\n" if parts["takeaway"] else ""
    paths.markdown.write_text(lead + markdown(parts["table"], parts["marks"]), encoding="utf-8")
    return paths
