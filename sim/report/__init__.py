"""Comparison reports from result records: simulated sweeps, single runs, measured runs.

``write_report(dirs, out_dir)`` reads every run under ``dirs``
(:mod:`sim.report.records`), builds the headline table
(:mod:`sim.report.tables`) and the plots (:mod:`sim.report.plots`, numbers
from :mod:`sim.report.series`), and writes ``report.html`` (one
self-contained page, :mod:`sim.report.html`), ``summary.csv`` (one row per
run) and ``summary.md`` (the headline). ``takeaway(runs)``
(:mod:`sim.report.verdict`) is the one line over the headline, which
policy wins at which load and why, for any command to print.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sim.report.build import ReportOptions, ReportPaths, build_report, write_report
    from sim.report.records import RunRecords, Sources, load_sources
    from sim.report.verdict import takeaway

#: Where each name lives: loaded on first use, so reading records
#: (:mod:`sim.report.records`) does not load plotly.
_HOMES = {
    "ReportOptions": "sim.report.build",
    "ReportPaths": "sim.report.build",
    "build_report": "sim.report.build",
    "write_report": "sim.report.build",
    "RunRecords": "sim.report.records",
    "Sources": "sim.report.records",
    "load_sources": "sim.report.records",
    "takeaway": "sim.report.verdict",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'sim.report' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)


__all__ = [
    "ReportOptions",
    "ReportPaths",
    "RunRecords",
    "Sources",
    "build_report",
    "load_sources",
    "takeaway",
    "write_report",
]
