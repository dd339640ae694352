"""``llmsched demo``: the README's main command, a policy comparison on a bundled trace.

Prints the statistics of every bundled trace, then runs ``examples/demo.toml``
(routing policies on the bundled Mooncake synthetic trace, plus ``laps``
when that policy is registered) and writes the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sim.cli._common import check_out_folder, console, errors_to_exit
from sim.cli.compare import print_headline, run_comparison, warn_about_points

__all__ = ["DEMO_SCENARIO", "demo"]

#: The demo's scenario, in the source tree beside the packages.
DEMO_SCENARIO = Path(__file__).resolve().parents[2] / "examples" / "demo.toml"


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("runs/demo"),
    jobs: Annotated[
        int | None, typer.Option("--jobs", "-j", help="Local processes (default: one per core).")
    ] = None,
    stats: Annotated[
        bool, typer.Option("--stats/--no-stats", help="Print the bundled traces' statistics first.")
    ] = True,
) -> None:
    """Statistics of the bundled traces, then a policy comparison on one of them, with a report."""
    with errors_to_exit():
        from sim.cli.trace import print_stats_table
        from sim.scenario import load_scenario
        from sim.sweep import LocalExecutor
        from traces.bundled import BUNDLED, bundled_path
        from traces.errors import ConfigError
        from traces.loaders import load
        from traces.stats import trace_stats

        check_out_folder(out)
        if stats:
            results = []
            for name in BUNDLED:
                trace = load(bundled_path(name))
                trace.name = name
                results.append(trace_stats(trace))
            print_stats_table(results)
        if not DEMO_SCENARIO.is_file():
            raise ConfigError(
                f"{DEMO_SCENARIO}: the demo scenario is missing (it ships in the source tree); "
                "run llmsched compare SCENARIO --out DIR with a scenario of your own"
            )
        scenario = load_scenario(DEMO_SCENARIO)
        n = len(scenario.policies) * len(scenario.loads) * len(scenario.seeds)
        console.print(
            f"Comparing {', '.join(p.display for p in scenario.policies)} on "
            f"{scenario.trace.describe()} at loads {', '.join(f'×{x:g}' for x in scenario.loads)} "
            f"({n} simulations)"
        )
        sweep, paths = run_comparison(
            scenario,
            out,
            LocalExecutor(jobs),
            scenario_file=DEMO_SCENARIO,
            command=f"llmsched demo --out {out}  (examples/demo.toml, and laps when registered)",
        )
    print_headline(paths)
    warn_about_points(sweep.point_dirs)
    console.print(
        f"Ran {sweep.ran} simulation(s), {sweep.cached} from the cache in {out}.\n"
        f"Report: [bold]{paths.html}[/bold]  (open it in a browser; works offline)\n"
        "Bundled traces and their licenses: traces/data/README.md. "
        "Next: llmsched compare SCENARIO --out DIR (scenarios in examples/), llmsched policies"
    )
