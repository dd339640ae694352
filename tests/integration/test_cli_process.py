"""The installed `llmsched` console script, run as a separate process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from traces.bundled import bundled_path

LLMSCHED = Path(sys.executable).with_name("llmsched")


def _run(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # as in a pipe
    return subprocess.run(
        [str(LLMSCHED), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        env=env,
    )


def test_demo_prints_every_bundled_trace_and_writes_the_report(tmp_path: Path) -> None:
    result = _run("demo", "--out", str(tmp_path / "demo"), timeout_s=300)
    assert result.returncode == 0, result.stderr
    stdout = result.stdout.replace("\n", "")
    for workload in ("chat", "documents"):
        report = tmp_path / "demo" / workload / "report.html"
        assert report.stat().st_size > 100_000
        assert str(report) in stdout
    for name, rows in [("azure-code", "8,819"), ("mooncake-conversation", "12,031")]:
        line = next(line for line in result.stdout.splitlines() if name in line)
        assert rows in line
    # One takeaway per workload: who wins where, and why.
    assert result.stdout.count("Takeaway: On SLO attainment, ") == 2
    assert " wins at " in stdout and "misses the SLO on" in stdout
    # Nothing about the project's own data (RAGPulse's one out-of-order pair is known) ...
    assert "ragpulse" not in result.stderr and "out of order" not in result.stderr
    # ... but the loads past capacity are named, and nothing is a traceback.
    assert "warning: offered load exceeds capacity" in result.stderr
    assert "Traceback" not in result.stderr


def test_stats_json_from_the_console_script() -> None:
    result = _run("trace", "stats", "--json", str(bundled_path("mooncake-synthetic")))
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["n_requests"] == 3993
    assert round(stats["prefix_reuse_share"], 3) == 0.640


def test_missing_file_is_a_clean_error(tmp_path: Path) -> None:
    result = _run("trace", "stats", str(tmp_path / "nope.csv"))
    assert result.returncode == 2
    assert "nope.csv" in result.stderr and "Traceback" not in result.stderr
