"""The policy matrix: each policy's knee (the most load it takes at 90% SLO attainment) per scenario.

Scenarios (cells) cross two model/GPU pairs (Llama-3.1-8B on H100,
Qwen2.5-32B on H200), workloads (the bundled Azure 2023 conversation and
code traces; the generator's ``chat`` and ``api`` presets at inter-arrival
CV 1 and 4) and topologies (1, 4 and 8 instances; PD with one prefill and
three decode instances, and 2:6, decode instances picked by
``least_load``). SLO: TTFT 0.4 s, TPOT 0.1 s.

For each cell and policy a coarse-to-fine search (``bench/_matrix.py``,
:class:`KneeSearch`) finds the knee on the seed-mean attainment: steps of
1.6x out from a guess until 90% is bracketed, bisection in log load to a
5% bracket, log-linear interpolation inside it. Then every policy runs at
the best baseline's knee (the common load), for goodput there and for
which requests miss: short or long (uncached prompt tokens against laps's
``threshold_tokens``, else 256, as the report does) and where they lost
their time (router hold, instance queue, prefill, decode).

Measurement guards: each run spans ``span_s`` of arrivals (several minutes
of chat, many request lifetimes; capped at ``--max-requests``), the first
10% of the span is warm-up and not counted, attainment is averaged over
seeds (each seed another generated trace or another window of a bundled
one), goodput is reported at a common load beside the knee, and each knee
carries flags: ``flat`` (one point of attainment moves it more than 10%),
``cliff``, ``nonmono``, ``noisy`` (seeds 10 points apart), ``short`` (a
span under 30 request lifetimes, mean end-to-end latency, at the knee).
Knees within the 5% bracket of laps's count as ties in its rank. With one
entry instance (``x1``, ``pd1:3``) every routing baseline makes the same
choice, so only ``fcfs`` runs there and the others are its copies
(``--no-dedupe`` runs them all).

Rows are policies with parameters (``--policies``): a baseline, ``laps``
(ranked), and ablations of laps (any other row named laps, e.g. the default
``laps placement=backlog``: its placement across instances without the skew
bound, and ``laps mode=spatial``: short and long pools), each with its knee
over the best baseline's.

Policies see what a router can know: ``prefix_knowledge = "estimate"``
(the router-side prefix record) for every policy, and backend gauges as
the simulator's ``poll_interval_ms`` gives them (``--poll-ms``, default 0:
read at each decision; see ``docs/laps.md`` for why not the router's
500 ms).
Each request can be charged a per-request overhead (``--request-overhead-ms``,
default 0; the head-to-head measured about 2 ms on emulated workers): a
policy that releases held work on a first token meets it at every release.

    .venv/bin/python bench/bench_policy_matrix.py --quick          # about 1.5 min, 2 cores
    .venv/bin/python bench/bench_policy_matrix.py                  # 8-11 min, 2 cores
    .venv/bin/python bench/bench_policy_matrix.py --table runs/policy-matrix/matrix.json
    .venv/bin/python bench/bench_policy_matrix.py --cells 'qwen32b-h200/chat-*/*' \\
        --policies fcfs least_load laps "laps mode=spatial" "laps window_ms=0"
    .venv/bin/python bench/bench_policy_matrix.py --list           # the cells

Writes ``--out`` (default ``runs/policy-matrix/``): ``matrix.json`` (every
cell, policy, point and miss breakdown) and ``matrix.csv`` (one row per cell
and policy).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _matrix import (  # noqa: E402
    MISS_PLACES,
    Cell,
    KneeSearch,
    PolicyRow,
    miss_breakdown,
    overhead_profile,
    parse_policy,
    select_cells,
)

__all__ = ["BASELINES", "build_cells", "main", "run_matrix"]

SLO_TTFT_S, SLO_TPOT_S, TARGET = 0.4, 0.1, 0.9
#: A knee measured over fewer request lifetimes (span / mean end-to-end latency) is flagged.
MIN_LIFETIMES = 30.0
DEFAULT_SHORT_TOKENS = 256
BASELINES = ("fcfs", "round_robin", "least_load", "power_of_two", "cache_aware", "bucket")
#: The ablation rows: placement by queued tokens only, and one long request per release.
DEFAULT_POLICIES = (*BASELINES, "laps", "laps backlog=queued", "laps long_batch_tokens=0")
#: laps parameters that matter only with several entry instances.
_MULTI_ONLY = {"mode": "temporal", "placement": None, "max_skew_requests": None, "backlog": None}

PAIRS = {"llama8b-h100": ("llama-3.1-8b", "h100"), "qwen32b-h200": ("qwen2.5-32b", "h200")}
WORKLOADS = (
    ("bundled:azure-conv", None),
    ("bundled:azure-code", None),
    ("chat", 1.0),
    ("chat", 4.0),
    ("api", 1.0),
    ("api", 4.0),
)
TOPOLOGIES = ((1, None), (4, None), (8, None), (4, "1:3"), (8, "2:6"))
#: Where the search starts: a rough knee per entry instance, req/s (it steps from there).
GUESS_PER_INSTANCE = {
    "qwen32b-h200": {"chat": 7.5, "api": 2.5, "azure-conv": 2.75, "azure-code": 2.5},
    "llama8b-h100": {"chat": 30.0, "api": 5.0, "azure-conv": 16.0, "azure-code": 7.0},
}
#: Arrival span per run, s: chat requests live about 6-8 s, API ones about 1 s.
SPAN_S = {"chat": 240.0, "azure-conv": 240.0, "api": 120.0, "azure-code": 240.0}


@dataclass(frozen=True)
class Setup:
    """Sizes of one run of the matrix."""

    seeds: tuple[int, ...] = (1, 2)
    max_requests: int = 16000
    span_scale: float = 1.0
    tol: float = 0.05
    max_bisect: int = 3
    poll_ms: float = 0.0
    #: Per-request overhead every simulated request pays (:func:`_matrix.overhead_profile`).
    request_overhead_ms: float = 0.0
    #: The profile file carrying that overhead, per ``"model/gpu"`` of the cells (written
    #: beside matrix.json); empty: the catalogue's cost models.
    profiles: dict[str, str] = field(default_factory=dict)
    dedupe: bool = True
    #: Every axis value around the paper's pair (Qwen2.5-32B on H200, chat, CV 1):
    #: each topology; burstier chat and the bundled conversations on 4 and 8
    #: instances; the other pair on chat, API (where Qwen2.5-32B cannot keep 90%
    #: of 2k-token prompts under 0.4 s at any load) and the bundled traces.
    #: ``--cells all`` is the whole cross (60 cells, hours; Llama chat on 4 or 8
    #: instances needs ``--max-requests 40000`` for 30 request lifetimes).
    cells: tuple[str, ...] = (
        "qwen32b-h200/chat-cv1/*",
        "qwen32b-h200/chat-cv4/x4",
        "qwen32b-h200/azure-conv/x4",
        "qwen32b-h200/azure-conv/x8",
        "qwen32b-h200/api-cv4/x4",
        "llama8b-h100/chat-cv1/x1",
        "llama8b-h100/chat-cv1/pd1:3",
        "llama8b-h100/api-cv1/x4",
        "llama8b-h100/api-cv4/x4",
        "llama8b-h100/api-cv4/x8",
        "llama8b-h100/azure-conv/x4",
        "llama8b-h100/azure-code/x4",
    )

    @classmethod
    def quick(cls) -> Setup:
        """A few minutes: four cells, a lower cap on requests, a coarser bracket."""
        return cls(
            seeds=(1, 2),
            max_requests=6000,
            span_scale=1.0,
            tol=0.08,
            max_bisect=2,
            cells=(
                "qwen32b-h200/chat-cv1/x4",
                "qwen32b-h200/chat-cv1/pd1:3",
                "qwen32b-h200/azure-conv/x4",
                "llama8b-h100/api-cv4/x4",
            ),
        )


def build_cells(span_scale: float = 1.0) -> list[Cell]:
    """Every cell of the matrix (two pairs x six workloads x five topologies)."""
    from traces.bundled import bundled_path
    from traces.loaders import load

    native: dict[str, tuple[float, float]] = {}
    cells = []
    for short, (model, gpu) in PAIRS.items():
        for workload, cv in WORKLOADS:
            base = workload.removeprefix("bundled:")
            rate = span = 0.0
            if workload.startswith("bundled:"):
                if base not in native:
                    arrivals = load(bundled_path(base)).frame["arrival_s"]
                    span = float(arrivals.max() - arrivals.min())
                    native[base] = (len(arrivals) / span, span)
                rate, span = native[base]
            for instances, pd in TOPOLOGIES:
                entry = int(pd.split(":")[0]) if pd else instances
                cells.append(
                    Cell(
                        model=model,
                        gpu=gpu,
                        short=short,
                        workload=workload,
                        cv=cv,
                        instances=instances,
                        pd=pd,
                        guess_rps=GUESS_PER_INSTANCE[short][base] * entry,
                        span_s=SPAN_S[base] * span_scale,
                        native_rps=rate,
                        native_span_s=span,
                    )
                )
    return cells


# -- one run (in a worker) ---------------------------------------------------------------


def short_tokens(row: PolicyRow) -> int:
    """The short/long cut of the miss breakdown: laps's own threshold, else the report's 256."""
    if row.is_laps:
        return int(row.params.get("threshold_tokens", DEFAULT_SHORT_TOKENS))
    return DEFAULT_SHORT_TOKENS


def run_point(cell: Cell, row: PolicyRow, load: float, seed: int, setup: Setup) -> dict[str, Any]:
    """Simulate one (cell, policy, load, seed); attainment, goodput and the miss breakdown."""
    import sim

    cluster: dict[str, Any] = {"pd": cell.pd} if cell.pd else {"instances": cell.instances}
    if cell.pd:
        cluster["decode_policy"] = "least_load"
    profile = setup.profiles.get(f"{cell.model}/{cell.gpu}")
    if profile:
        cluster["profile"] = profile
    started = time.perf_counter()
    try:
        result = sim.run(
            cell.trace(load, seed, setup.max_requests),
            row.name,
            policy_params=dict(row.params),
            label=row.label,
            model=cell.model,
            gpu=cell.gpu,
            slo_ttft_ms=SLO_TTFT_S * 1000,
            slo_tpot_ms=SLO_TPOT_S * 1000,
            seed=seed,
            poll_interval_ms=setup.poll_ms,
            **cluster,
        )
    except Exception as exc:  # a run that cannot finish counts as missing everything
        return {"error": f"{type(exc).__name__}: {exc}", "attainment": 0.0, "goodput_rps": 0.0}
    out = miss_breakdown(
        result.records,
        slo_ttft_s=SLO_TTFT_S,
        slo_tpot_s=SLO_TPOT_S,
        short_tokens=short_tokens(row),
    )
    out["attainment"] = out["met"] / out["n"] if out["n"] else 0.0
    out["goodput_rps"] = out["met"] / out["span_s"] if out["span_s"] > 0 else 0.0
    out["prefix_hit_rate"] = result.summary.get("prefix_hit_rate")
    out["wall_s"] = time.perf_counter() - started
    return out


# -- the search over all cells ---------------------------------------------------------------


@dataclass
class Search:
    """One (cell, policy): its knee search, then its run at the cell's common load."""

    cell: Cell
    row: PolicyRow
    knee: KneeSearch
    runs: dict[float, list[dict[str, Any]]] = field(default_factory=dict)
    common: list[dict[str, Any]] | None = None
    done: bool = False


def run_matrix(
    cells: Sequence[Cell],
    rows: Sequence[PolicyRow],
    setup: Setup,
    *,
    jobs: int = 2,
    log: Any = print,
) -> dict[str, Any]:
    """Every cell's knees and common-load runs; a JSON-able dict.

    With one entry instance (``x1``, ``pd1:D``) every routing baseline sends
    each request to the same place, so only the first baseline runs there
    (unless ``setup.dedupe`` is off) and the others are reported as its copies.
    """
    alias = {
        (c.id, r.label): aliased_to(c, r, rows) if setup.dedupe else None
        for c in cells
        for r in rows
    }
    searches = {
        (c.id, r.label): Search(
            c,
            r,
            KneeSearch(c.guess_rps, target=TARGET, tol=setup.tol, max_bisect=setup.max_bisect),
        )
        for c in cells
        for r in rows
        if alias[(c.id, r.label)] is None
    }
    common_load: dict[str, float] = {}
    pending: dict[Future, tuple[tuple[str, str], str, float, int]] = {}
    partial: dict[tuple[tuple[str, str], str, float], dict[int, dict[str, Any]]] = {}
    total_runs = 0
    started = time.perf_counter()

    def submit(pool: ProcessPoolExecutor, key: tuple[str, str], phase: str, load: float) -> None:
        nonlocal total_runs
        s = searches[key]
        for seed in setup.seeds:
            fut = pool.submit(run_point, s.cell, s.row, load, seed, setup)
            pending[fut] = (key, phase, load, seed)
            total_runs += 1

    def advance(pool: ProcessPoolExecutor, key: tuple[str, str]) -> None:
        s = searches[key]
        nxt = s.knee.next_load()
        if nxt is not None:
            submit(pool, key, "search", nxt)
            return
        s.done = True
        cell_id = s.cell.id
        base = [
            searches[(cell_id, r.label)]
            for r in rows
            if not r.is_laps and (cell_id, r.label) in searches
        ]
        if cell_id in common_load or not all(b.done for b in base):
            return
        knees = [b.knee.knee for b in base]
        finite = [k for k in knees if k is not None and k > 0]
        if any(k is None for k in knees):  # some baseline beyond the range: use the most tried
            finite.append(max(x for b in base for x in b.knee.points))
        common_load[cell_id] = max(finite) if finite else s.cell.guess_rps
        for r in rows:
            if (cell_id, r.label) in searches:
                submit(pool, (cell_id, r.label), "common", common_load[cell_id])

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        # Largest cells first, so the last ones to finish are small.
        order = sorted(
            searches, key=lambda k: -searches[k].cell.guess_rps * searches[k].cell.span_s
        )
        for key in order:
            advance(pool, key)
        finished = 0
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                key, phase, load, seed = pending.pop(fut)
                slot = partial.setdefault((key, phase, load), {})
                slot[seed] = fut.result()
                finished += 1
                if len(slot) < len(setup.seeds):
                    continue
                outs = [slot[sd] for sd in setup.seeds]
                del partial[(key, phase, load)]
                s = searches[key]
                if phase == "search":
                    s.runs[load] = outs
                    s.knee.add(load, [o["attainment"] for o in outs])
                    advance(pool, key)
                else:
                    s.common = outs
            if finished % 50 == 0 or not pending:
                n_cells = sum(
                    1 for c in cells if all(s.common for k, s in searches.items() if k[0] == c.id)
                )
                log(
                    f"  {finished} runs, {n_cells}/{len(cells)} cells done, "
                    f"{time.perf_counter() - started:.0f} s"
                )
    return _collect(cells, rows, searches, alias, common_load, setup, time.perf_counter() - started)


def aliased_to(cell: Cell, row: PolicyRow, rows: Sequence[PolicyRow]) -> str | None:
    """The baseline whose runs ``row`` would repeat exactly in ``cell``, if any.

    With one entry instance a routing baseline has one choice, so every
    baseline without parameters places requests as the first one does, and
    ``laps mode=temporal`` or ``laps placement=...`` is ``laps``.
    """
    entry = int(cell.pd.split(":")[0]) if cell.pd else cell.instances
    if entry != 1:
        return None
    if row.is_laps:
        # auto mode is temporal, and placement has one choice, on one entry instance.
        plain = next((r for r in rows if r.is_laps and not r.params), None)
        same = bool(row.params) and all(
            k in _MULTI_ONLY and _MULTI_ONLY[k] in (None, v) for k, v in dict(row.params).items()
        )
        return plain.label if plain is not None and same else None
    if row.params:
        return None
    first = next(r for r in rows if not r.is_laps and not r.params)
    return None if first.label == row.label else first.label


def _mean(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else math.nan


def _misses(outs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Seed totals of the miss breakdown at one load, as shares."""
    n = sum(o.get("n", 0) for o in outs)
    miss = {c: sum(o.get(f"miss_{c}", 0) for o in outs) for c in ("short", "long")}
    count = {c: sum(o.get(f"n_{c}", 0) for o in outs) for c in ("short", "long")}
    where = {
        c: {p: sum(o.get("where", {}).get(c, {}).get(p, 0) for o in outs) for p in MISS_PLACES}
        for c in ("short", "long")
    }
    total = miss["short"] + miss["long"]
    return {
        "n": n,
        "miss_share": total / n if n else math.nan,
        "short_share": count["short"] / n if n else math.nan,
        "short_miss_rate": miss["short"] / count["short"] if count["short"] else math.nan,
        "long_miss_rate": miss["long"] / count["long"] if count["long"] else math.nan,
        "long_share_of_misses": miss["long"] / total if total else math.nan,
        "where": {
            p: (where["short"][p] + where["long"][p]) / total if total else math.nan
            for p in MISS_PLACES
        },
        "where_by_class": where,
    }


def _collect(cells, rows, searches, alias, common_load, setup, wall_s) -> dict[str, Any]:
    out_cells = []
    for c in cells:
        entries = []
        for r in rows:
            same = alias[(c.id, r.label)]
            if same is not None:
                copy = dict(next(e for e in entries if e["label"] == same))
                entries.append(
                    copy | {"label": r.label, "policy": r.name, "same_as": same, "runs": 0}
                )
                continue
            s = searches[(c.id, r.label)]
            k = s.knee
            common = s.common or []
            near = s.runs.get(k.bracket()[0] or -1.0) or s.runs.get(k.bracket()[1] or -1.0) or []
            lifetimes = _mean([o["span_s"] / o["lifetime_s"] for o in near if o.get("lifetime_s")])
            entries.append(
                {
                    "label": r.label,
                    "policy": r.name,
                    "params": dict(r.params),
                    "baseline": not r.is_laps,
                    "knee_rps": k.knee,
                    "flags": k.flags() + (["short"] if lifetimes < MIN_LIFETIMES else []),
                    "min_load_rps": min(k.points) if k.points else math.nan,
                    "max_attainment": max((k.mean(x) for x in k.points), default=math.nan),
                    "shift_per_point": k.shift_per_point(),
                    "seed_spread": k.seed_spread(),
                    "span_lifetimes": lifetimes,
                    "points": {f"{x:.4g}": v for x, v in sorted(k.points.items())},
                    "common_attainment": _mean([o["attainment"] for o in common]),
                    "common_goodput_rps": _mean([o["goodput_rps"] for o in common]),
                    "common_hit_rate": _mean([o.get("prefix_hit_rate") for o in common]),
                    "misses": _misses(common),
                    "errors": sorted(
                        {o["error"] for v in s.runs.values() for o in v if "error" in o}
                        | {o["error"] for o in common if "error" in o}
                    ),
                    "runs": sum(len(v) for v in s.runs.values()) + len(common),
                }
            )
        out_cells.append(
            {
                "cell": c.id,
                **asdict(c),
                "common_load_rps": common_load.get(c.id),
                "policies": entries,
            }
        )
    return {"setup": asdict(setup), "wall_s": wall_s, "cells": out_cells}


# -- the table ---------------------------------------------------------------------------------


def _knee_value(e: dict[str, Any]) -> float:
    """Sort key of a knee: above the range counts as infinite."""
    return math.inf if e["knee_rps"] is None else e["knee_rps"]


def summarize_cell(cell: dict[str, Any], main: str = "laps", tol: float = 0.05) -> dict[str, Any]:
    """laps's rank among the baselines and itself, and its ratios to the best baseline.

    Knees within ``tol`` (the search's bracket) of laps's count as ties: the
    rank is 1 + the policies whose knee is more than that above laps's; no
    rank (None) where no baseline reaches the target at all.
    """
    entries = cell["policies"]
    base = [e for e in entries if e["baseline"]]
    lap = next((e for e in entries if e["label"] == main), None) or next(
        (e for e in entries if not e["baseline"]), None
    )
    if not base or lap is None:
        return {}
    best = max(base, key=_knee_value)
    ranked = sorted([*base, lap], key=_knee_value, reverse=True)
    rank = 1 + sum(1 for e in ranked if _knee_value(e) > _knee_value(lap) * (1.0 + tol))
    if not _knee_value(best):
        rank = None
    bk, lk = _knee_value(best), _knee_value(lap)
    ratio = lk / bk if bk and math.isfinite(bk) and math.isfinite(lk) else math.nan
    g_best = best["common_goodput_rps"]
    g_ratio = lap["common_goodput_rps"] / g_best if g_best else math.nan
    variants = {
        e["label"]: (_knee_value(e) / bk if bk and math.isfinite(bk) else math.nan)
        for e in entries
        if not e["baseline"] and e is not lap
    }
    return {
        "best": best,
        "laps": lap,
        "rank": rank,
        "of": len(ranked),
        "ratio": ratio,
        "goodput_ratio": g_ratio,
        "variants": variants,
    }


def _fmt_knee(e: dict[str, Any]) -> str:
    if e["knee_rps"] is None:
        return ">max"
    if e["knee_rps"] == 0:  # the attainment at the lowest load tried, in percent
        return f"<{e['min_load_rps']:.2g}:{e['max_attainment']:.0%}"
    return f"{e['knee_rps']:.3g}"


def _fmt_misses(e: dict[str, Any]) -> str:
    m = e["misses"]
    if not m["n"] or math.isnan(m["miss_share"]):
        return "-"
    where = {p: v for p, v in m["where"].items() if v == v and v >= 0.1}
    parts = " ".join(f"{p[:5]} {v:.0%}" for p, v in sorted(where.items(), key=lambda kv: -kv[1]))
    long_share = m["long_share_of_misses"]
    return f"{m['miss_share']:.0%} miss, {long_share:.0%} long; {parts}"


def table(result: dict[str, Any], rows: Sequence[PolicyRow]) -> str:
    """One line per cell: every policy's knee, laps's rank and ratio, goodput ratio, flags."""
    labels = [r.label for r in rows]
    # A row with parameters is headed by them (``mode=temporal`` for ``laps mode=temporal``).
    heads = [" ".join(x.split()[1:]) if " " in x else x for x in labels]
    widths = [max(6, min(len(h), 13)) for h in heads]
    variants = [(lab, h) for r, lab, h in zip(rows, labels, heads, strict=True) if r.is_laps]
    variants = [(lab, h) for lab, h in variants if lab != "laps"]
    head = f"{'cell':<32} {'load*':>6} "
    head += " ".join(f"{h[:13]:>{w}}" for h, w in zip(heads, widths, strict=True))
    head += f" {'rank':>5} {'laps/best':>9} {'good@load*':>10}"
    head += "".join(f" {h + '/best':>{len(h) + 5}}" for _, h in variants) + "  flags"
    lines = [head, "-" * len(head)]
    for cell in result["cells"]:
        s = summarize_cell(cell)
        by = {e["label"]: e for e in cell["policies"]}
        knees = " ".join(f"{_fmt_knee(by[x]):>{w}}" for x, w in zip(labels, widths, strict=True))
        load = cell["common_load_rps"]
        ablations = "".join(
            f" {s.get('variants', {}).get(lab, math.nan):>{len(h) + 5}.2f}" for lab, h in variants
        )
        # The flags of the two knees the ratio divides (every row's are in the files).
        shown = [("laps", s["laps"]), ("best", s["best"])] if s else []
        flags = [f"{who}:{'+'.join(e['flags'])}" for who, e in shown if e["flags"]]
        lines.append(
            f"{cell['cell']:<32} {load or math.nan:>6.3g} {knees} "
            f"{(str(s['rank']) + '/' + str(s['of'])) if s.get('rank') else '-':>5} "
            f"{s.get('ratio', math.nan):>9.2f} {s.get('goodput_ratio', math.nan):>10.2f}"
            f"{ablations}  " + ",".join(flags)
        )
    lines.append("")
    lines.append(
        "knees in requests/s at 90% SLO attainment (TTFT 0.4 s, TPOT 0.1 s); load* = the best "
        "baseline's knee; rank of laps among the baselines and itself (within 5%: a tie); laps/best and "
        "<ablation>/best: knee over the best baseline's; good@load* = laps's goodput / the best "
        "baseline's there; <x:y%: "
        "below 90% at the lowest load tried (x req/s, y% attainment); flags of laps and of the best baseline: "
        "flat (1 point of attainment moves the knee >10%), cliff, nonmono, noisy (seeds >10 "
        "points apart), short (span < 30 request lifetimes), low/high (knee outside the range)"
    )
    lines.append("")
    mh = f"{'cell':<32} {'best baseline':<14} {'its misses at load*':<44} laps's misses at load*"
    lines += [mh, "-" * len(mh)]
    for cell in result["cells"]:
        s = summarize_cell(cell)
        if not s:
            continue
        lines.append(
            f"{cell['cell']:<32} {s['best']['label'][:14]:<14} {_fmt_misses(s['best']):<44} "
            f"{_fmt_misses(s['laps'])}"
        )
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "matrix.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    fields = [
        "cell",
        "label",
        "baseline",
        "knee_rps",
        "ratio_to_best",
        "common_load_rps",
        "common_attainment",
        "common_goodput_rps",
        "miss_share",
        "short_miss_rate",
        "long_miss_rate",
        "long_share_of_misses",
        *(f"miss_{p}" for p in MISS_PLACES),
        "shift_per_point",
        "seed_spread",
        "span_lifetimes",
        "flags",
        "errors",
    ]
    with (out / "matrix.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for cell in result["cells"]:
            s = summarize_cell(cell)
            bk = _knee_value(s["best"]) if s else math.nan
            for e in cell["policies"]:
                m = e["misses"]
                w.writerow(
                    {
                        "cell": cell["cell"],
                        "label": e["label"],
                        "baseline": e["baseline"],
                        "knee_rps": e["knee_rps"],
                        "ratio_to_best": _knee_value(e) / bk if bk and math.isfinite(bk) else "",
                        "common_load_rps": cell["common_load_rps"],
                        "common_attainment": e["common_attainment"],
                        "common_goodput_rps": e["common_goodput_rps"],
                        "miss_share": m["miss_share"],
                        "short_miss_rate": m["short_miss_rate"],
                        "long_miss_rate": m["long_miss_rate"],
                        "long_share_of_misses": m["long_share_of_misses"],
                        **{f"miss_{p}": m["where"][p] for p in MISS_PLACES},
                        "shift_per_point": e["shift_per_point"],
                        "seed_spread": e["seed_spread"],
                        "span_lifetimes": e["span_lifetimes"],
                        "flags": " ".join(e["flags"]),
                        "errors": " | ".join(e["errors"]),
                    }
                )


def machine() -> str:
    """CPU model and core count, for the record."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores, Python {platform.python_version()}"


def commit() -> str:
    """HEAD, with ``+changes`` when the simulation's packages differ from it in the work tree."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "sim", "scheduler", "traces"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="four cells, shorter spans (minutes)")
    ap.add_argument(
        "--cells", nargs="+", help="glob patterns over cell ids (--list shows them); 'all'"
    )
    ap.add_argument(
        "--policies",
        nargs="+",
        default=list(DEFAULT_POLICIES),
        help="rows: a name, or a quoted name with key=value params ('laps mode=temporal'); "
        "rows named laps are laps's (the one labelled 'laps' is ranked), others baselines",
    )
    ap.add_argument("--seeds", type=int, nargs="+", help="seeds (default 1 2)")
    ap.add_argument("--max-requests", type=int, help="cap on requests per run")
    ap.add_argument("--poll-ms", type=float, help="gauge poll interval the policies see, ms")
    ap.add_argument(
        "--request-overhead-ms",
        type=float,
        help="per-request overhead every simulated request pays, ms (default 0; the "
        "head-to-head measured about 2 ms on emulated workers)",
    )
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument(
        "--no-dedupe",
        action="store_true",
        help="run every baseline even with one entry instance, where they coincide",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "policy-matrix")
    ap.add_argument("--list", action="store_true", help="list the selected cells and exit")
    ap.add_argument("--table", type=Path, help="print the tables of a matrix.json again and exit")
    args = ap.parse_args(argv)
    if args.table:
        result = json.loads(args.table.read_text())
        print(table(result, [parse_policy(p) for p in result["policies"]]))
        print(
            f"\n{result['date']}; {result['machine']}; commit {result['commit']}; "
            f"{result['wall_s']:.0f} s"
        )
        return 0

    setup = Setup.quick() if args.quick else Setup()
    if args.seeds:
        setup = replace(setup, seeds=tuple(args.seeds))
    if args.max_requests:
        setup = replace(setup, max_requests=args.max_requests)
    if args.poll_ms is not None:
        setup = replace(setup, poll_ms=args.poll_ms)
    if args.request_overhead_ms is not None:
        if not args.request_overhead_ms >= 0:
            raise SystemExit(
                f"--request-overhead-ms: expected 0 or more; got {args.request_overhead_ms}"
            )
        setup = replace(setup, request_overhead_ms=args.request_overhead_ms)
    if args.no_dedupe:
        setup = replace(setup, dedupe=False)
    patterns = args.cells if args.cells else list(setup.cells)
    if patterns == ["all"]:
        patterns = []
    cells = select_cells(build_cells(setup.span_scale), patterns)
    if args.list or not cells:
        for c in cells:
            print(f"{c.id:<36} guess {c.guess_rps:6.1f} req/s, span {c.span_s:.0f} s")
        if not cells:
            print("no cell matches", " ".join(patterns), file=sys.stderr)
        return 0 if cells else 2
    if setup.request_overhead_ms > 0:
        args.out.mkdir(parents=True, exist_ok=True)
        overhead_s = setup.request_overhead_ms / 1000.0
        pairs = sorted({(c.model, c.gpu) for c in cells})
        profiles = {f"{m}/{g}": str(overhead_profile(m, g, overhead_s, args.out)) for m, g in pairs}
        setup = replace(setup, profiles=profiles)
    rows = [parse_policy(p) for p in args.policies]
    from scheduler.registry import create

    for r in rows:
        create(r.name, **dict(r.params))  # a bad name or parameter fails before anything runs
    print(
        f"policy matrix: {len(cells)} cells x {len(rows)} policies, seeds {list(setup.seeds)}, "
        f"up to {setup.max_requests} requests a run, poll {setup.poll_ms:g} ms, "
        f"request overhead {setup.request_overhead_ms:g} ms, "
        f"prefix_knowledge estimate, {args.jobs} jobs"
    )
    from sim.sweep import code_version

    # Taken before the runs: the code the workers load when they start.
    provenance = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "commit": commit(),
        "code_version": code_version(),
    }
    result = run_matrix(cells, rows, setup, jobs=args.jobs)
    result |= {
        **provenance,
        "policies": [r.label for r in rows],
        "quick": args.quick,
    }
    print()
    print(table(result, rows))
    print()
    runs = sum(e["runs"] for c in result["cells"] for e in c["policies"])
    print(
        f"{runs} runs in {result['wall_s']:.0f} s on {args.jobs} jobs ({result['machine']}); "
        f"started {result['date']} at commit {result['commit']}, "
        f"simulation code {result['code_version'][:12]}"
    )
    write_outputs(result, args.out)
    print(f"wrote {args.out / 'matrix.json'} and {args.out / 'matrix.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
