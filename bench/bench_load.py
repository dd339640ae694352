"""Benchmark: load a 5M-row BurstGPT CSV (the 8-column ``BurstGPT_3`` schema).

Writes a synthetic file shaped like the real one (whole-second float
timestamps from 19,440,110 s, ~5% Conversation-log rows carrying a session
UUID, ~7% failed rows with 0 response tokens) into a temporary directory,
then loads it with :func:`traces.loaders.load` and prints rows, seconds,
rows/s and peak RSS. The file is written in a child process so that the peak
RSS printed is the loader's, not the generator's.

Run from the repository root::

    .venv/bin/python bench/bench_load.py [--rows 5000000]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["main", "write_burstgpt_csv"]

_HEADER = [
    "Timestamp",
    "Session ID",
    "Elapsed time",
    "Model",
    "Request tokens",
    "Response tokens",
    "Total tokens",
    "Log Type",
]


def write_burstgpt_csv(path: Path, rows: int, seed: int = 0) -> None:
    """Write a synthetic 8-column BurstGPT CSV with ``rows`` data rows (vectorized)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(seed)
    # ~0.52 req/s like BurstGPT_without_fails_3; timestamps are whole seconds.
    gaps = np.floor(rng.exponential(1 / 0.52, size=rows))
    ts = 19_440_110.0 + np.cumsum(gaps)
    conversation = rng.random(rows) < 0.05
    pool = np.char.mod("%016x", rng.integers(0, 2**62, size=100_000))
    sessions = np.where(conversation, pool[rng.integers(0, len(pool), size=rows)], None)
    request = np.maximum(1, rng.lognormal(6.5, 1.0, size=rows)).astype(np.int64)
    response = np.maximum(1, rng.lognormal(5.0, 1.0, size=rows)).astype(np.int64)
    response[rng.random(rows) < 0.07] = 0
    table = pa.table(
        {
            "Timestamp": ts,
            "Session ID": pa.array(sessions, type=pa.string()),
            "Elapsed time": np.round(rng.gamma(2.0, 5.0, size=rows), 3),
            "Model": np.where(rng.random(rows) < 0.85, "ChatGPT", "GPT-4"),
            "Request tokens": request,
            "Response tokens": response,
            "Total tokens": request + response,
            "Log Type": np.where(conversation, "Conversation log", "API log"),
        }
    )
    assert table.column_names == _HEADER
    pacsv.write_csv(table, path, pacsv.WriteOptions(quoting_style="needed"))


def main() -> None:
    """Generate (in a child process), load, and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--write-only", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_only is not None:
        write_burstgpt_csv(args.write_only, args.rows)
        return

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "BurstGPT_synthetic.csv"
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, __file__, "--rows", str(args.rows), "--write-only", str(path)],
            check=True,
        )
        write_s = time.perf_counter() - t0
        size_mb = path.stat().st_size / 1e6
        print(f"wrote {args.rows:,} rows ({size_mb:,.0f} MB) in {write_s:.1f} s")

        # Importable without installing the package: the repository root is our parent.
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from traces.loaders import load

        rss_before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.perf_counter()
        trace = load(path)
        load_s = time.perf_counter() - t0
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(f"rows      {len(trace):,}")
    print(f"seconds   {load_s:.2f}")
    print(f"rows/s    {len(trace) / load_s:,.0f}")
    print(f"peak RSS  {peak_mb:,.0f} MiB (after imports, before load: {rss_before_mb:,.0f} MiB)")
    print(f"failed    {int(trace.frame['failed'].sum()):,}; span {trace.span_s:,.0f} s")


if __name__ == "__main__":
    main()
