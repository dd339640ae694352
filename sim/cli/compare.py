"""``llmsched compare``: run a scenario's every (policy, load, seed) point and report.

Examples::

    llmsched compare examples/demo.toml --out runs/demo
    llmsched compare examples/laps.toml --out runs/laps --jobs 8
    llmsched compare big.toml --out runs/big --executor ray --address auto

writes ``runs/demo/report.html`` (one self-contained page), ``summary.csv``
(one row per point), ``summary.md`` (the headline table) and each point's
result records under ``points/``. Rerunning skips the points already there.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sim.cli._common import (
    BAND_HELP,
    NO_CLUSTER_FLAGS,
    ClusterFlags,
    ProgressLines,
    check_out_folder,
    cluster_flag_names,
    cluster_flags,
    console,
    errors_to_exit,
    parse_band,
    warn,
)

if TYPE_CHECKING:
    from sim.report import ReportPaths
    from sim.scenario import Scenario
    from sim.sweep import Executor, Point, SweepResult

__all__ = ["compare", "print_headline", "run_comparison", "warn_about_points"]


def run_comparison(
    scenario: Scenario,
    out: Path,
    executor: Executor,
    *,
    scenario_file: Path | None = None,
    force: bool = False,
    quiet: bool = False,
    command: str | None = None,
) -> tuple[SweepResult, ReportPaths]:
    """Run the sweep with a progress bar, then write the report into ``out``."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from sim.report import ReportOptions, write_report
    from sim.sweep import run_sweep

    columns = (
        TextColumn("[bold]points"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[last]}"),
    )
    lines = ProgressLines("points") if not quiet and not console.is_terminal else None
    with Progress(*columns, console=console, transient=True, disable=quiet) as bar:
        task = bar.add_task("points", total=None, last="")

        def started(total: int, cached: int) -> None:
            bar.update(task, total=total)
            if cached and not quiet:
                console.print(f"{cached} of {total} point(s) already in {out}; skipping them")
            if lines is not None:
                lines.total = total - cached

        def finished(point: Point, from_cache: bool) -> None:
            bar.update(task, advance=1, last="" if from_cache else point.id)
            if lines is not None and not from_cache:
                lines.advance(point.id)

        sweep = run_sweep(
            scenario,
            out,
            executor,
            scenario_file=scenario_file,
            force=force,
            on_point=finished,
            on_start=started,
        )
    report = scenario.report
    options = ReportOptions(
        title=report.title,
        short_prompt_tokens=report.short_prompt_tokens,
        timeline_load=report.timeline_load,
        timeline_seed=report.timeline_seed,
        command=command,
    )
    return sweep, write_report([out], out, options)


def print_headline(paths: ReportPaths) -> None:
    """The headline as a terminal table (TTFT, TPOT, SLO attainment, goodput; best in bold),
    each figure's band beside it where the runs have one (``sim.band``), then the report's
    one-line takeaway: which policy wins at which load, and why."""
    from rich.markup import escape
    from rich.table import Table

    from sim.report.tables import band, band_scales, best_marks

    table, marks = paths.table, best_marks(paths.table)
    scales = band_scales(table)
    view = Table(
        title="Headline (seed means; best at each load in bold)",
        caption=None
        if scales is None
        else f"(ranges: every step cost ×{scales[0]:g} and ×{scales[1]:g})",
    )
    view.add_column("policy")
    view.add_column("load", justify="right")
    cols = (
        ("TTFT p50 ms", "ttft_p50_s", 1000.0, "{:,.0f}"),
        ("TTFT p90 ms", "ttft_p90_s", 1000.0, "{:,.0f}"),
        ("TPOT p90 ms", "tpot_p90_s", 1000.0, "{:,.1f}"),
        ("SLO %", "slo_attainment", 100.0, "{:.1f}"),
        ("goodput req/s", "goodput_rps", 1.0, "{:.2f}"),
    )
    for name, *_ in cols:
        view.add_column(name, justify="right")
    last = None
    for i, row in table.iterrows():
        if last is not None and row["load"] != last:
            view.add_section()
        last = row["load"]
        cells = []
        for _, key, scale, fmt in cols:
            value = row[key]
            text = "-" if value != value else fmt.format(value * scale)
            text = f"[bold green]{text}[/]" if marks.loc[i, key] else text
            ends = band(row, key)
            if ends is not None and value == value:
                text += f" [dim]({fmt.format(ends[0] * scale)}–{fmt.format(ends[1] * scale)})[/]"
            cells.append(text)
        view.add_row(escape(str(row["label"])), f"×{row['load']:g}", *cells)
    console.print(view)
    if paths.takeaway:
        console.print(f"[bold]Takeaway:[/bold] {escape(paths.takeaway)}")


def warn_about_points(point_dirs: list[Path]) -> None:
    """Warn, in one line each, about points past capacity and points that rejected requests."""
    import json

    from sim.diagnose import diagnose_folder

    over: dict[float, dict[str, float]] = {}  # load -> label -> queue growth, req/s
    shares: list[float] = []
    rejected: list[str] = []
    kv_tokens: set[int | None] = set()
    labels: set[str] = set()
    for folder in point_dirs:
        meta = json.loads((folder / "point.json").read_text())
        label, load = meta["label"], float(meta["load"])
        labels.add(label)
        found = diagnose_folder(folder)
        if found.overload is not None:
            growth = over.setdefault(load, {})
            growth[label] = max(growth.get(label, 0.0), found.overload.growth_rps)
            shares.append(found.overload.growth_rps / found.overload.offered_rps)
        if found.rejections is not None:
            r = found.rejections
            kv_tokens.add(r.kv_tokens)
            rejected.append(
                f"{label} ×{load:g} seed {meta['seed']} ({r.n_rejected:,} of {r.n_requests:,})"
            )
    if over:
        n = sum(len(v) for v in over.values())
        at = "; ".join(
            f"×{load:g} " + ("every policy" if set(v) == labels else ", ".join(sorted(v)))
            for load, v in sorted(over.items())
        )
        warn(
            f"offered load exceeds capacity for {n} policy-load pair(s): {at}. Their waiting "
            f"queue grows through the run (by up to {max(shares):.0%} of arrivals), so their "
            "latencies grow with the trace's length (each policy's knee lies below that load)"
        )
    if rejected:
        kv = next(iter(kv_tokens)) if len(kv_tokens) == 1 else None
        cache = f"{kv:,} tokens" if kv else "what it holds"
        shown = ", ".join(rejected[:6]) + (
            f" and {len(rejected) - 6} more" if len(rejected) > 6 else ""
        )
        warn(
            f"requests rejected at {len(rejected)} point(s), their prompt plus output longer "
            f"than an instance's KV cache ({cache}; --max-total-tokens, a larger GPU or --tp "
            f"make room); they count in no latency: {shown}"
        )


@cluster_flags
def compare(
    scenario: Annotated[Path, typer.Argument(help="Scenario file (.toml, .yaml).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (also the cache).")],
    executor: Annotated[
        str, typer.Option(help="Where points run: local (processes) or ray.")
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster address (auto, ray://HOST:10001); default: a local Ray."),
    ] = None,
    jobs: Annotated[
        int | None, typer.Option("--jobs", "-j", help="Local processes (default: one per core).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rerun points already done.")] = False,
    band: Annotated[
        str | None, typer.Option("--band", metavar="[REL]", help=BAND_HELP, show_default=False)
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress, no table.")] = False,
    cluster: ClusterFlags = NO_CLUSTER_FLAGS,  # replaced by the flags (cluster_flags)
) -> None:
    """Compare policies: run every (policy, load, seed) point of SCENARIO and write a report.

    Engine-limit and simulator-option flags override the scenario's ``[cluster]`` keys.
    """
    with errors_to_exit():
        from sim.scenario import load_scenario, override_cluster
        from sim.sweep import make_executor

        check_out_folder(out)
        spec = load_scenario(scenario)
        if spec.cluster.pd is not None and "instances" in spec.cluster.model_fields_set:
            warn(
                f"{scenario}: cluster.instances = {spec.cluster.instances} is ignored: "
                f'cluster.pd = "{spec.cluster.pd}" sets the instances'
            )
        spec = override_cluster(
            spec, {"limits": cluster.limits, **cluster.options}, flags=cluster_flag_names()
        )
        spec.check_policies(str(scenario))
        if band is not None:
            rel = parse_band(
                band, spec.cluster.profile, profile_flag="cluster.profile in the scenario"
            )
            spec = spec.model_copy(update={"band": rel})
        runner = make_executor(executor, jobs=jobs, address=address)
        command = shlex.join(
            ["llmsched", "compare", str(scenario), "--out", str(out), *cluster.argv]
        )
        if executor != "local":
            command += f" --executor {executor}"
        if band is not None:
            command += " --band" if band == "profile" else f" --band {band}"
        sweep, paths = run_comparison(
            spec,
            out,
            runner,
            scenario_file=scenario,
            force=force,
            quiet=quiet,
            command=command,
        )
    if not quiet:
        print_headline(paths)
    warn_about_points(sweep.point_dirs)
    if not quiet:
        console.print(
            f"Ran {sweep.ran} point(s), {sweep.cached} from the cache. "
            f"Report: [bold]{paths.html}[/bold] (also {paths.csv.name}, {paths.markdown.name})"
        )
