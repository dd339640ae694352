"""The simulator against the real vLLM V1 engine on this CPU: the figures of several runs.

Starts the real server of ``tests/integration/real_vllm.py`` (installed and
cached on first use; a random-weight 4-layer Llama), calibrates it from the
client side, then replays the fidelity workload (80 requests of a
Poisson-like window of the bundled Azure code trace, prompts capped at 512
tokens) ``--runs`` times at a moderate load (0.6 of what the calibrated
server serves) and twice near saturation (0.9), each against its simulation
(:func:`sim.fidelity.fidelity`), and prints every run's table and, per
figure, the errors of all runs: what the README's fidelity section quotes.

    .venv/bin/python bench/bench_fidelity.py                   # 3 moderate runs, 2 heavy
    .venv/bin/python bench/bench_fidelity.py --runs 1 --no-heavy --out /tmp/fid

The server's engine spins on one core while it lives; it is stopped at the end.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration import real_vllm
from tests.integration.fidelity_support import (
    SERVED,
    calibrate_real,
    real_loads,
    replay_real,
)

SHOWN = ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tpot_p50_s", "e2e_p50_s", "e2e_p90_s")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="moderate-load runs")
    ap.add_argument(
        "--load",
        type=float,
        default=None,
        help="moderate load factor (default: 0.6 of what the calibrated server serves)",
    )
    ap.add_argument(
        "--heavy-load", type=float, default=None, help="near-saturation load (default: 0.9 of it)"
    )
    ap.add_argument("--no-heavy", action="store_true", help="skip the near-saturation runs")
    ap.add_argument("--out", type=Path, default=None, help="keep the run folders here")
    args = ap.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="bench-fidelity-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {_cpu()}, {len(__import__('os').sched_getaffinity(0))} cores")
    t0 = time.monotonic()
    with real_vllm.real_vllm_server(SERVED, work / "vllm-server.log") as url:
        up = time.monotonic()
        fit, limits = calibrate_real(
            url, real_vllm.model_dir(), work / "profile.json", real_vllm.VLLM_VERSION
        )
        print(f"server up in {up - t0:.0f} s; calibrated in {time.monotonic() - up:.0f} s")
        for kind, q in fit.fit.items():
            print(f"  fit {kind}: {q.points} rows, rms error {q.rms_rel_error:.1%}")
        band = max(q.rms_rel_error for q in fit.fit.values())
        moderate, heavy = real_loads(work / "profile.json", limits, real_vllm.model_dir())
        args.load = moderate if args.load is None else args.load
        args.heavy_load = heavy if args.heavy_load is None else args.heavy_load
        print(f"  loads: moderate {args.load:.3g}, heavy {args.heavy_load:.3g}")
        plan = [(f"moderate-{i + 1}", args.load, None) for i in range(args.runs)]
        if not args.no_heavy:
            plan += [(f"heavy-{i + 1}", args.heavy_load, band) for i in range(2)]
        results = {}
        for seed, (name, load, b) in enumerate(plan, start=1):
            t = time.monotonic()
            r = replay_real(
                url,
                work / "profile.json",
                work / name,
                limits,
                model_dir=real_vllm.model_dir(),
                load=load,
                seed=seed,  # fresh prompts each run
                band=b,
            )
            results[name] = r
            lag = r.send_lag
            print(
                f"\n{name} (load {load:g}, {time.monotonic() - t:.0f} s, {r.n_errors} errors; "
                f"client send lag p99 {lag['lag_p99_s'] * 1e3:.1f} ms, "
                f"max {lag['lag_max_s'] * 1e3:.1f} ms)"
            )
            print(r.markdown(), end="")
    for group in ("moderate", "heavy"):
        runs = {k: v for k, v in results.items() if k.startswith(group)}
        if not runs:
            continue
        print(f"\n{group}: error of the simulation per run (simulated / real - 1)")
        for key in SHOWN:
            errors = [r.error(key) for r in runs.values()]
            live = [r.table.set_index("metric").loc[key, "live"] for r in runs.values()]
            spread = (max(live) - min(live)) / min(live) if min(live) > 0 else float("nan")
            print(
                f"  {key:12s} "
                + "  ".join(f"{e:+6.1%}" for e in errors)
                + f"   mean {statistics.fmean(errors):+6.1%}   real run-to-run spread {spread:.0%}"
            )
    print(f"\n{time.monotonic() - t0:.0f} s in all; run folders in {work}")


if __name__ == "__main__":
    main()
