"""Reading result records from folders: simulated sweeps, single runs, measured runs.

A folder given to the report is one of:

* a sweep (``llmsched compare``): ``sweep.json`` and ``points/<id>/``;
* a run: ``results.parquet``, with ``summary.json`` and ``queue.parquet``
  (and ``batches.parquet``) when the writer had them;
* a folder of runs: sub-folders holding ``results.parquet``.

Only ``results.parquet`` is required, with at least the columns of
:data:`REQUIRED_COLUMNS` (:mod:`traces.records`); a run without
``summary.json`` (a replay against a live server, say) is summarized from
its records by the same definitions the simulator's summary uses
(:func:`traces.metrics.summarize`). ``run.json``, when the writer left one,
says where the records come from and each instance's role; folders written
before it existed are read as all-``mixed`` instances. A run's label comes from its point
or config (``label``, else ``policy``), else the records' ``policy`` column,
else the folder's name; a label found in several folders gets the folder's
name appended, so simulated and measured runs of one policy sit side by side.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from traces.errors import ConfigError
from traces.metrics import WRITER_ONLY_KEYS, summarize
from traces.records import REQUIRED_COLUMNS, RunMetadata, read_run_metadata

__all__ = ["REQUIRED_COLUMNS", "RunRecords", "Sources", "load_sources", "summary_from_frame"]


@dataclass
class RunRecords:
    """One run's records: results, summary, the optional queue and batch logs, ``run.json``."""

    label: str
    load: float
    seed: int
    source: str
    path: Path
    results: pd.DataFrame
    summary: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    queue: pd.DataFrame | None = None
    batches: pd.DataFrame | None = None
    #: Where the records come from and which instance is which (None: an older folder).
    run: RunMetadata | None = None

    @property
    def offered_rps(self) -> float:
        """Requests over the arrival span (NaN for fewer than two)."""
        a = self.results["arrival_s"].to_numpy(dtype=float)
        span = float(a.max() - a.min()) if len(a) > 1 else 0.0
        return len(a) / span if span > 0 else math.nan


@dataclass
class Sources:
    """Everything read for a report: the runs, and each sweep's metadata."""

    runs: list[RunRecords]
    sweeps: list[dict[str, Any]] = field(default_factory=list)


def load_sources(
    dirs: list[str | Path],
    *,
    slo_ttft_s: float | None = None,
    slo_tpot_s: float | None = None,
) -> Sources:
    """Read every run under ``dirs`` (see the module docstring).

    With an SLO given, every summary is recomputed from the records under it
    (keeping the written summary's ITL and utilization, which records cannot
    carry, and its bands of figures no SLO changes); otherwise a run's
    ``summary.json`` is used as written.

    Raises:
        ConfigError: a folder without records, records missing a required
            column, or an invalid ``run.json``.
    """
    runs: list[RunRecords] = []
    sweeps: list[dict[str, Any]] = []
    names = _source_names([Path(d) for d in dirs])
    override = slo_ttft_s is not None or slo_tpot_s is not None
    for d, name in zip(dirs, names, strict=True):
        d = Path(d)
        if not d.is_dir():
            raise ConfigError(f"{d}: no such folder")
        if (d / "sweep.json").is_file():
            meta = json.loads((d / "sweep.json").read_text())
            meta["path"], meta["source"] = str(d), name
            scenario_files = sorted(d.glob("scenario.*"))
            meta["scenario_text"] = scenario_files[0].read_text() if scenario_files else None
            sweeps.append(meta)
            ids = meta.get("points") or sorted(p.name for p in (d / "points").iterdir())
            run_dirs = [d / "points" / i for i in ids if (d / "points" / i).is_dir()]
        elif (d / "results.parquet").is_file():
            run_dirs = [d]
        else:
            run_dirs = sorted(p.parent for p in d.glob("*/results.parquet"))
        if not run_dirs:
            raise ConfigError(
                f"{d}: no result records (results.parquet, or a sweep's sweep.json and points/)"
            )
        for rd in run_dirs:
            runs.append(_read_run(rd, name, override, slo_ttft_s, slo_tpot_s))
    _disambiguate(runs)
    return Sources(runs, sweeps)


def _source_names(dirs: list[Path]) -> list[str]:
    names = [d.resolve().name or str(d) for d in dirs]
    if len(set(names)) < len(names):
        return [str(d) for d in dirs]
    return names


def _read_run(
    d: Path, source: str, override: bool, slo_ttft_s: float | None, slo_tpot_s: float | None
) -> RunRecords:
    results_path = d / "results.parquet"
    results = pd.read_parquet(results_path)
    missing = [c for c in REQUIRED_COLUMNS if c not in results.columns]
    if missing:
        raise ConfigError(
            f"{results_path}: missing column(s) {', '.join(missing)}; "
            f"result records need {', '.join(REQUIRED_COLUMNS)}"
        )
    summary: dict[str, Any] = {}
    if (d / "summary.json").is_file():
        summary = json.loads((d / "summary.json").read_text())
    config = summary.get("config") or {}
    point = json.loads((d / "point.json").read_text()) if (d / "point.json").is_file() else {}
    run = read_run_metadata(d)
    if override or not summary:
        ttft = slo_ttft_s if override else summary.get("slo_ttft_s")
        tpot = slo_tpot_s if override else summary.get("slo_tpot_s")
        fresh = summary_from_frame(results, ttft, tpot, run=run)
        # What records cannot carry (ITL, utilization) does not depend on the SLO, nor do
        # the bands of latencies and throughput (those of SLO attainment and goodput do).
        kept = {k: summary[k] for k in WRITER_ONLY_KEYS if summary.get(k) is not None}
        kept |= {k: v for k, v in summary.items() if _slo_free_band(k) and v is not None}
        summary = {**fresh, **kept, "config": config}
    label = point.get("label") or config.get("label") or _label_from(config, summary, results, d)
    queue = pd.read_parquet(d / "queue.parquet") if (d / "queue.parquet").is_file() else None
    batches = None
    if (d / "batches.parquet").is_file():
        batches = pd.read_parquet(d / "batches.parquet")
    return RunRecords(
        label=str(label),
        load=float(point.get("load", config.get("load", 1.0))),
        seed=int(point.get("seed", config.get("seed", 0))),
        source=source,
        path=d,
        results=results,
        summary=summary,
        config=config,
        queue=queue,
        batches=batches,
        run=run,
    )


#: Bands (``<key>_lo``, ``<key>_hi``, see :mod:`sim.report.tables`) an SLO cannot change.
_SLO_FREE = ("ttft_", "tpot_", "e2e_", "itl_", "queue_delay_", "throughput_", "band_")


def _slo_free_band(key: str) -> bool:
    return key.endswith(("_lo", "_hi")) and key.startswith(_SLO_FREE)


def _label_from(config: dict, summary: dict, results: pd.DataFrame, d: Path) -> str:
    policy = config.get("policy")
    if policy:
        decode = config.get("decode_policy")
        return f"{policy}+{decode}" if decode else str(policy)
    if "policy" in results.columns and len(results):
        return str(results["policy"].iloc[0])
    return str(summary.get("policy") or d.name)


def _disambiguate(runs: list[RunRecords]) -> None:
    sources_of: dict[str, set[str]] = {}
    for r in runs:
        sources_of.setdefault(r.label, set()).add(r.source)
    for r in runs:
        if len(sources_of[r.label]) > 1:
            r.label = f"{r.label} [{r.source}]"


def summary_from_frame(
    frame: pd.DataFrame,
    slo_ttft_s: float | None,
    slo_tpot_s: float | None,
    *,
    run: RunMetadata | None = None,
) -> dict[str, Any]:
    """The summary of ``results.parquet`` records (:func:`traces.metrics.summarize`).

    Columns other than :data:`REQUIRED_COLUMNS` may be missing (see
    :meth:`traces.metrics.RecordArrays.from_frame`); per-request SLO columns,
    when present, override the run-wide SLOs as in the simulator's summary.
    Instance roles come from ``run`` when given, else every instance the
    records name is ``mixed``. Inter-token latencies and utilization are not
    in the records, so they are NaN.
    """
    roles = run.roles if run is not None and run.instances else None
    return summarize(frame, slo_ttft_s, slo_tpot_s, roles=roles)
