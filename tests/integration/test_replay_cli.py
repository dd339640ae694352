"""``llmsched replay`` as a separate process against a server on loopback, and its folder in a report."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from sim.report.records import load_sources
from tests.unit.replay.mock_server import MockServer
from traces.loaders import save
from traces.records import RESULT_COLUMNS, read_run_metadata
from traces.trace import Trace

LLMSCHED = Path(sys.executable).with_name("llmsched")


def _trace_file(tmp_path: Path, n: int = 20, gap_s: float = 0.02) -> Path:
    frame = pd.DataFrame(
        {
            "arrival_s": np.arange(n) * gap_s,
            "prompt_tokens": np.full(n, 64),
            "output_tokens": np.full(n, 6),
        }
    )
    path = tmp_path / "small.parquet"
    save(Trace(frame, name="small"), path)
    return path


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    return subprocess.run(
        [str(LLMSCHED), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_a_replayed_run_sits_beside_a_simulated_one_in_the_report(tmp_path: Path) -> None:
    trace = _trace_file(tmp_path)
    live, simulated = tmp_path / "live", tmp_path / "sim"
    with MockServer(first_token_delay_s=0.02, token_gap_s=0.005) as server:
        done = _cli(
            "replay", "--trace", str(trace), "--target", server.url,
            "--protocol", "sglang", "--out", str(live),
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "sent 20/20" in done.stdout  # the plain progress line of a non-terminal
    assert len(server.seen) == 20
    frame = pd.read_parquet(live / "results.parquet")
    assert tuple(frame.columns) == RESULT_COLUMNS
    assert (frame["outcome"] == "ok").all()
    meta = read_run_metadata(live)
    assert meta is not None and meta.source == "replay" and meta.target_url == server.url
    sim = _cli("simulate", "--trace", str(trace), "--out", str(simulated), "-q")
    assert sim.returncode == 0, sim.stderr
    runs = load_sources([live, simulated]).runs
    assert sorted(r.run.source for r in runs if r.run) == ["replay", "simulator"]
    replayed = next(r for r in runs if r.run and r.run.source == "replay")
    assert replayed.summary["n_completed"] == 20
    assert replayed.summary["ttft_p50_s"] >= 0.02
    report = _cli("report", str(live), str(simulated), "--out", str(tmp_path / "report"), "-q")
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "report" / "report.html").is_file()
    table = (tmp_path / "report" / "summary.csv").read_text()
    assert "replay" in table


def test_a_dead_target_is_reported_by_kind_and_the_records_are_written(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "dead"
    done = _cli(
        "replay", "--trace", str(_trace_file(tmp_path, n=8)),
        "--target", f"http://127.0.0.1:{port}", "--out", str(out), "-q",
    )  # fmt: skip
    assert done.returncode == 1
    assert "8 requests failed: 8 connection refused" in done.stderr
    assert "Traceback" not in done.stderr
    assert (pd.read_parquet(out / "results.parquet")["outcome"] == "error").all()


def test_sigterm_writes_what_was_measured_and_cancels_the_rest(tmp_path: Path) -> None:
    out = tmp_path / "stopped"
    with MockServer(first_token_delay_s=30.0) as server:
        proc = subprocess.Popen(
            [
                str(LLMSCHED), "replay", "--trace", str(_trace_file(tmp_path, n=40, gap_s=0.1)),
                "--target", server.url, "--out", str(out), "-q",
            ],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while len(server.seen) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "interrupted (SIGTERM)" in stderr and "Traceback" not in stderr
    frame = pd.read_parquet(out / "results.parquet")
    assert len(frame) >= 3 and len(frame) < 40
    assert (frame["outcome"] == "cancelled").all()
