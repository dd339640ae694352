"""`llmsched report` as a user runs it: the terminal headline, its takeaway, refused flags."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from sim.cli import app

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def write_run(path: Path, ttft_s: list[float]) -> Path:
    """A measured run of fcfs: one request a second, the given TTFTs, 10 output tokens."""
    path.mkdir(parents=True)
    n = len(ttft_s)
    arrival = [float(i) for i in range(n)]
    pd.DataFrame(
        {
            "arrival_s": arrival,
            "first_token_s": [a + t for a, t in zip(arrival, ttft_s, strict=True)],
            "finish_s": [a + t + 0.2 for a, t in zip(arrival, ttft_s, strict=True)],
            "prompt_tokens": [100] * n,
            "output_tokens": [10] * n,
        }
    ).to_parquet(path / "results.parquet")
    (path / "summary.json").write_text(json.dumps({"config": {"policy": "fcfs"}}))
    return path


@pytest.fixture
def two_runs_of_one_policy(tmp_path: Path) -> tuple[Path, Path]:
    return write_run(tmp_path / "prof", [0.1] * 8), write_run(tmp_path / "base", [0.1, 0.9] * 4)


def test_the_terminal_headline_keeps_each_rows_source_label(two_runs_of_one_policy, tmp_path):
    prof, base = two_runs_of_one_policy
    result = invoke("report", prof, base, "--out", tmp_path / "r", "--slo-ttft-ms", "500")
    assert result.exit_code == 0, result.output
    assert "fcfs [prof]" in result.output and "fcfs [base]" in result.output
    takeaway = next(line for line in result.output.splitlines() if line.startswith("On SLO"))
    assert takeaway.startswith("On SLO attainment, fcfs [prof] wins at ×1 (at ×1: 100.0%"), (
        result.output
    )
    assert (tmp_path / "r" / "summary.md").read_text().startswith(takeaway)


@pytest.mark.parametrize(
    ("flag", "value"), [("--slo-ttft-ms", "0"), ("--slo-ttft-ms", "-5"), ("--slo-tpot-ms", "0")]
)
def test_an_slo_of_zero_or_less_is_refused_like_simulates(
    two_runs_of_one_policy, tmp_path, flag, value
):
    prof, _ = two_runs_of_one_policy
    result = invoke("report", prof, "--out", tmp_path / "r", flag, value)
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {flag}: expected an SLO above 0 ms, got {value}"
    assert not (tmp_path / "r").exists()
