"""The head-to-head: ``llmsched router`` against SGLang's and vLLM's routers, live, at the knee.

Every router runs in front of the same emulated SGLang workers (``llmsched
emulate``, Qwen2.5-32B on H200, time-scaled) and takes the same open-loop
replay of the same trace (:mod:`traces.replay`), one run at a time, with
fresh workers each run (empty caches). Beside each live row stands the
simulator's prediction for the same requests, policy and topology
(:func:`sim.run`); for a peer's policy the simulator runs our policy of the
same name as its stand-in (``sim as``), which the table says.

* Topologies: ``x4``, ``x8`` (data parallel), ``pd1:3``, ``pd2:6`` (prefill:
  decode). Under PD our router picks decode workers with ``least_load``,
  the peers with ``power_of_two``, the simulator with ``least_load``.
* Traces: ``chat`` (the generator's multi-turn chat preset, Poisson session
  starts) and ``azure-conv`` (the bundled Azure conversation trace, a window
  rescaled in rate).
* The load: the knee, found in the simulator first: the highest rate at
  which the best of our four policies keeps 90% of requests within the
  0.4 s TTFT SLO (:class:`_matrix.KneeSearch`).
* The simulator charges each request the workers' per-request overhead
  (HTTP, parsing, tokenization), timed on an idle worker before the first
  run (:func:`frontend_overhead_s`; ``--request-overhead-ms`` to give it): a
  policy that releases held work on a first token meets it at every release.
* Routers: ``sglang`` (round_robin, cache_aware, power_of_two; bucket is a
  PD prefill policy only in sglang-router 0.3), ``vllm`` (round_robin,
  cache_aware, power_of_two) and ``llmsched`` (fcfs, least_load,
  cache_aware, laps). vLLM's router gets workers that speak vLLM's API (the
  same engine model steps them; only the wire differs).

Figures per row, over the requests after the first 10% of arrivals:
TTFT-SLO violations (TTFT over 0.4 s or not completed), goodput (requests
within TTFT 0.4 s and TPOT 0.1 s per second of arrivals), p50/p90 TTFT,
throughput (output tokens/s), all on the trace's clock. Then per (topology,
trace) the policies ranked by violations, live and predicted, with
Spearman's rho, and laps against the best peer policy (target: at least 25%
fewer violations and 20% more goodput).

Outputs are clipped to ``--max-output-tokens`` (512) in the live and the
simulated runs alike, so a run does not drain for minutes after its last
arrival; each live run has fresh workers and takes about its span / scale
plus a minute.

Time scale (``--time-scale``, emulated seconds per wall second): the
router, the replay client and the workers all stream every token through
Python on this machine's cores, so the scale is what keeps them from
being the bottleneck; each run prints the CPU its processes took and the
replay's send lag. Time constants of our policies (every parameter in ms or s:
laps's window_ms, max_wait_ms, slo_ttft_ms) are divided by the scale so
they hold in emulated time, as is sglang-router's bucket interval (5 s
by default, whole seconds); all routers poll or probe their workers on
the wall clock.

    .venv/bin/python bench/bench_head_to_head.py --quick     # x4, chat, 30 s of arrivals: ~20 min
    .venv/bin/python bench/bench_head_to_head.py             # x4 and x8, both traces, 90 s each
    .venv/bin/python bench/bench_head_to_head.py --topologies pd1:3 --traces azure-conv \\
        --routers llmsched:laps,sglang:cache_aware --out runs/h2h
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
import numpy as np
import pandas as pd
from _matrix import Cell, KneeSearch, miss_breakdown, overhead_profile
from _mock_backend import listen
from bench_router import Procs, _binary, _free_port

__all__ = [
    "ROUTERS",
    "Outcome",
    "compare_to_peers",
    "main",
    "outcome",
    "rank_policies",
    "spearman",
    "table",
]

MODEL, GPU, SHORT = "qwen2.5-32b", "h200", "qwen32b-h200"
SLO_TTFT_S, SLO_TPOT_S = 0.4, 0.1
KNEE_ATTAINMENT = 0.9
WARMUP = 0.1
START_S = 60.0
TOPOLOGIES: dict[str, tuple[int, str | None]] = {
    "x4": (4, None),
    "x8": (8, None),
    "pd1:3": (4, "1:3"),
    "pd2:6": (8, "2:6"),
}
TRACES = ("chat", "azure-conv")
#: (router, policy) in the table's order; a peer's policy is simulated as ours of that name.
ROUTERS: tuple[tuple[str, str], ...] = (
    ("sglang", "round_robin"),
    ("sglang", "cache_aware"),
    ("sglang", "power_of_two"),
    ("sglang", "bucket"),
    ("vllm", "round_robin"),
    ("vllm", "cache_aware"),
    ("vllm", "power_of_two"),
    ("llmsched", "fcfs"),
    ("llmsched", "least_load"),
    ("llmsched", "cache_aware"),
    ("llmsched", "laps"),
)
OURS = ("fcfs", "least_load", "cache_aware", "laps")


# -- pure parts: figures, ranking, the table -------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one run (live or simulated) achieved over its measured requests."""

    n: int
    violations: float  # share of requests with TTFT over the SLO or not completed
    goodput_rps: float  # requests within both SLOs per second of arrivals
    ttft_p50_s: float
    ttft_p90_s: float
    throughput_tok_s: float  # output tokens of completed requests per second
    short_misses: int
    long_misses: int
    where: dict[str, dict[str, int]]


def outcome(records: pd.DataFrame, *, short_tokens: int = 256) -> Outcome:
    """The figures of one run from its result records (``results.parquet``'s schema).

    The first ``WARMUP`` share of the arrival span is left out (the workers
    start empty), as are requests the trace marks failed.
    """
    b = miss_breakdown(
        records,
        slo_ttft_s=SLO_TTFT_S,
        slo_tpot_s=SLO_TPOT_S,
        short_tokens=short_tokens,
        warmup=WARMUP,
    )
    arrival = records["arrival_s"].to_numpy(float)
    keep = records["outcome"].astype(str).to_numpy() != "failed"
    if len(arrival):
        t0, t1 = float(arrival.min()), float(arrival.max())
        keep &= arrival >= t0 + WARMUP * (t1 - t0)
    d = records[keep]
    ok = d["outcome"].astype(str).to_numpy() == "ok"
    ttft = d["ttft_s"].to_numpy(float)
    with np.errstate(invalid="ignore"):
        within = ok & (ttft <= SLO_TTFT_S)
    n = len(d)
    done = ttft[ok]
    finish = d["finish_s"].to_numpy(float)[ok]
    span = float(np.nanmax(finish) - d["arrival_s"].min()) if len(finish) else 0.0
    tokens = float(d["output_tokens"].to_numpy(float)[ok].sum())
    return Outcome(
        n=n,
        violations=1.0 - within.sum() / n if n else math.nan,
        goodput_rps=b["met"] / b["span_s"] if b["span_s"] > 0 else 0.0,
        ttft_p50_s=float(np.percentile(done, 50)) if len(done) else math.nan,
        ttft_p90_s=float(np.percentile(done, 90)) if len(done) else math.nan,
        throughput_tok_s=tokens / span if span > 0 else 0.0,
        short_misses=b["miss_short"],
        long_misses=b["miss_long"],
        # Where misses waited needs dispatch times: the simulator's, or our router's records.
        where=b["where"] if records["dispatch_s"].notna().any() else {},
    )


def with_router_hold(
    records: pd.DataFrame, router_records: pd.DataFrame, scale: float
) -> pd.DataFrame:
    """Live records with when our router dispatched each request, from its ``--record`` rows.

    The replay sees only the client side; the router's records say how long
    it held each request (``router_queue_s``, wall seconds, times ``scale``
    on the trace's clock). ``dispatch_s`` and ``prefill_start_s`` are set to
    the dispatch, so :func:`_matrix.miss_breakdown` places a miss in the
    router (held) or in the prefill (queue and prefill on the worker).
    """
    held = router_records.dropna(subset=["x_request_id"])
    hold_s = pd.Series(
        held["router_queue_s"].to_numpy(float) * scale,
        index=held["x_request_id"].astype(str).to_numpy(),
    )
    hold_s = hold_s[~hold_s.index.duplicated()]
    out = records.copy()
    sent = out["send_s"].to_numpy(float)
    wait = hold_s.reindex(out["request_id"].astype(str)).to_numpy(float)
    out["dispatch_s"] = sent + wait
    out["prefill_start_s"] = out["dispatch_s"]
    return out


def _ranks(values: Sequence[float]) -> np.ndarray:
    return pd.Series(list(values), dtype=float).rank(method="average").to_numpy()


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation of two equally long sequences (ties take mean ranks)."""
    if len(a) != len(b):
        raise ValueError(f"spearman: {len(a)} values against {len(b)}")
    if len(a) < 2:
        return math.nan
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def rank_policies(rows: Sequence[dict[str, Any]], side: str) -> list[str]:
    """Row labels best first by ``side`` (``live`` or ``sim``): fewer violations, then more goodput."""

    def key(r: dict[str, Any]) -> tuple[float, float]:
        v = r[f"{side}_violations"]
        return (math.inf if v != v else v, -r[f"{side}_goodput_rps"])

    return [r["label"] for r in sorted(rows, key=key)]


def compare_to_peers(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """laps (our router) against the best peer policy, live: the two target figures.

    ``violation_cut``: 1 - laps's violations / the fewest of a peer's (target
    >= 0.25); ``goodput_gain``: laps's goodput / the most of a peer's - 1
    (target >= 0.20). None without a laps row or a peer row.
    """
    laps = [r for r in rows if r["router"] == "llmsched" and r["policy"] == "laps"]
    peers = [r for r in rows if r["router"] != "llmsched"]
    if not laps or not peers:
        return None
    me = laps[0]
    fewest = min(peers, key=lambda r: r["live_violations"])
    most = max(peers, key=lambda r: r["live_goodput_rps"])
    cut = (
        1.0 - me["live_violations"] / fewest["live_violations"]
        if fewest["live_violations"] > 0
        else (0.0 if me["live_violations"] == 0 else -math.inf)
    )
    gain = (
        me["live_goodput_rps"] / most["live_goodput_rps"] - 1.0
        if most["live_goodput_rps"] > 0
        else math.nan
    )
    return {
        "best_peer_by_violations": fewest["label"],
        "best_peer_by_goodput": most["label"],
        "violation_cut": cut,
        "goodput_gain": gain,
        "meets_violation_target": cut >= 0.25,
        "meets_goodput_target": gain >= 0.20,
    }


def misses(o: Outcome) -> str:
    """``short 6 (router 3, prefill 1) long 60 (...)``: misses by class and by where they waited."""
    parts = []
    for cls, n in (("short", o.short_misses), ("long", o.long_misses)):
        where = ", ".join(f"{k} {v}" for k, v in o.where.get(cls, {}).items() if v)
        parts.append(f"{cls} {n}" + (f" ({where})" if where else ""))
    return " ".join(parts)


def _share(x: float, up: str, down: str) -> str:
    """``30% fewer`` for 0.3, ``29% more`` for -0.29 (``up``/``down`` name the two directions)."""
    return f"{x:.0%} {up}" if x >= 0 else f"{-x:.0%} {down}"


def _pct(x: float) -> str:
    return "-" if x != x else f"{x:.1%}"


def _ms(x: float) -> str:
    return "-" if x != x else f"{x * 1000:,.0f}"


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The printed table of one (topology, trace): a line per row, live | simulated, then rankings.

    Live rows end with the contention they ran under: the share of
    requests the replay sent over 10 ms late, and the machine's 1-minute
    load average at the run's end.
    """
    head = (
        f"{'router:policy':<24} {'sim as':<13} | {'viol':>6} {'goodput':>7} {'p50':>6} "
        f"{'p90':>6} {'tok/s':>7} {'late':>5} {'load':>4} | {'viol':>6} {'goodput':>7} "
        f"{'p50':>6} {'p90':>6} {'tok/s':>7}"
    )
    lines = [
        "violations: TTFT over 0.4 s or lost; goodput req/s; TTFT p50, p90 ms; late: sends "
        "over 10 ms late; load: the machine's load average",
        f"{'':<38} | {'live':<49} | simulated",
        head,
        "-" * len(head),
    ]
    for r in rows:
        late, load = r.get("late_share", math.nan), r.get("load1", math.nan)
        lines.append(
            f"{r['label']:<24} {r['sim_policy']:<13} | "
            f"{_pct(r['live_violations']):>6} {r['live_goodput_rps']:>7.2f} "
            f"{_ms(r['live_ttft_p50_s']):>6} {_ms(r['live_ttft_p90_s']):>6} "
            f"{r['live_throughput_tok_s']:>7,.0f} {'-' if late != late else f'{late:.0%}':>5} "
            f"{'-' if load != load else f'{load:.1f}':>4} | "
            f"{_pct(r['sim_violations']):>6} {r['sim_goodput_rps']:>7.2f} "
            f"{_ms(r['sim_ttft_p50_s']):>6} {_ms(r['sim_ttft_p90_s']):>6} "
            f"{r['sim_throughput_tok_s']:>7,.0f}"
        )
    live, simmed = rank_policies(rows, "live"), rank_policies(rows, "sim")
    pos = {label: i for i, label in enumerate(live)}
    rho = spearman([pos[x] for x in simmed], list(range(len(simmed))))
    lines.append("ranking (fewest violations first):")
    lines.append("  live:      " + " > ".join(live))
    lines.append("  simulated: " + " > ".join(simmed))
    lines.append(f"  Spearman rho {rho:.2f}" + ("; same order" if live == simmed else ""))
    vs = compare_to_peers(rows)
    if vs:
        lines.append(
            f"laps vs best peer: {_share(vs['violation_cut'], 'fewer', 'more')} violations than "
            f"{vs['best_peer_by_violations']} (target 25% fewer: "
            f"{'met' if vs['meets_violation_target'] else 'missed'}); "
            f"{_share(vs['goodput_gain'], 'more', 'less')} goodput than "
            f"{vs['best_peer_by_goodput']} (target 20% more: "
            f"{'met' if vs['meets_goodput_target'] else 'missed'})"
        )
    return "\n".join(lines)


def row_of(
    router: str, policy: str, live: Outcome, simulated: Outcome, extra: dict[str, Any]
) -> dict[str, Any]:
    """One flat row (CSV/JSON) from a live and a simulated outcome."""
    out: dict[str, Any] = {"label": f"{router}:{policy}", "router": router, "policy": policy}
    out["sim_policy"] = policy if router == "llmsched" else f"{policy}*"
    for side, o in (("live", live), ("sim", simulated)):
        for k, v in asdict(o).items():
            out[f"{side}_{k}"] = v
    return {**out, **extra}


# -- traces and the knee ------------------------------------------------------------------


def cell_of(trace: str, topology: str, span_s: float) -> Cell:
    """The policy matrix's cell of a (trace, topology), with our arrival span."""
    from bench_policy_matrix import build_cells

    instances, pd_ = TOPOLOGIES[topology]
    name = "chat-cv1" if trace == "chat" else trace
    for c in build_cells():
        if c.id == f"{SHORT}/{name}/{topology}":
            return replace(c, span_s=span_s)
    raise KeyError(f"no cell {SHORT}/{name}/{topology} (instances {instances}, pd {pd_})")


def workload(cell: Cell, rate_rps: float, seed: int, cap: int, max_output_tokens: int = 0):
    """The trace of one run at ``rate_rps``: the same requests for every router and the simulator.

    ``max_output_tokens`` (0: none) clips the outputs: the chat preset's
    longest answers (thousands of tokens) would otherwise keep a live run
    draining for minutes after its last arrival.
    """
    from sim.runner import load_workload
    from sim.specs import TraceSpec

    table = cell.trace(rate_rps, seed, cap)
    if max_output_tokens:
        table["transforms"] = {
            **table.get("transforms", {}),
            "max_output_tokens": max_output_tokens,
        }
    return load_workload(TraceSpec.model_validate(table), seed)


def simulate(
    cell: Cell, trace, policy: str, seed: int, profile: Path | None = None
) -> pd.DataFrame:
    """The simulator's records of ``policy`` on ``trace`` in ``cell``'s topology.

    ``profile``: the cost model's (:func:`_matrix.overhead_profile`); None: the catalogue's.
    """
    import sim

    cluster: dict[str, Any] = (
        {"pd": cell.pd, "decode_policy": "least_load"} if cell.pd else {"instances": cell.instances}
    )
    result = sim.run(
        trace,
        policy,
        model=MODEL,
        gpu=GPU,
        slo_ttft_ms=SLO_TTFT_S * 1000,
        slo_tpot_ms=SLO_TPOT_S * 1000,
        seed=seed,
        profile=profile,
        **cluster,
    )
    return result.records


# -- the per-request overhead of the live path -----------------------------------------------

#: Lone requests timed on an idle worker to measure what a request costs outside its step.
OVERHEAD_PROBES = 8


def frontend_overhead_s(url: str, scale: float, probes: int = OVERHEAD_PROBES) -> float:
    """Emulated seconds a lone request spends outside its prefill step on the idle worker ``url``.

    The worker's HTTP, parsing and tokenization, and its wait for the engine's
    loop: each probe is a fresh prompt (no prefix hit) answered with one token,
    unstreamed; its wall time times ``scale``, less the cost model's prefill
    step for its prompt tokens, is that overhead. The median of ``probes``
    (a first, unmeasured one opens the connection).

    Why the simulator needs it: :func:`_matrix.overhead_profile`. On x4 chat
    at the knee the simulated laps had 12.5% violations with none, 14-18%
    with 1-5 ms, and 17.6-20% live; cache_aware, which holds nothing, stayed
    at 14.5%.
    """
    import statistics

    from scheduler.cost_model import CostModel

    cost = CostModel.from_names(MODEL, GPU, 1)
    seen = []
    with httpx.Client(base_url=url, timeout=30.0) as client:
        for i in range(probes + 1):
            body = {
                "model": MODEL,
                "prompt": f"{i} probe: a request's time off its step",
                "max_tokens": 1,
            }
            started = time.perf_counter()
            r = client.post("/v1/completions", json=body)
            wall = time.perf_counter() - started
            if r.status_code != 200:
                raise RuntimeError(
                    f"{url}: overhead probe answered {r.status_code}: {r.text[:200]}"
                )
            n = int(r.json()["usage"]["prompt_tokens"])
            if i:
                seen.append(wall * scale - cost.prefill_time_s([n], [0]))
    return max(0.0, statistics.median(seen))


def measure_overhead(procs: Procs, cell: Cell, scale: float, seed: int) -> float:
    """:func:`frontend_overhead_s` of one fresh regular worker of the bench's model.

    ``cell`` only lends the worker its settings: a lone worker's overhead is
    the same whatever the topology.
    """
    try:
        w = start_workers(procs, replace(cell, pd=None, instances=1), "sglang", scale, seed)
        return frontend_overhead_s(w.regular[0], scale)
    finally:
        procs.stop_all()


def find_knee(
    cell: Cell,
    seeds: Sequence[int],
    cap: int,
    max_output_tokens: int,
    log,
    profile: Path | None = None,
) -> tuple[float, dict[float, dict[str, float]]]:
    """The highest rate at which the best of our policies keeps 90% within the TTFT SLO.

    Attainment is the mean over ``seeds`` (each another draw of the trace at
    that rate: one short draw alone moved the knee by several points); the
    best policy is the one with the highest mean at that rate. ``profile``:
    as :func:`simulate`'s.
    """
    search = KneeSearch(cell.guess_rps, target=KNEE_ATTAINMENT, tol=0.05, max_bisect=3)
    seen: dict[float, dict[str, float]] = {}
    while (rate := search.next_load()) is not None:
        per_seed = {p: [] for p in OURS}
        for seed in seeds:
            trace = workload(cell, rate, seed, cap, max_output_tokens)
            for p in OURS:
                simulated = simulate(cell, trace, p, seed, profile=profile)
                per_seed[p].append(1.0 - outcome(simulated).violations)
        att = {p: float(np.mean(v)) for p, v in per_seed.items()}
        seen[rate] = att
        search.add(rate, per_seed[max(att, key=att.__getitem__)])
        log(
            f"  knee search {rate:6.2f} req/s: " + ", ".join(f"{p} {a:.1%}" for p, a in att.items())
        )
    knee = search.knee
    if not knee:
        raise RuntimeError(f"{cell.id}: no knee in the range tried ({sorted(seen)})")
    return knee, seen


# -- live runs --------------------------------------------------------------------------


class StartFailed(RuntimeError):
    """A worker or router process exited while starting (most often: its port was taken)."""


def _wait_healthy(urls: list[str], procs: Procs, proc, what: str) -> None:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StartFailed(f"{what} exited ({proc.returncode}): {procs.log_tail(proc, 600)}")
        try:
            if all(httpx.get(u + "/health", timeout=2.0).status_code == 200 for u in urls):
                time.sleep(0.5)  # another's server on a port we lost answers too: ours exits
                if proc.poll() is not None:
                    continue
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not answer /health on {urls} within {START_S:g} s")


def _free_ports(n: int) -> int:
    """The first of ``n`` consecutive free ports on 127.0.0.1."""
    for _ in range(50):
        first = _free_port()
        socks = []
        try:
            for i in range(n):
                socks.append(listen(first + i))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")


@dataclass
class Workers:
    """The emulated workers of one run: regular, or prefill and decode with bootstrap ports."""

    regular: list[str]
    prefill: list[str]
    boot: list[int]
    decode: list[str]
    procs: list[Any]


def start_workers(procs: Procs, cell: Cell, protocol: str, scale: float, seed: int) -> Workers:
    """``llmsched emulate`` processes for ``cell``'s topology, up and healthy."""
    exe = _binary("llmsched") or "llmsched"
    base = [exe, "emulate", "--protocol", protocol, "--model", MODEL, "--gpu", GPU]
    base += ["--time-scale", f"{scale:g}", "--seed", str(seed)]

    def launch(n: int, *extra: str) -> tuple[list[str], Any]:
        port = _free_ports(n)
        cmd = [*base, "--port", str(port), "--instances", str(n), *extra]
        proc = procs.start(f"emulate {' '.join(extra)}", cmd, None)
        urls = [f"http://127.0.0.1:{port + i}" for i in range(n)]
        _wait_healthy(urls, procs, proc, "llmsched emulate")
        return urls, proc

    if not cell.pd:
        urls, proc = launch(cell.instances)
        return Workers(urls, [], [], [], [proc])
    p, d = (int(x) for x in cell.pd.split(":"))
    boot = _free_ports(p)
    pre, pproc = launch(p, "--role", "prefill", "--bootstrap-port", str(boot))
    dec, dproc = launch(d, "--role", "decode")
    return Workers([], pre, [boot + i for i in range(p)], dec, [pproc, dproc])


def router_cmd(
    router: str,
    policy: str,
    port: int,
    w: Workers,
    scale: float,
    record: Path | None = None,
) -> list[str]:
    """The command line of one router in front of ``w``, bound to 127.0.0.1:``port``.

    ``record``: our router writes its own records there (when each request
    was dispatched), which say where a request waited.
    """
    if router == "llmsched":
        cmd = [_binary("llmsched") or "llmsched", "router", "--host", "127.0.0.1"]
        cmd += ["--port", str(port), "--protocol", "sglang", "--policy", policy]
        cmd += ["--log-level", "warning", "--no-access-log"]
        for b in w.regular:
            cmd += ["--backend", b]
        for b, boot in zip(w.prefill, w.boot, strict=True):
            cmd += ["--prefill", b, "--bootstrap-port", str(boot)]
        for b in w.decode:
            cmd += ["--decode", b]
        if w.decode:
            cmd += ["--decode-policy", "least_load"]
        for key, value in timed_params(policy, scale).items():
            cmd += ["--policy-param", f"{key}={value:g}"]
        if policy == "laps":
            cmd += ["--policy-param", f"model={MODEL}", "--policy-param", f"gpu={GPU}"]
        if record is not None:
            cmd += ["--record", str(record)]
        return cmd
    exe = _binary(f"{router}-router") or f"{router}-router"
    cmd = [exe, *(["launch"] if router == "sglang" else [])]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(_free_port())]
    cmd += ["--log-level", "warn" if router == "sglang" else "warning"]
    cmd += ["--worker-startup-check-interval", "1"]
    if w.regular:
        return [*cmd, "--worker-urls", *w.regular, "--policy", policy]
    cmd += ["--pd-disaggregation" if router == "sglang" else "--vllm-pd-disaggregation"]
    for b, boot in zip(w.prefill, w.boot, strict=True):
        cmd += ["--prefill", b, str(boot)]
    for b in w.decode:
        cmd += ["--decode", b]
    cmd += ["--prefill-policy", policy, "--decode-policy", "power_of_two"]
    if policy == "bucket":  # its default, 5 s, in emulated time
        cmd += ["--bucket-adjust-interval-secs", str(max(1, round(5 / scale)))]
    return cmd


def timed_params(policy: str, scale: float) -> dict[str, float]:
    """Our policy's durations (parameters in ms or s), at their defaults divided by ``scale``.

    The router runs on the wall clock while the workers run ``scale`` times
    as fast as a GPU would, so a 6 ms batch window becomes 6 / scale wall ms.
    """
    from scheduler.registry import describe

    return {
        p.param: float(p.default) / scale
        for p in describe(policy)
        if p.unit in ("ms", "s") and isinstance(p.default, int | float)
    }


def supported(router: str, policy: str, cell: Cell) -> str | None:
    """Why ``router`` cannot run ``policy`` in ``cell`` (None: it can)."""
    if router == "sglang" and policy == "bucket" and not cell.pd:
        return "sglang-router offers bucket as a PD prefill policy only"
    if router != "llmsched" and _binary(f"{router}-router") is None:
        return f"{router}-router is not installed (pip install -e '.[dev]')"
    return None


def _wait_routes(url: str, proc, procs: Procs, name: str) -> None:
    deadline = time.monotonic() + START_S
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StartFailed(f"{name} exited ({proc.returncode}): {procs.log_tail(proc, 600)}")
        try:
            body = {"model": MODEL, "prompt": "ready", "max_tokens": 1}
            r = httpx.post(url + "/v1/completions", json=body, timeout=10.0)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.3)
    raise RuntimeError(f"{name} did not route a request within {START_S:g} s: {last}")


def _cpu_s(pids: Sequence[int]) -> float:
    """User + system CPU seconds of these processes and their threads so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return total


def live_run(
    cell: Cell,
    trace,
    router: str,
    policy: str,
    scale: float,
    seed: int,
    procs: Procs,
    record: Path | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Replay ``trace`` through ``router``:``policy`` in front of fresh workers; records and costs."""
    from traces.replay import Replay, ReplayConfig, lag_report, records_frame, run_replay

    protocol = "vllm" if router == "vllm" else "sglang"
    try:
        for attempt in range(1, 4):
            try:
                w = start_workers(procs, cell, protocol, scale, seed)
                port = _free_port()
                rproc = procs.start(
                    f"{router} router",
                    router_cmd(router, policy, port, w, scale, record),
                    None,
                )
                url = f"http://127.0.0.1:{port}"
                _wait_routes(url, rproc, procs, f"{router}:{policy}")
                break
            except StartFailed as exc:  # ports are picked, then bound: others may win the race
                procs.stop_all()
                if attempt == 3:
                    raise
                print(f"  {router}:{policy}: start failed, again ({exc!s:.200})", flush=True)
        pids = {"router": [rproc.pid], "workers": [p.pid for p in w.procs]}
        before = {k: _cpu_s(v) for k, v in pids.items()}
        self_before = time.process_time()
        config = ReplayConfig(
            target_url=url,
            protocol="openai",
            endpoint="completions",
            time_scale=scale,
            model=MODEL,
            prompt_format="text",
            seed=seed,
            # Wall seconds: a 512-token stream of 60 emulated seconds takes 240 at scale 0.25.
            timeout_s=max(120.0, 60.0 / scale),
            label=f"{router}:{policy}",
        )
        replay = Replay(trace, config)
        started = time.perf_counter()
        run_replay(replay)
        wall = time.perf_counter() - started
        cost = {f"cpu_{k}": (_cpu_s(v) - before[k]) / wall for k, v in pids.items()}
        cost["cpu_replay"] = (time.process_time() - self_before) / wall
        lag = lag_report(replay)
        cost.update(
            wall_s=wall,
            late=lag["n_late"],
            late_share=lag["n_late"] / lag["n_sent"] if lag["n_sent"] else 0.0,
            lag_p99_ms=lag["lag_p99_s"] * 1000,
            errors=sum(replay.errors.values()),
            load1=os.getloadavg()[0],
        )
        frame = records_frame(replay)
    finally:
        procs.stop_all()
    if record is not None and (record / "results.parquet").exists():
        frame = with_router_hold(frame, pd.read_parquet(record / "results.parquet"), scale)
    return frame, cost


# -- the whole bench ------------------------------------------------------------------------


def _parse_routers(text: str | None) -> list[tuple[str, str]]:
    if not text:
        return list(ROUTERS)
    known = {f"{r}:{p}" for r, p in ROUTERS}
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        if ":" not in item:
            picked = [rp for rp in ROUTERS if rp[0] == item]
            if not picked:
                raise SystemExit(
                    f"--routers: unknown router {item!r}; expected sglang, vllm, llmsched"
                )
            out += picked
        elif item in known:
            out.append(tuple(item.split(":", 1)))  # type: ignore[arg-type]
        else:
            raise SystemExit(f"--routers: unknown {item!r}; known: {', '.join(sorted(known))}")
    return out


def _parse_list(
    text: str | None, allowed: Sequence[str], flag: str, default: list[str]
) -> list[str]:
    if not text:
        return default
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad:
        raise SystemExit(f"{flag}: unknown {', '.join(bad)}; expected any of {', '.join(allowed)}")
    return items


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="x4, chat, 30 s of arrivals")
    ap.add_argument("--topologies", help=f"comma-separated of {', '.join(TOPOLOGIES)}")
    ap.add_argument("--traces", help=f"comma-separated of {', '.join(TRACES)}")
    ap.add_argument("--routers", help="sglang, vllm, llmsched or ROUTER:POLICY, comma-separated")
    ap.add_argument(
        "--span-s",
        type=float,
        help="seconds of arrivals per run (trace clock; 400 requests at least)",
    )
    ap.add_argument(
        "--time-scale",
        type=float,
        default=0.5,
        help="emulated s per wall s (default 0.5: at 1, on a busy 2-core machine, the "
        "processes were starved of CPU and the replay sent a third of requests late)",
    )
    ap.add_argument("--max-output-tokens", type=int, default=512, help="clip outputs (0: no cap)")
    ap.add_argument("--rate", type=float, help="requests/s instead of the simulator's knee")
    ap.add_argument(
        "--request-overhead-ms",
        type=float,
        help="per-request overhead the simulator charges, emulated ms (default: measured on an "
        "idle worker before the first run; 0: none, every release joins the next step)",
    )
    ap.add_argument("--max-requests", type=int, default=4000, help="cap per run")
    ap.add_argument("--seed", type=int, default=1, help="seed of the live run's trace")
    ap.add_argument(
        "--knee-seeds", type=int, default=3, help="trace draws the knee's attainment averages"
    )
    ap.add_argument(
        "--out",
        type=Path,
        help="folder for rows.csv, rows.json and each run's records, live and simulated (-sim)",
    )
    args = ap.parse_args(argv)
    if not args.time_scale > 0:
        raise SystemExit(f"--time-scale: expected a positive number; got {args.time_scale}")
    if args.knee_seeds < 1:
        raise SystemExit(f"--knee-seeds: expected 1 or more; got {args.knee_seeds}")
    if args.max_output_tokens < 0:
        raise SystemExit(f"--max-output-tokens: expected 0 or more; got {args.max_output_tokens}")
    if args.request_overhead_ms is not None and not args.request_overhead_ms >= 0:
        raise SystemExit(
            f"--request-overhead-ms: expected 0 or more; got {args.request_overhead_ms}"
        )
    topologies = _parse_list(
        args.topologies, list(TOPOLOGIES), "--topologies", ["x4"] if args.quick else ["x4", "x8"]
    )
    traces = _parse_list(args.traces, TRACES, "--traces", ["chat"] if args.quick else list(TRACES))
    routers = _parse_routers(args.routers)
    span_s = args.span_s or (30.0 if args.quick else 90.0)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(
        f"head-to-head: {MODEL} on {GPU}, time scale {args.time_scale:g}, {span_s:g} s of "
        f"arrivals a run, outputs clipped to {args.max_output_tokens or 'no'} tokens, TTFT SLO "
        f"{SLO_TTFT_S:g} s (goodput also TPOT {SLO_TPOT_S:g} s); "
        f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at start"
    )
    all_rows: list[dict[str, Any]] = []
    procs = Procs()
    scratch = tempfile.TemporaryDirectory(prefix="h2h-")
    folder = args.out or Path(scratch.name)
    try:
        if args.request_overhead_ms is None:
            first = cell_of(traces[0], topologies[0], span_s)
            overhead_s = measure_overhead(procs, first, args.time_scale, args.seed)
            how = "measured on an idle worker"
        else:
            overhead_s, how = args.request_overhead_ms / 1000.0, "given"
        profile = overhead_profile(MODEL, GPU, overhead_s, folder)
        log(f"the simulator charges a per-request overhead of {overhead_s * 1e3:.2f} ms ({how})")
        for topology in topologies:
            for tname in traces:
                cell = cell_of(tname, topology, span_s)
                if args.rate:
                    rate = args.rate
                else:
                    knee_seeds = [args.seed + k for k in range(args.knee_seeds)]
                    rate, _ = find_knee(
                        cell, knee_seeds, args.max_requests, args.max_output_tokens, log, profile
                    )
                trace = workload(cell, rate, args.seed, args.max_requests, args.max_output_tokens)
                log(f"\n== {topology} / {tname}: {rate:.2f} req/s, {len(trace)} requests ==")
                rows = []
                for router, policy in routers:
                    why = supported(router, policy, cell)
                    if why:
                        log(f"  {router}:{policy}: skipped: {why}")
                        continue
                    # A peer's policy is simulated by ours of the same name.
                    simulated = simulate(cell, trace, policy, args.seed, profile)
                    sim_out = outcome(simulated)
                    stem = f"{topology}-{tname}-{router}-{policy}".replace(":", "_")
                    record = args.out / f"{stem}-router" if args.out else None
                    try:
                        records, cost = live_run(
                            cell, trace, router, policy, args.time_scale, args.seed, procs, record
                        )
                    except StartFailed as exc:
                        log(f"  {router}:{policy}: not run: {exc}")
                        continue
                    live = outcome(records)
                    extra = {
                        "topology": topology,
                        "trace": tname,
                        "rate_rps": rate,
                        "sim_request_overhead_ms": overhead_s * 1e3,
                        **cost,
                    }
                    rows.append(row_of(router, policy, live, sim_out, extra))
                    log(
                        f"  {router}:{policy}: live {live.violations:.1%} violations "
                        f"(sim {sim_out.violations:.1%}); live misses short {live.short_misses} "
                        f"long {live.long_misses}; {cost['wall_s']:.0f} s wall, CPU router "
                        f"{cost['cpu_router']:.2f} workers {cost['cpu_workers']:.2f} replay "
                        f"{cost['cpu_replay']:.2f} cores, {cost['late']} sent late (p99 lag "
                        f"{cost['lag_p99_ms']:.0f} ms), {cost['errors']} errors, load "
                        f"{cost['load1']:.1f}"
                    )
                    log(
                        f"    misses (short/long, where they waited): live {misses(live)}; "
                        f"sim {misses(sim_out)}"
                    )
                    if args.out:
                        records.to_parquet(args.out / f"{stem}.parquet")
                        simulated.to_parquet(args.out / f"{stem}-sim.parquet")
                if rows:
                    log(
                        f"\n{topology} / {tname} at {rate:.2f} req/s (* = our policy of that "
                        "name simulates the peer's)"
                    )
                    log(table(rows))
                all_rows += rows
    finally:
        procs.stop_all()
        scratch.cleanup()
    if args.out and all_rows:
        frame = pd.DataFrame(
            [
                {k: v for k, v in r.items() if k != "live_where" and k != "sim_where"}
                for r in all_rows
            ]
        )
        frame.to_csv(args.out / "rows.csv", index=False)
        (args.out / "rows.json").write_text(json.dumps(all_rows, indent=1, default=float))
        log(f"\nwrote {args.out / 'rows.csv'} and {args.out / 'rows.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
