"""The step log: one row per engine step of every instance, whatever the policy."""

from __future__ import annotations

import pandas as pd
from typer.testing import CliRunner

from scheduler.registry import create
from sim.loop import simulate
from tests.unit.sim.fakes import AffineCost, make_limits, make_trace
from tests.unit.sim.test_simulate_cli import app

COST = AffineCost()


def test_the_step_log_of_a_plain_policy_accounts_for_every_token():
    trace = make_trace([0.0, 0.01, 0.02, 0.5], [300, 50, 900, 20], [30, 5, 12, 40])
    result = simulate(trace, COST, create("fcfs"), make_limits(chunked_prefill_size=256))
    log = result.steps_frame()
    assert set(log["kind"]) == {"prefill", "decode"}
    produced = (log["decode_batch"] * log["n_steps"]).sum() + log["n_first_tokens"].sum()
    assert produced == 30 + 5 + 12 + 40
    assert log["n_finished"].sum() == 4 and log["prefill_tokens"].sum() == 300 + 50 + 900 + 20
    assert (log["end_s"] > log["start_s"]).all() and log["start_s"].is_monotonic_increasing
    # Busy time is the steps' time.
    assert (log["end_s"] - log["start_s"]).sum() == result.busy_s.sum()
    # The prefill steps are what batches.parquet has always held.
    assert len(result.batches_frame()) == (log["kind"] != "decode").sum()


def test_simulate_writes_the_step_log_of_fcfs_when_asked(tmp_path):
    from traces.loaders import save

    trace = make_trace([0.0, 0.1, 0.2], [100, 2000, 50], [20, 4, 60])
    path = tmp_path / "t.parquet"
    save(trace, path)
    args = ["--trace", str(path), "--policy", "fcfs", "-q"]
    runner = CliRunner()
    plain = runner.invoke(app, [*args, "--out", str(tmp_path / "plain")], catch_exceptions=False)
    assert plain.exit_code == 0 and not (tmp_path / "plain" / "steps.parquet").exists()
    logged = runner.invoke(
        app, [*args, "--out", str(tmp_path / "log"), "--step-log"], catch_exceptions=False
    )
    assert logged.exit_code == 0, logged.output
    steps = pd.read_parquet(tmp_path / "log" / "steps.parquet")
    assert steps["n_finished"].sum() == 3
    assert (steps["decode_batch"] * steps["n_steps"]).sum() + steps["n_first_tokens"].sum() == 84
