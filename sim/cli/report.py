"""``llmsched report``: the comparison report from any folders of result records.

Examples::

    llmsched report runs/demo --out runs/demo-again
    llmsched report runs/sim-fcfs runs/live-fcfs --out runs/side-by-side --slo-ttft-ms 500

A folder is a sweep (``llmsched compare``), a run (``results.parquet``, with
``summary.json`` and ``queue.parquet`` when present: ``llmsched simulate``
or a replay against a live server) or a folder of runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from sim.cli._common import console, errors_to_exit
from sim.cli.compare import print_headline

__all__ = ["report"]


def report(
    run_dirs: Annotated[
        list[Path], typer.Argument(help="Folders with result records (sweeps or runs).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    title: Annotated[str | None, typer.Option(help="Report title.")] = None,
    slo_ttft_ms: Annotated[
        float | None, typer.Option(help="Recompute every summary with this TTFT SLO, ms.")
    ] = None,
    slo_tpot_ms: Annotated[
        float | None, typer.Option(help="Recompute every summary with this TPOT SLO, ms.")
    ] = None,
    short_prompt_tokens: Annotated[
        int | None,
        typer.Option(help="Short/long split: uncached prompt tokens (default 256).", min=1),
    ] = None,
    timeline_load: Annotated[
        float | None, typer.Option(help="Load of the single-point plots (default: highest).")
    ] = None,
    timeline_seed: Annotated[
        int | None, typer.Option(help="Seed of the single-point plots (default: first).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No table.")] = False,
) -> None:
    """Write report.html, summary.csv and summary.md from the records in RUN_DIRS."""
    from sim.report import ReportOptions, write_report
    from sim.report.build import check_slo_ms

    command = "llmsched report " + " ".join(map(str, run_dirs)) + f" --out {out}"
    with errors_to_exit():
        check_slo_ms(slo_ttft_ms, "--slo-ttft-ms")
        check_slo_ms(slo_tpot_ms, "--slo-tpot-ms")
        options = ReportOptions(
            title=title,
            slo_ttft_ms=slo_ttft_ms,
            slo_tpot_ms=slo_tpot_ms,
            short_prompt_tokens=short_prompt_tokens,
            timeline_load=timeline_load,
            timeline_seed=timeline_seed,
            command=command,
        )
        paths = write_report(list(run_dirs), out, options)
    if not quiet:
        print_headline(paths)
        if paths.takeaway:
            console.print(escape(paths.takeaway), highlight=False)
        console.print(
            f"Report: [bold]{escape(str(paths.html))}[/bold] "
            f"(also {paths.csv.name}, {paths.markdown.name})"
        )
