"""Simulator speed and memory: requests per CPU-second, bytes per request, sim/wall ratio.

Runs ``fcfs`` on qwen2.5-32b / H200 instances with SGLang's default limits,
over a synthetic BurstGPT-style trace (Gamma arrivals, CV 2, from
``traces.generator``) and the Mooncake FAST'25 conversation trace (tiled with
fresh prefix hashes to reach the asked size), on 1 and 8 instances, at a low
and a high load. Each case runs in its own process so its peak RSS is its own.

    .venv/bin/python bench/bench_sim.py                      # 100k-request cases
    .venv/bin/python bench/bench_sim.py --sizes 100000 1000000
    .venv/bin/python bench/bench_sim.py --case synthetic:100000:8:high

Memory, per request: *kept* is what a finished run holds (result columns
and queue timeline); *peak* (with ``--memory``, a separate tracemalloc run)
is the most the simulation had allocated at once beyond the trace itself
(in-flight state, histogram buffers, and the summary's derived arrays).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scheduler.cost_model import CostModel, sglang_defaults  # noqa: E402
from scheduler.registry import create  # noqa: E402
from sim.limits import resolve_limits  # noqa: E402
from sim.loop import simulate  # noqa: E402
from traces.trace import Trace  # noqa: E402

__all__ = ["main"]

MODEL, GPU = "qwen2.5-32b", "h200"
MOONCAKE = ROOT.parent / "shared" / "traces-real" / "mooncake-fast25" / "conversation_trace.jsonl"
#: Arrival rate per instance, req/s. One instance saturates near 20 req/s on
#: the synthetic trace (beyond, its KV cache thrashes with preemptions) and
#: near 0.35 req/s on Mooncake (mean prompt 12k tokens): low is about a
#: quarter of that, high about 90 %.
SYNTHETIC_RATE_PER_INSTANCE = {"low": 5.0, "high": 18.0}
MOONCAKE_RATE_PER_INSTANCE = {"low": 0.1, "high": 0.3}


def synthetic_trace(n: int, rate_rps: float) -> Trace:
    from traces.generator import SyntheticConfig, generate

    return generate(SyntheticConfig(n_requests=n, rate_rps=rate_rps, cv=2.0, seed=0))


def mooncake_trace(n: int, rate_rps: float) -> Trace:
    """The Mooncake conversation trace at ``rate_rps``, tiled to ``n`` rows.

    Its 3 s timestamp buckets are jittered (spread uniformly, seeded), as the
    trace's notes advise for sub-bucket arrival patterns.
    """
    from traces.loaders import load

    base = load(MOONCAKE, jitter=True, seed=0).frame
    span = float(base["arrival_s"].iloc[-1]) + 3.0
    copies, hash_step = -(-n // len(base)), 1 << 40
    frames = []
    for i in range(copies):
        f = base.copy()
        f["arrival_s"] = f["arrival_s"] + i * span
        f["request_id"] = f["request_id"] + i * len(base)
        f["prefix_hashes"] = [h + i * hash_step for h in f["prefix_hashes"]]
        frames.append(f)
    import pandas as pd

    frame = pd.concat(frames, ignore_index=True).iloc[:n]
    native = len(base) / span
    frame = frame.assign(arrival_s=frame["arrival_s"] * (native / rate_rps))
    return Trace(frame, name="mooncake")


def run_case(case: str, memory: bool = False) -> dict:
    """Run one ``trace:size:instances:load`` case in this process.

    With ``memory``, tracemalloc records the peak of everything allocated
    during the run (slower: the speed figures of that run are not reported).
    """
    kind, size, inst, load = case.split(":")
    n, instances = int(size), int(inst)
    per_instance = (
        SYNTHETIC_RATE_PER_INSTANCE if kind == "synthetic" else MOONCAKE_RATE_PER_INSTANCE
    )
    rate = per_instance[load] * instances
    trace = synthetic_trace(n, rate) if kind == "synthetic" else mooncake_trace(n, rate)
    cost = CostModel.from_names(MODEL, GPU)
    limits = resolve_limits(cost, sglang_defaults(MODEL, GPU))
    gc.collect()
    if memory:
        tracemalloc.start()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    result = simulate(trace, cost, create("fcfs"), limits, instances=instances)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    peak = tracemalloc.get_traced_memory()[1] if memory else None
    tracemalloc.stop()
    c, timeline = result.columns, result.timeline
    kept = sum(getattr(c, f).nbytes for f in c.__slots__) + len(timeline) * 28
    s = result.summary()
    return {
        "case": case,
        "requests": n,
        "rate_rps": rate,
        "cpu_s": cpu,
        "req_per_cpu_s": n / cpu,
        "sim_s": s["duration_s"],
        "sim_per_wall": s["duration_s"] / wall,
        "kept_bytes_per_request": kept / n,
        "peak_bytes_per_request": None if peak is None else peak / n,
        "utilization": float(np.mean(s["utilization"])),
        "ttft_p50_s": s["ttft_p50_s"],
        "tpot_p50_s": s["tpot_p50_s"],
        "preemptions": s["n_preemptions"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--loads", nargs="+", default=["low", "high"])
    parser.add_argument("--traces", nargs="+", default=["synthetic", "mooncake"])
    parser.add_argument("--case", help="run one case here and print it as JSON")
    parser.add_argument(
        "--memory", action="store_true", help="also a tracemalloc pass per case (peak B/req)"
    )
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.memory)))
        return
    header = (
        f"{'case':32} {'req/CPU-s':>10} {'CPU s':>7} {'sim/wall':>9} {'kept B/req':>10} "
        f"{'peak B/req':>10} {'util':>5} {'TTFT p50':>9} {'TPOT p50':>9} {'preempt':>8}"
    )
    print(header)
    for kind in args.traces:
        if kind == "mooncake" and not MOONCAKE.is_file():
            print(f"{kind}: {MOONCAKE} not found, skipped")
            continue
        for n in args.sizes:
            for inst in args.instances:
                for load in args.loads:
                    case = f"{kind}:{n}:{inst}:{load}"
                    r = _subprocess_case(case)
                    peak = "-"
                    if args.memory:
                        m = _subprocess_case(case, "--memory")
                        peak = f"{m['peak_bytes_per_request']:,.0f}"
                    print(
                        f"{case:32} {r['req_per_cpu_s']:>10,.0f} {r['cpu_s']:>7.1f} "
                        f"{r['sim_per_wall']:>9,.0f} {r['kept_bytes_per_request']:>10,.0f} "
                        f"{peak:>10} {r['utilization']:>5.0%} {r['ttft_p50_s']:>9.3f} "
                        f"{r['tpot_p50_s']:>9.4f} {r['preemptions']:>8,}",
                        flush=True,
                    )


def _subprocess_case(case: str, *flags: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--case", case, *flags],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
