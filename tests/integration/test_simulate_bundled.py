"""Every bundled trace simulates end to end through `llmsched simulate`, deterministically."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from sim.cli import app
from traces.bundled import BUNDLED, bundled_path

runner = CliRunner()


def _simulate(trace: Path, out: Path, *extra: str) -> dict:
    args = ["simulate", "--trace", str(trace), "--model", "llama-3.1-8b", "--gpu", "h100"]
    result = runner.invoke(app, [*args, "--out", str(out), *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_trace_simulates_every_request_once(name: str, tmp_path: Path) -> None:
    extra = ["--instances", "4", "--policy", "least_load", "--slo-ttft-ms", "2000"]
    summary = _simulate(bundled_path(name), tmp_path / "a", *extra)
    results = pd.read_parquet(tmp_path / "a" / "results.parquet")
    assert summary["n_requests"] == len(results) == results["request_id"].nunique()
    assert summary["n_completed"] + summary["n_failed"] + summary["n_rejected"] == len(results)
    ok = results[results["outcome"] == "ok"]
    assert (ok["first_token_s"] >= ok["arrival_s"]).all()
    assert (ok["finish_s"] >= ok["first_token_s"]).all()
    assert 0 < summary["slo_attainment"] <= 1


def test_same_seed_same_results_on_a_bundled_trace(tmp_path: Path) -> None:
    trace = bundled_path("mooncake-synthetic")
    extra = ["--instances", "3", "--policy", "random", "--seed", "7"]
    first = _simulate(trace, tmp_path / "a", *extra)
    again = _simulate(trace, tmp_path / "b", *extra)
    other = _simulate(
        trace, tmp_path / "c", "--instances", "3", "--policy", "random", "--seed", "8"
    )
    frame_a = pd.read_parquet(tmp_path / "a" / "results.parquet")
    pd.testing.assert_frame_equal(frame_a, pd.read_parquet(tmp_path / "b" / "results.parquet"))
    assert first["ttft_mean_s"] == again["ttft_mean_s"]
    assert other["ttft_mean_s"] != first["ttft_mean_s"]
