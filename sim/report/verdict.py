"""The report's one-line takeaway: which policy wins at which load, and why.

A policy *wins* a load when its seed-mean SLO attainment is the highest
there (to a tenth of a percentage point, so near-ties are named together);
runs without any SLO are ranked by p90 TTFT instead. The *why* comes from
the result records at the load where the winner's lead over the runner-up
is widest: how many requests the runner-up misses against the winner, which
requests they are (short or long prompts; late on the first token or slow
to decode) and where the late ones spent their time to first token (held
by the router, queued on an instance, or prefilling). Where the summaries
carry bands (``<key>_lo``, ``<key>_hi``: see :mod:`sim.report.tables`), the
line says whether the lead holds at both ends.

:func:`takeaway` is the whole contract: other commands (``llmsched demo``)
print the same line the report shows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from sim.report.records import RunRecords
from traces import metrics as m

__all__ = ["takeaway"]

#: SLO attainment closer than this (a fraction) is a tie: the report shows one decimal of %.
_TIE_SLO = 0.0005
#: p90 TTFT within this factor is a tie when runs have no SLO.
_TIE_TTFT = 0.005


@dataclass(frozen=True)
class _Score:
    """How one criterion ranks policies: a summary key, which way is better, how it reads."""

    key: str
    better: str  # "max" or "min"
    noun: str

    def text(self, value: float) -> str:
        if self.key == "slo_attainment":
            return f"{value * 100:.1f}%"
        return _seconds(value)

    def tied(self, a: float, b: float) -> bool:
        if self.key == "slo_attainment":
            return abs(a - b) < _TIE_SLO
        return abs(a - b) <= _TIE_TTFT * max(abs(a), abs(b))


_SLO = _Score("slo_attainment", "max", "SLO attainment")
_TTFT = _Score("ttft_p90_s", "min", "p90 TTFT")


def takeaway(runs: Sequence[RunRecords], *, short_prompt_tokens: int = 256) -> str:
    """One sentence: which policy wins at which load, and why, from the runs' records.

    ``runs`` are the runs of a report (:func:`sim.report.load_sources`), any
    number of policies, loads and seeds; ``short_prompt_tokens`` is the
    short/long split (uncached prompt tokens). A single policy gets a line
    about itself; no runs, an empty string.
    """
    if not runs:
        return ""
    scores = _scores(runs)
    score = _SLO if scores[_SLO.key].notna().any() else _TTFT
    table = scores.dropna(subset=[score.key])
    if table.empty:
        return "No completed requests: nothing to compare."
    labels = list(dict.fromkeys(r.label for r in runs))
    if len(labels) == 1:
        return _alone(labels[0], table, score)
    winners: dict[float, list[str]] = {}
    margins: dict[float, float] = {}
    for load, rows in table.groupby("load", sort=True):
        ranked = rows.sort_values(score.key, ascending=score.better == "min", kind="stable")
        best = float(ranked[score.key].iloc[0])
        winners[load] = [
            str(r.label) for r in ranked.itertuples() if score.tied(getattr(r, score.key), best)
        ]
        rest = ranked[~ranked["label"].isin(winners[load])]
        margins[load] = abs(best - float(rest[score.key].iloc[0])) if len(rest) else 0.0
    head = _who_wins(winners, score)
    decisive = max(margins, key=lambda load: (margins[load], load))
    if margins[decisive] == 0.0:
        return head + "."
    rows = table[table["load"] == decisive].sort_values(
        score.key, ascending=score.better == "min", kind="stable"
    )
    winner = winners[decisive][0]
    runner = str(rows[~rows["label"].isin(winners[decisive])]["label"].iloc[0])
    value = {str(r.label): float(getattr(r, score.key)) for r in rows.itertuples()}
    head += (
        f" (at ×{decisive:g}: {score.text(value[winner])} against {runner}'s "
        f"{score.text(value[runner])})"
    )
    why = _why(runs, decisive, winner, runner, short_prompt_tokens)
    robust = _robust(runs, decisive, winner, runner, score)
    return "; ".join(p for p in (head, why, robust) if p) + "."


def _robust(
    runs: Sequence[RunRecords], load: float, winner: str, runner: str, score: _Score
) -> str:
    """Whether the lead holds at both ends of the band (step costs scaled down and up).

    Both policies' ends come from the same scaling, so the lead holds when the
    winner is ahead at each end, whatever the bands' overlap.
    """
    ends = []
    for end in ("lo", "hi"):
        key = f"{score.key}_{end}"
        w = _mean(runs, load, winner, key)
        r = _mean(runs, load, runner, key)
        if w != w or r != r:
            return ""
        ahead = w > r if score.better == "max" else w < r
        ends.append((ahead, w, r))
    if all(ahead for ahead, _, _ in ends):
        return "the lead holds with step costs scaled down and up (its band)"
    flipped = [f"{score.text(r)} against {score.text(w)}" for ahead, w, r in ends if not ahead]
    return (
        f"within its band the lead is not robust: with step costs scaled, {runner} "
        f"reaches {flipped[0]}"
    )


def _mean(runs: Sequence[RunRecords], load: float, label: str, key: str) -> float:
    values = [_num(r.summary.get(key)) for r in runs if r.label == label and r.load == load]
    values = [v for v in values if v == v]
    return float(np.mean(values)) if values else math.nan


def _scores(runs: Sequence[RunRecords]) -> pd.DataFrame:
    """Seed means of the ranking figures per label and load (label order kept)."""
    rows = [
        {
            "label": r.label,
            "load": r.load,
            _SLO.key: _num(r.summary.get(_SLO.key)),
            _TTFT.key: _num(r.summary.get(_TTFT.key)),
        }
        for r in runs
    ]
    frame = pd.DataFrame(rows)
    return frame.groupby(["label", "load"], sort=False, as_index=False).mean()


def _num(value: object) -> float:
    return float(value) if isinstance(value, int | float) and value is not None else math.nan


def _alone(label: str, table: pd.DataFrame, score: _Score) -> str:
    parts = [f"×{r.load:g} {score.text(getattr(r, score.key))}" for r in table.itertuples()]
    return f"{label} alone, nothing to compare: {score.noun} " + ", ".join(parts) + "."


def _who_wins(winners: dict[float, list[str]], score: _Score) -> str:
    """``laps wins at ×0.5–×1, cache_aware at ×1.25`` (loads in order, runs of equal winners)."""
    loads = list(winners)
    spans: list[tuple[list[str], list[float]]] = []
    for load in loads:
        if spans and spans[-1][0] == winners[load]:
            spans[-1][1].append(load)
        else:
            spans.append((winners[load], [load]))
    phrases = []
    for i, (names, at) in enumerate(spans):
        who = " and ".join(names)
        verb = ("tie" if len(names) > 1 else "wins") if i == 0 else ""
        where = "at every load" if len(spans) == 1 and len(loads) > 1 else _span(at)
        phrases.append(" ".join(p for p in (who, verb, where) if p))
    return f"On {score.noun}, " + ", ".join(phrases)


def _span(loads: list[float]) -> str:
    if len(loads) == 1:
        return f"at ×{loads[0]:g}"
    if len(loads) == 2:
        return f"at ×{loads[0]:g} and ×{loads[1]:g}"
    return f"at ×{loads[0]:g}–×{loads[-1]:g}"


def _why(runs: Sequence[RunRecords], load: float, winner: str, runner: str, threshold: int) -> str:
    """Which of the runner-up's requests miss, and where the late ones wait, against the winner's."""
    lost = _misses(runs, load, runner, threshold)
    won = _misses(runs, load, winner, threshold)
    if lost is None or won is None or lost.n == 0:
        return ""
    text = f"{runner} misses the SLO on {_count(lost.n)} requests to {winner}'s {_count(won.n)}"
    if lost.short_share >= 0.5:
        text += (
            f", {lost.short_share:.0%} of them short prompts (≤\u00a0{threshold:,} uncached tokens)"
        )
    else:
        text += f", {1 - lost.short_share:.0%} of them long prompts (>\u00a0{threshold:,} uncached tokens)"
    if lost.late_share >= 0.5 and lost.waits:
        part, share = max(lost.waits.items(), key=lambda kv: kv[1])
        text += (
            f"; their late first tokens spent {share:.0%} of their TTFT {part} "
            f"(median TTFT {_seconds(lost.late_ttft_p50_s)}"
        )
        if won.late_ttft_p50_s == won.late_ttft_p50_s:
            text += f"; {winner}'s {_seconds(won.late_ttft_p50_s)}"
        text += ")"
    elif lost.late_share < 0.5:
        text += f"; {1 - lost.late_share:.0%} of them miss on TPOT, not on the first token"
    if lost.not_done:
        text += f"; {_count(lost.not_done)} more never complete"
    return text


@dataclass(frozen=True)
class _Misses:
    """One policy's SLO misses at one load, seeds pooled."""

    n: int  # completed requests that miss an SLO (per seed, averaged)
    not_done: int  # requests that never completed (per seed, averaged)
    short_share: float  # of the misses, share with a short uncached prompt
    late_share: float  # of the misses, share late on the first token
    late_ttft_p50_s: float  # median TTFT of the late ones
    waits: dict[str, float]  # where the late ones' TTFT went: phrase -> share of it


def _misses(runs: Sequence[RunRecords], load: float, label: str, threshold: int) -> _Misses | None:
    mine = [r for r in runs if r.label == label and r.load == load]
    if not mine:
        return None
    n = not_done = short = late = 0
    ttfts: list[np.ndarray] = []
    parts = {"held by the router": 0.0, "queued on an instance": 0.0, "prefilling": 0.0}
    late_total_s = 0.0
    for run in mine:
        r = m.RecordArrays.from_frame(run.results)
        slo_ttft = run.summary.get("slo_ttft_s")
        slo_tpot = run.summary.get("slo_tpot_s")
        done = m.completed(r)
        miss = done & ~m.slo_met(r, slo_ttft, slo_tpot)
        ttft_lim = np.where(np.isnan(r.slo_ttft_s), _nan(slo_ttft), r.slo_ttft_s)
        ttft = m.ttft_s(r)
        with np.errstate(invalid="ignore"):
            is_late = miss & (ttft > ttft_lim)
        uncached = r.prompt_tokens - r.cached_tokens
        n += int(miss.sum())
        not_done += int((~done).sum())
        short += int((miss & (uncached <= threshold)).sum())
        late += int(is_late.sum())
        ttfts.append(ttft[is_late])
        late_total_s += float(np.nansum(ttft[is_late]))
        dispatch = _column(run.results, "dispatch_s")
        for name, start, end in (
            ("held by the router", r.arrival_s, dispatch),
            ("queued on an instance", dispatch, r.prefill_start_s),
            ("prefilling", r.prefill_start_s, r.first_token_s),
        ):
            spent = (end - start)[is_late]
            parts[name] += float(np.nansum(spent)) if np.isfinite(spent).any() else math.nan
    seeds = len(mine)
    pooled = np.concatenate(ttfts) if ttfts else np.array([])
    waits = {k: v / late_total_s for k, v in parts.items() if late_total_s > 0 and math.isfinite(v)}
    return _Misses(
        n=round(n / seeds),
        not_done=round(not_done / seeds),
        short_share=short / n if n else 0.0,
        late_share=late / n if n else 0.0,
        late_ttft_p50_s=float(np.median(pooled)) if len(pooled) else math.nan,
        waits=waits,
    )


def _column(results: pd.DataFrame, name: str) -> np.ndarray:
    if name not in results.columns:
        return np.full(len(results), np.nan)
    return pd.to_numeric(results[name]).to_numpy(dtype=float, na_value=np.nan)


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _count(n: int) -> str:
    return f"{n:,}"


def _seconds(value: float) -> str:
    if value != value:
        return "-"
    return f"{value * 1000:,.0f} ms" if value < 1.0 else f"{value:,.1f} s"
