"""The simulator writes the shared record schema: new columns, per-request SLOs, run.json."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from scheduler.registry import create
from sim.loop import simulate
from sim.report.records import summary_from_frame
from tests.unit.sim.fakes import AffineCost, make_limits, make_trace
from traces.records import RESULT_SCHEMA, read_run_metadata
from traces.trace import Trace

COST = AffineCost()


def test_results_parquet_has_the_shared_schema_and_the_simulators_values(tmp_path):
    trace = Trace(
        pd.DataFrame(
            {
                "arrival_s": [0.0, 0.1, 0.2],
                "prompt_tokens": [100, 200, 300],
                "output_tokens": [1, 5, 9],
                "session_id": ["chat-1", None, "chat-1"],
            }
        )
    )
    res = simulate(trace, COST, create("fcfs"), make_limits())
    paths = res.write(tmp_path)
    frame = pd.read_parquet(paths["results"])
    assert {c: str(t) for c, t in frame.dtypes.items()} == RESULT_SCHEMA
    assert frame["send_s"].tolist() == frame["arrival_s"].tolist()  # sends on schedule
    assert frame["max_tokens"].tolist() == [1, 5, 9]  # a replay asks for what it produces
    assert frame["n_chunks"].tolist() == [1, 5, 9]  # one token a step, each its own chunk
    assert frame["session_id"].tolist() == ["chat-1", pd.NA, "chat-1"]
    assert frame["http_status"].isna().all() and frame["error_message"].isna().all()
    assert frame[["itl_p50_s", "itl_p90_s", "itl_p99_s", "itl_max_s"]].isna().all().all()


def test_a_budget_column_apart_from_the_output_length_is_written_as_max_tokens():
    res = simulate(make_trace([0.0, 0.0], [10, 10], [3, 4]), COST, create("fcfs"), make_limits())
    frame = dataclasses.replace(res, max_tokens=np.array([64, 128])).frame()
    assert frame["max_tokens"].tolist() == [64, 128]
    assert frame["output_tokens"].tolist() == [3, 4]


def test_per_request_slos_give_the_same_attainment_from_written_records(tmp_path):
    trace = make_trace(
        [0.0, 0.0, 0.5, 3.0, 3.0],
        [100, 2000, 50, 700, 40],
        [1, 101, 11, 40, 5],
        slo_ttft_s=[1e-6, math.nan, 5.0, math.nan, 0.001],
        slo_tpot_s=[math.nan, 1e-6, math.nan, 10.0, math.nan],
    )
    res = simulate(trace, COST, create("fcfs"), make_limits(max_running_requests=2))
    paths = res.write(tmp_path, slo_ttft_s=0.5, slo_tpot_s=0.01)
    frame = pd.read_parquet(paths["results"])
    for slo in ((0.5, 0.01), (None, None), (100.0, 100.0)):
        want, got = res.summary(*slo), summary_from_frame(frame, *slo)
        for key in ("slo_attainment", "goodput_rps", "n_completed", "ttft_p90_s"):
            assert got[key] == pytest.approx(want[key]), (slo, key)
    # The per-request SLOs decide: without them every request would meet 100 s.
    assert res.summary(100.0, 100.0)["slo_attainment"] < 1.0
    assert summary_from_frame(frame.drop(columns=["slo_ttft_s", "slo_tpot_s"]), 100.0, 100.0)[
        "slo_attainment"
    ] == pytest.approx(1.0)


def test_run_json_names_each_instance_with_its_role_and_the_options(tmp_path):
    trace = make_trace([0.0, 0.1, 0.2, 0.3], [100, 200, 300, 400], [4, 4, 4, 4])
    res = simulate(trace, COST, create("round_robin"), make_limits(), pd="1:2")
    config = {"policy": "round_robin", "prefix_knowledge": "estimate", "seed": 3}
    # Without the run's own record of how the policy was fed, the config says.
    dataclasses.replace(res, options=None).write(tmp_path / "a", config=config)
    meta = read_run_metadata(tmp_path / "a")
    assert meta.source == "simulator" and meta.target_url is None
    assert [(i.id, i.name, i.role) for i in meta.instances] == [
        (0, "instance-0", "prefill"),
        (1, "instance-1", "decode"),
        (2, "instance-2", "decode"),
    ]
    assert "decode" in meta.instances[1].pools and "entry" in meta.instances[0].pools
    assert meta.options == {"prefix_knowledge": "estimate"}
    fed = dataclasses.replace(res, options={"prefix_knowledge": "oracle", "batch_hints": "group"})
    fed.write(tmp_path / "b", config=config)
    assert read_run_metadata(tmp_path / "b").options == {
        "prefix_knowledge": "oracle",
        "batch_hints": "group",
    }
    fed.write(tmp_path / "c", config=config, options={"poll_interval_s": 0.25})
    assert read_run_metadata(tmp_path / "c").options == {"poll_interval_s": 0.25}
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["roles"] == ["prefill", "decode", "decode"]


def test_the_metrics_module_does_not_load_the_event_loop():
    code = "import sys, sim.metrics; print('sim.loop' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
