"""Pure parts of the policy matrix (``bench/bench_policy_matrix.py``): cells, knee search, misses.

Nothing here runs a simulation; the bench feeds these numbers. Kept apart so
the knee finding and the miss classification can be tested with numbers
(``tests/unit/test_policy_matrix.py``).

* :class:`Cell`: one scenario (model and GPU, trace, topology) and the
  trace spec it makes at a load, in requests/s.
* :class:`KneeSearch`: coarse-to-fine search for the highest load at which
  the seed-mean SLO attainment stays at or above a target: geometric steps
  out from a guess until the target is bracketed, then bisection in log
  load, then log-linear interpolation inside the last bracket. It also says
  how flat the curve is around the knee (how far the knee moves for one
  point of attainment) and whether it saw a cliff or a non-monotone curve.
* :func:`miss_breakdown`: which requests miss the SLO: short or long, and
  where a missed request lost its time (router hold, instance queue,
  prefill, or decode: TPOT).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "MISS_PLACES",
    "Cell",
    "KneeSearch",
    "PolicyRow",
    "interpolate_knee",
    "miss_breakdown",
    "overhead_profile",
    "parse_policy",
    "parse_value",
    "select_cells",
]

#: Where a missed request spent the most time (``miss_breakdown``'s keys).
MISS_PLACES = ("router", "queue", "prefill", "tpot", "unserved")


# -- policies -----------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyRow:
    """One row of the matrix: a registered policy with parameters, under a label."""

    label: str
    name: str
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_laps(self) -> bool:
        """laps and its ablations; every other row is a baseline."""
        return self.name == "laps"


def parse_value(text: str) -> Any:
    """A ``key=value`` word's value: bool, int or float where it parses, else the text."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_policy(text: str) -> PolicyRow:
    """``"laps"`` or ``"laps mode=temporal window_ms=0"``: a name, then ``key=value`` words.

    The label is the text as given (spaces collapsed). Values are read as
    bool, int or float where they parse, else kept as strings.

    Raises:
        ValueError: an empty text or a word without ``=``.
    """
    words = text.split()
    if not words:
        raise ValueError("empty policy")
    name, params = words[0], {}
    for word in words[1:]:
        key, eq, value = word.partition("=")
        if not eq or not key:
            raise ValueError(f"policy {text!r}: expected key=value, got {word!r}")
        params[key] = parse_value(value)
    return PolicyRow(" ".join(words), name, params)


# -- cells --------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One scenario of the matrix.

    Attributes:
        model, gpu: the served model and GPU (catalogue names).
        short: the pair as the table shows it (``qwen32b-h200``).
        workload: ``chat``, ``api`` (generator presets) or ``bundled:NAME``.
        cv: inter-arrival CV of the generator's renewal process (None: bundled).
        instances: mixed instances (ignored with ``pd``).
        pd: ``"P:D"`` or None.
        guess_rps: where the knee search starts, requests/s.
        span_s: the trace span each run aims for, seconds (many request lifetimes).
        native_rps, native_span_s: a bundled trace's own mean rate and span.
    """

    model: str
    gpu: str
    short: str
    workload: str
    cv: float | None
    instances: int
    pd: str | None
    guess_rps: float
    span_s: float
    native_rps: float = 0.0
    native_span_s: float = 0.0

    @property
    def topology(self) -> str:
        return f"pd{self.pd}" if self.pd else f"x{self.instances}"

    @property
    def trace_name(self) -> str:
        if self.workload.startswith("bundled:"):
            return self.workload.removeprefix("bundled:")
        return f"{self.workload}-cv{self.cv:g}"

    @property
    def id(self) -> str:
        return f"{self.short}/{self.trace_name}/{self.topology}"

    def n_requests(self, load_rps: float, cap: int, floor: int = 400) -> int:
        """Requests per run at ``load_rps``: ``span_s`` of arrivals, within [floor, cap]."""
        n = math.ceil(load_rps * self.span_s)
        return max(floor, min(cap, n))

    def trace(self, load_rps: float, seed: int, cap: int) -> dict[str, Any]:
        """The ``[trace]`` table of one run at ``load_rps`` (the run itself at load 1).

        Generated workloads are drawn at that rate (each seed another trace,
        think times unscaled); a bundled trace is a window of about the asked
        number of requests (each seed another window) rescaled to that rate.
        """
        n = self.n_requests(load_rps, cap)
        if not self.workload.startswith("bundled:"):
            params = {"n_requests": n, "rate_rps": float(load_rps), "cv": float(self.cv or 1.0)}
            return {"generator": {"preset": self.workload, "params": params}}
        width = min(n / self.native_rps, self.native_span_s)
        room = max(self.native_span_s - width, 0.0)
        start = round(((seed * 0.618034) % 1.0) * room, 3)
        return {
            "bundled": self.trace_name,
            "transforms": {
                "window_s": [start, start + width + 1e-3],
                "rate_rps": float(load_rps),
                "max_requests": n,
            },
        }


def select_cells(cells: Sequence[Cell], patterns: Sequence[str] | None) -> list[Cell]:
    """Cells whose id matches any of the glob ``patterns`` (all when None or empty)."""
    if not patterns:
        return list(cells)
    return [c for c in cells if any(fnmatch.fnmatchcase(c.id, p) for p in patterns)]


# -- the knee -------------------------------------------------------------------------


def interpolate_knee(lo: float, att_lo: float, hi: float, att_hi: float, target: float) -> float:
    """The load between ``lo`` (attains ``att_lo >= target``) and ``hi`` where the
    log-linear interpolation of attainment crosses ``target``."""
    if att_lo <= att_hi or hi <= lo:
        return lo
    frac = (att_lo - target) / (att_lo - att_hi)
    return float(math.exp(math.log(lo) + min(max(frac, 0.0), 1.0) * math.log(hi / lo)))


class KneeSearch:
    """Highest load with seed-mean attainment >= ``target``; feed it one load at a time.

    ``next_load()`` says which load to measure next (None: done); ``add(load,
    per_seed)`` gives the per-seed attainments measured there. Out from
    ``guess`` by ``step`` until the target is bracketed (at most
    ``max_steps`` each way), then bisection in log load until the bracket
    is narrower than ``1 + tol`` (at most ``max_bisect`` times).
    """

    def __init__(
        self,
        guess: float,
        *,
        target: float = 0.9,
        step: float = 1.6,
        tol: float = 0.05,
        max_steps: int = 6,
        max_bisect: int = 4,
    ) -> None:
        self.guess, self.target, self.step, self.tol = guess, target, step, tol
        self.max_steps, self.max_bisect = max_steps, max_bisect
        self.points: dict[float, list[float]] = {}
        self._bisected = 0

    def add(self, load: float, per_seed: Sequence[float]) -> None:
        self.points[float(load)] = [float(x) for x in per_seed]

    def mean(self, load: float) -> float:
        return float(np.mean(self.points[load]))

    def bracket(self) -> tuple[float | None, float | None]:
        """(highest passing load below the lowest failing one, lowest failing load)."""
        fails = [x for x in self.points if self.mean(x) < self.target]
        hi = min(fails) if fails else None
        passes = [x for x in self.points if self.mean(x) >= self.target and (hi is None or x < hi)]
        return (max(passes) if passes else None), hi

    def next_load(self) -> float | None:
        if not self.points:
            return self.guess
        lo, hi = self.bracket()
        if lo is None:
            low = min(self.points)
            floor = self.guess / self.step**self.max_steps * (1.0 + 1e-9)
            return None if low <= floor else low / self.step
        if hi is None:
            high = max(self.points)
            ceiling = self.guess * self.step**self.max_steps * (1.0 - 1e-9)
            return None if high >= ceiling else high * self.step
        if hi / lo > 1.0 + self.tol and self._bisected < self.max_bisect:
            self._bisected += 1
            return math.sqrt(lo * hi)
        return None

    @property
    def knee(self) -> float | None:
        """The knee, requests/s; 0 when even the lowest load tried misses the target,
        None when the highest load tried still meets it (above the range)."""
        lo, hi = self.bracket()
        if lo is None:
            return 0.0
        if hi is None:
            return None
        return interpolate_knee(lo, self.mean(lo), hi, self.mean(hi), self.target)

    def shift_per_point(self, width: float = 1.5) -> float:
        """How far the knee moves, relatively, for one point (0.01) of attainment.

        From the slope of mean attainment against log load between the
        outermost points within ``width`` of the knee on either side: a
        flat curve gives a large figure (a 1-2 point edge reads as a much
        larger knee). NaN without points on both sides.
        """
        k = self.knee
        if not k:
            return math.nan
        below = [x for x in self.points if k / width <= x <= k]
        above = [x for x in self.points if k < x <= k * width]
        if not below or not above:
            return math.nan
        a, b = min(below), max(above)
        slope = (self.mean(a) - self.mean(b)) / math.log(b / a)
        if slope <= 0:
            return math.inf
        return math.expm1(0.01 / slope)

    def seed_spread(self) -> float:
        """Largest spread (max - min) of per-seed attainment at the bracket's two loads."""
        spreads = [max(self.points[x]) - min(self.points[x]) for x in self.bracket() if x]
        return max(spreads) if spreads else math.nan

    def flags(self, flat_shift: float = 0.10, cliff_drop: float = 0.10) -> list[str]:
        """Warnings about the curve: ``flat`` (one point moves the knee more than
        ``flat_shift``), ``cliff`` (the last bracket, under ``1 + tol`` wide,
        drops more than ``cliff_drop``), ``nonmono`` (attainment rises by more
        than 3 points with load somewhere), ``noisy`` (seeds differ by more
        than 10 points at the bracket), ``low`` / ``high`` (knee outside the range tried)."""
        out = []
        k = self.knee
        if k == 0.0:
            out.append("low")
        elif k is None:
            out.append("high")
        shift = self.shift_per_point()
        if (math.isfinite(shift) and shift > flat_shift) or shift == math.inf:
            out.append("flat")
        lo, hi = self.bracket()
        if (
            lo
            and hi
            and hi / lo <= 1.0 + 1.5 * self.tol
            and self.mean(lo) - self.mean(hi) > cliff_drop
        ):
            out.append("cliff")
        loads = sorted(self.points)
        means = [self.mean(x) for x in loads]
        if any(
            later > earlier + 0.03 for i, earlier in enumerate(means) for later in means[i + 1 :]
        ):
            out.append("nonmono")
        if self.seed_spread() > 0.10:
            out.append("noisy")
        return out


# -- misses -----------------------------------------------------------------------------


def miss_breakdown(
    records: Any,
    *,
    slo_ttft_s: float,
    slo_tpot_s: float,
    short_tokens: int,
    warmup: float = 0.1,
) -> dict[str, Any]:
    """Who misses the SLO among the measured requests of one run, and where they waited.

    ``records`` is a ``results.parquet`` frame. Requests the trace flags
    failed are left out; the first ``warmup`` share of the arrival span is
    the warm-up (the engines start empty) and is left out too. Short means
    at most ``short_tokens`` uncached prompt tokens (prompt minus cached).
    A missed request is placed where it waited longest: ``router`` (held
    before dispatch), ``queue`` (dispatched, waiting on the instance),
    ``prefill`` (its prefill until the first token, which under PD the
    prefill instance produces), ``tpot`` (first token in time, decode too
    slow; under PD this includes the KV hand-off) or ``unserved`` (never
    finished).

    Returns: ``n`` measured, ``met``, ``span_s`` of their arrivals,
    ``lifetime_s`` (mean end-to-end latency of the completed), ``short_share``,
    then per class (``short``, ``long``) the requests and misses, and
    ``where``: per class, misses by place.
    """
    df = records
    arrival = df["arrival_s"].to_numpy(float)
    outcome = df["outcome"].astype(str).to_numpy()
    keep = outcome != "failed"
    if len(arrival):
        t0, t1 = float(arrival.min()), float(arrival.max())
        keep &= arrival >= t0 + warmup * (t1 - t0)
    d = df[keep]
    arrival = arrival[keep]
    ok = d["outcome"].astype(str).to_numpy() == "ok"
    ttft = d["ttft_s"].to_numpy(float)
    tpot = d["tpot_s"].to_numpy(float)
    with np.errstate(invalid="ignore"):
        ttft_ok = ttft <= slo_ttft_s
        tpot_ok = np.isnan(tpot) | (tpot <= slo_tpot_s)
    met = ok & ttft_ok & tpot_ok
    uncached = d["prompt_tokens"].to_numpy(float) - np.nan_to_num(
        d["cached_tokens"].to_numpy(float)
    )
    short = uncached <= short_tokens

    def col(name: str) -> np.ndarray:
        return d[name].to_numpy(float) if name in d else np.full(len(d), np.nan)

    router = col("dispatch_s") - arrival
    queue = col("prefill_start_s") - col("dispatch_s")
    prefill = col("first_token_s") - col("prefill_start_s")
    parts = np.nan_to_num(np.vstack([router, queue, prefill]), nan=-1.0)
    place = np.array(MISS_PLACES[:3])[np.argmax(parts, axis=0)] if len(d) else np.array([])
    place = np.where(ok & ttft_ok, "tpot", place)
    place = np.where(~ok, "unserved", place)
    e2e = d["e2e_s"].to_numpy(float)[ok]
    out: dict[str, Any] = {
        "n": len(d),
        "met": int(met.sum()),
        "span_s": float(arrival.max() - arrival.min()) if len(arrival) > 1 else 0.0,
        "lifetime_s": float(np.nanmean(e2e)) if len(e2e) else math.nan,
        "short_share": float(short.mean()) if len(d) else math.nan,
        "where": {},
    }
    for cls, mask in (("short", short), ("long", ~short)):
        miss = mask & ~met
        out[f"n_{cls}"] = int(mask.sum())
        out[f"miss_{cls}"] = int(miss.sum())
        out["where"][cls] = {p: int((miss & (place == p)).sum()) for p in MISS_PLACES}
    return out


def overhead_profile(model: str, gpu: str, overhead_s: float, folder: Path) -> Path:
    """A profile file of the catalogue's cost model of ``model`` on ``gpu`` (TP 1) with a
    per-request overhead of ``overhead_s``: what a request spends outside its steps
    (HTTP, parsing, tokenization), which the catalogue has none of.

    A policy that holds work and releases it on a first token (``laps``) meets the
    overhead at every release: live, the released request reaches the engine after
    the engine began its next step, and waits that step out, where a simulated
    release with no overhead joins it.
    """
    from scheduler.cost_model import CostModel
    from scheduler.profile import CoefficientsModel, Profile, save_profile

    catalogue = CostModel.from_names(model, gpu, 1).coefficients
    coefficients = replace(catalogue, request_overhead_s=overhead_s)
    profile = Profile(
        model=model,
        gpu=gpu,
        tp=1,
        coefficients=CoefficientsModel(**asdict(coefficients)),
        source=f"catalogue, per-request overhead {overhead_s * 1e3:.2f} ms",
    )
    path = Path(folder) / f"profile-{model}-{gpu}-overhead-{overhead_s * 1e6:.0f}us.json"
    save_profile(profile, path)
    return path
