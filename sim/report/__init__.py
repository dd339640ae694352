"""Comparison reports from result records: simulated sweeps, single runs, measured runs.

``write_report(dirs, out_dir)`` reads every run under ``dirs``
(:mod:`sim.report.records`), builds the headline table
(:mod:`sim.report.tables`) and the plots (:mod:`sim.report.plots`, numbers
from :mod:`sim.report.series`), and writes ``report.html`` (one
self-contained page, :mod:`sim.report.html`), ``summary.csv`` (one row per
run) and ``summary.md`` (the headline).
"""

from __future__ import annotations

from sim.report.build import ReportOptions, ReportPaths, build_report, write_report
from sim.report.records import RunRecords, Sources, load_sources

__all__ = [
    "ReportOptions",
    "ReportPaths",
    "RunRecords",
    "Sources",
    "build_report",
    "load_sources",
    "write_report",
]
