"""``llmsched demo``: the README's main command, on the bundled traces."""

from __future__ import annotations

from sim.cli._common import console, errors_to_exit
from sim.cli.trace import print_stats_table
from traces.bundled import BUNDLED, bundled_path
from traces.loaders import load
from traces.stats import trace_stats

__all__ = ["demo"]


def demo() -> None:
    """Statistics of every trace bundled with llmsched, side by side."""
    with errors_to_exit():
        results = []
        for name in BUNDLED:
            trace = load(bundled_path(name))
            trace.name = name
            results.append(trace_stats(trace))
    print_stats_table(results)
    console.print(
        "Bundled traces and their licenses: traces/data/README.md. "
        "Try: llmsched trace stats FILE, llmsched trace gen -o out.parquet"
    )
