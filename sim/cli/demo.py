"""``llmsched demo``: the README's main command, policy comparisons on two workloads.

Prints the statistics of every bundled trace, then compares routing policies
and ``laps`` on two workloads where they differ for different reasons, each
its own scenario and report:

* ``chat`` (``examples/demo-chat.toml``): multi-turn chat, mostly short
  re-prefills of a conversation the serving instance has cached, among a few
  long documents: LAPS's home ground;
* ``documents`` (``examples/demo.toml``): the bundled Mooncake trace of long
  documents sharing prefixes, where nearly every prefill is long and where
  each one lands decides.

Each comparison prints its headline table and one line saying which policy
wins at which load and why (:func:`sim.report.verdict.takeaway`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, NamedTuple

import typer

from sim.cli._common import check_out_folder, console, errors_to_exit
from sim.cli.compare import print_headline, run_comparison, warn_about_points

__all__ = ["DEMO_SCENARIO", "DEMO_WORKLOADS", "DemoWorkload", "demo"]

_EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class DemoWorkload(NamedTuple):
    """One comparison of the demo: its folder under ``--out``, scenario file and gist."""

    folder: str
    scenario: Path
    gist: str


#: The demo's comparisons, in the order they run (scenarios in the source tree).
DEMO_WORKLOADS = (
    DemoWorkload(
        "chat",
        _EXAMPLES / "demo-chat.toml",
        "multi-turn chat: short re-prefills among long ones (LAPS's home ground)",
    ),
    DemoWorkload(
        "documents",
        _EXAMPLES / "demo.toml",
        "long documents: nearly every prefill long, placement decides",
    ),
)
#: The long-document scenario (``examples/demo.toml``), which ``sim.compare`` examples use.
DEMO_SCENARIO = DEMO_WORKLOADS[1].scenario


def demo(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (one subfolder per workload).")
    ] = Path("runs/demo"),
    jobs: Annotated[
        int | None, typer.Option("--jobs", "-j", help="Local processes (default: one per core).")
    ] = None,
    stats: Annotated[
        bool, typer.Option("--stats/--no-stats", help="Print the bundled traces' statistics first.")
    ] = True,
) -> None:
    """Statistics of the bundled traces, then policy comparisons on two workloads, with reports."""
    from traces.errors import ConfigError

    reports: list[Path] = []
    ran = cached = 0
    with errors_to_exit():
        check_out_folder(out)
        if stats:
            _print_bundled_stats()
        for workload in DEMO_WORKLOADS:
            if not workload.scenario.is_file():
                raise ConfigError(
                    f"{workload.scenario}: a demo scenario is missing (it ships in the source "
                    "tree); run llmsched compare SCENARIO --out DIR with a scenario of your own"
                )
        from sim.scenario import load_scenario
        from sim.sweep import LocalExecutor

        executor = LocalExecutor(jobs)
        for workload in DEMO_WORKLOADS:
            scenario = load_scenario(workload.scenario)
            folder = out / workload.folder
            n = len(scenario.policies) * len(scenario.loads) * len(scenario.seeds)
            console.print(
                f"\n[bold]{workload.folder}[/bold]: {workload.gist}.\n"
                f"Comparing {', '.join(p.display for p in scenario.policies)} on "
                f"{scenario.trace.describe()} at loads "
                f"{', '.join(f'×{x:g}' for x in scenario.loads)} ({n} simulations)"
            )
            sweep, paths = run_comparison(
                scenario,
                folder,
                executor,
                scenario_file=workload.scenario,
                command=f"llmsched demo --out {out}  (examples/{workload.scenario.name})",
            )
            print_headline(paths)
            warn_about_points(sweep.point_dirs)
            reports.append(paths.html)
            ran, cached = ran + sweep.ran, cached + sweep.cached
    console.print(
        f"\nRan {ran} simulation(s), {cached} from the cache in {out}.\n"
        + "".join(f"Report: [bold]{html}[/bold]\n" for html in reports)
        + "(open them in a browser; they work offline). Why the winners differ: README.md, "
        "'make demo'. Bundled traces and their licenses: traces/data/README.md.\n"
        "Next: llmsched compare SCENARIO --out DIR (scenarios in examples/), llmsched policies"
    )


def _print_bundled_stats() -> None:
    """The statistics table of every bundled trace.

    The project's own data is known: what a loader warns about in a user's
    file (one out-of-order pair in RAGPulse, sorted stably) is not news here.
    """
    from sim.cli.trace import print_stats_table
    from traces.bundled import BUNDLED, bundled_path
    from traces.loaders import load
    from traces.stats import trace_stats

    results = []
    for name in BUNDLED:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trace = load(bundled_path(name))
        trace.name = name
        results.append(trace_stats(trace))
    print_stats_table(results)
