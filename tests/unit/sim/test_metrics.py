"""Summary definitions and the files a run writes."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from scheduler.registry import create
from sim.loop import simulate
from sim.metrics import QUEUE_COLUMNS, RESULT_COLUMNS
from tests.unit.sim.fakes import AffineCost, make_limits, make_trace

COST = AffineCost()


def small_run(**trace_columns):
    trace = make_trace([0.0, 0.0, 10.0], [100, 2000, 50], [1, 101, 11], **trace_columns)
    return simulate(trace, COST, create("fcfs"), make_limits(max_running_requests=1))


def test_summary_follows_the_documented_definitions():
    res = small_run()
    c = res.columns
    s = res.summary(slo_ttft_s=0.5, slo_tpot_s=0.0055)
    ttft = c.first_token_s - res.arrival_s
    tpot = [(c.finish_s[i] - c.first_token_s[i]) / (res.output_tokens[i] - 1) for i in (1, 2)]
    assert s["ttft_mean_s"] == pytest.approx(ttft.mean())
    assert s["tpot_mean_s"] == pytest.approx(sum(tpot) / 2)  # the 1-token request has no TPOT
    duration = c.finish_s[2] - 0.0
    assert s["duration_s"] == pytest.approx(duration)
    assert s["throughput_rps"] == pytest.approx(3 / duration)
    assert s["output_tokens_per_s"] == pytest.approx(113 / duration)
    assert s["queue_delay_mean_s"] == pytest.approx((c.prefill_start_s - res.arrival_s).mean())
    met = [ttft[i] <= 0.5 and (i == 0 or tpot[i - 1] <= 0.0055) for i in range(3)]
    assert s["slo_attainment"] == pytest.approx(sum(met) / 3)
    assert s["goodput_rps"] == pytest.approx(sum(met) / duration)
    assert 0 < s["utilization"][0] <= 1
    # One token per decode step after the first: 100 + 10 ITL samples.
    assert res.itl.count == 110


def test_per_request_slos_override_the_global_ones():
    res = small_run(slo_ttft_s=[1e-6, math.nan, math.nan], slo_tpot_s=[math.nan, math.nan, 1.0])
    loose = res.summary(slo_ttft_s=100.0, slo_tpot_s=1e-9)
    # Row 0 misses its own TTFT SLO; row 1 misses the global TPOT; row 2 meets its own.
    assert loose["slo_attainment"] == pytest.approx(1 / 3)
    assert res.summary()["slo_attainment"] == pytest.approx(2 / 3)


def test_write_produces_the_three_files_with_stable_schemas(tmp_path):
    res = small_run()
    paths = res.write(tmp_path, slo_ttft_s=0.4, slo_tpot_s=0.05)
    frame = pd.read_parquet(paths["results"])
    assert tuple(frame.columns) == RESULT_COLUMNS
    assert frame["outcome"].astype(str).tolist() == ["ok", "ok", "ok"]
    assert frame["policy"].astype(str).unique().tolist() == ["fcfs"]
    queue = pd.read_parquet(paths["queue"])
    assert tuple(queue.columns) == QUEUE_COLUMNS
    # Both t=0 arrivals queue before the first step is planned.
    assert queue["waiting"].iloc[:2].tolist() == [1, 2]
    assert queue["running"].max() == 1
    summary = json.loads(paths["summary"].read_text())
    for key in (
        "n_requests",
        "ttft_p99_s",
        "tpot_p50_s",
        "itl_p90_s",
        "e2e_mean_s",
        "queue_delay_p99_s",
        "throughput_rps",
        "input_tokens_per_s",
        "output_tokens_per_s",
        "slo_attainment",
        "goodput_rps",
        "utilization",
    ):
        assert key in summary, key
    assert summary["slo_ttft_s"] == 0.4
