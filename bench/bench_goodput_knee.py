"""What bounds goodput at the head-to-head's knee, in the simulator.

Simulates one head-to-head cell (``bench_head_to_head.py``'s workload: x4
chat by default) at one rate, with the workers' per-request overhead
charged, for each policy variant over three seeds, and prints per variant
the TTFT-SLO violations, the goodput (requests within TTFT 0.4 s and TPOT
0.1 s per second), the share of the instances' time spent in prefill
steps (what the decodes wait out: SGLang runs a prefill step whenever one
can be formed), and the worst instance's TTFT p90 and prefill share, where
a pool that is given more work than it can do shows. ``--spans`` reruns
the variants with longer arrival spans: a queue that grows without bound
grows with the span.

    .venv/bin/python bench/bench_goodput_knee.py                  # x4 chat, 44.37 req/s
    .venv/bin/python bench/bench_goodput_knee.py --rate 40 --spans 30 60 120
    .venv/bin/python bench/bench_goodput_knee.py --policies cache_aware "laps window_ms=50"
    .venv/bin/python bench/bench_goodput_knee.py --limit enable_mixed_chunk=true
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from _matrix import PolicyRow, overhead_profile, parse_policy, parse_value
from bench_head_to_head import (
    GPU,
    MODEL,
    SLO_TPOT_S,
    SLO_TTFT_S,
    WARMUP,
    cell_of,
    outcome,
    workload,
)

#: The variants the default run compares: the baseline, laps, laps holding short
#: prefills longer (fewer prefill steps), and spatial pools of fixed size.
DEFAULT_POLICIES = (
    "cache_aware",
    "laps",
    "laps window_ms=50",
    "laps mode=spatial short_share=0.75 threshold_tokens=2048 rebalance_ratio=100",
    "laps mode=spatial short_share=0.5 threshold_tokens=1024 rebalance_ratio=100",
)


def run_one(
    cell, rate: float, seed: int, row: PolicyRow, profile: Path, limits: dict[str, Any]
) -> dict[str, float]:
    """One simulated run's figures: outcome, prefill share, worst instance."""
    import sim

    # Enough requests for the whole span (the head-to-head caps its runs at 4,000).
    cap = max(4000, math.ceil(rate * cell.span_s * 1.2))
    trace = workload(cell, rate, seed, cap, 512)
    result = sim.run(
        trace,
        row.name,
        policy_params=dict(row.params) or None,
        model=MODEL,
        gpu=GPU,
        profile=profile,
        slo_ttft_ms=SLO_TTFT_S * 1000,
        slo_tpot_ms=SLO_TPOT_S * 1000,
        seed=seed,
        instances=cell.instances,
        **limits,
    )
    records = result.records
    o = outcome(records)
    t0, t1 = float(records["arrival_s"].min()), float(records["arrival_s"].max())
    w0 = t0 + WARMUP * (t1 - t0)
    steps = result.batches
    share = np.zeros(cell.instances)
    if steps is not None and len(steps):
        # Prefill steps alone: a mixed step (enable_mixed_chunk) decodes as well.
        s = steps[(steps["start_s"] >= w0) & (steps["end_s"] <= t1)]
        s = s[s["kind"].astype(str) == "prefill"]
        busy = (s["end_s"] - s["start_s"]).groupby(s["instance"]).sum()
        for i, v in busy.items():
            share[int(i)] = v / (t1 - w0)
    measured = records[records["arrival_s"] >= w0]
    p90 = measured.groupby("instance")["ttft_s"].quantile(0.9)
    return {
        "violations": o.violations,
        "goodput": o.goodput_rps,
        "prefill_share": float(share.mean()),
        "worst_share": float(share.max()),
        "worst_ttft_p90_s": float(p90.max()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--topology", default="x4", help="x4 or x8 (default x4)")
    ap.add_argument("--trace", default="chat", help="chat or azure-conv (default chat)")
    ap.add_argument(
        "--rate",
        type=float,
        default=44.37,
        help="arrivals per second (default 44.37: the knee of the head-to-head's --quick run)",
    )
    ap.add_argument(
        "--request-overhead-ms",
        type=float,
        default=1.69,
        help="the workers' per-request overhead, emulated ms (default 1.69: measured then)",
    )
    ap.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--spans", type=float, nargs="+", default=[30.0], help="arrival spans, s")
    ap.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an engine limit under SGLang's name (enable_mixed_chunk=true, "
        "chunked_prefill_size=2048); repeatable",
    )
    args = ap.parse_args(argv)
    limits: dict[str, Any] = {}
    for text in args.limit:
        key, eq, value = text.partition("=")
        if not eq or not key:
            ap.error(f"--limit {text!r}: expected KEY=VALUE")
        limits[key] = parse_value(value)
    rows = [parse_policy(p) for p in args.policies]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        profile = overhead_profile(MODEL, GPU, args.request_overhead_ms / 1000.0, Path(tmp))
        for span in args.spans:
            cell = cell_of(args.trace, args.topology, span)
            if cell.pd:
                ap.error("a PD topology decodes apart from its prefills; use x4 or x8")
            print(
                f"\n{args.topology} / {args.trace} at {args.rate:g} req/s, arrival span {span:g} s, "
                f"overhead {args.request_overhead_ms:g} ms, seeds {args.seeds} (means)"
                + (f", limits {limits}" if limits else "")
            )
            print(
                f"{'policy':<72} {'viol':>6} {'goodput':>8} {'prefill':>8} "
                f"{'worst inst':>10} {'its TTFT p90':>13}"
            )
            for row in rows:
                runs = [run_one(cell, args.rate, s, row, profile, limits) for s in args.seeds]
                m = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
                print(
                    f"{row.label:<72} {m['violations']:>6.1%} {m['goodput']:>8.2f} "
                    f"{m['prefill_share']:>8.0%} {m['worst_share']:>10.0%} "
                    f"{m['worst_ttft_p90_s']:>12.2f}s",
                    flush=True,
                )
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
