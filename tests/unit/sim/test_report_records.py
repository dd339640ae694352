"""Reports read run.json for roles and origins, and still read folders written before it."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from scheduler.registry import create
from sim.loop import simulate
from sim.report import load_sources, write_report
from sim.report.records import summary_from_frame
from tests.unit.sim.fakes import AffineCost, make_limits, make_trace
from traces.records import InstanceRecord, RunMetadata

#: Columns of ``results.parquet`` before the shared schema (what older folders hold).
OLD_COLUMNS = (
    "request_id",
    "arrival_s",
    "dispatch_s",
    "prefill_start_s",
    "first_token_s",
    "finish_s",
    "prompt_tokens",
    "cached_tokens",
    "output_tokens",
    "instance",
    "decode_instance",
    "policy",
    "outcome",
    "n_preemptions",
    "ttft_s",
    "tpot_s",
    "e2e_s",
    "router_queue_s",
    "prefill_queue_s",
    "prefill_s",
    "kv_transfer_s",
    "first_decode_s",
)

KEYS = ("n_completed", "ttft_p90_s", "tpot_mean_s", "e2e_p99_s", "slo_attainment", "goodput_rps")


def simulated(pd_split=None):
    trace = make_trace([0.0, 0.0, 0.5, 3.0], [100, 2000, 50, 700], [1, 101, 11, 40])
    kwargs = {"pd": pd_split} if pd_split else {"instances": 2}
    return simulate(trace, AffineCost(), create("round_robin"), make_limits(), **kwargs)


def test_a_folder_in_the_previous_format_still_loads_and_summarises_as_before(tmp_path):
    res = simulated()
    run = tmp_path / "old-run"
    res.write(run, slo_ttft_s=0.4, slo_tpot_s=0.01, config={"policy": "round_robin"})
    frame = pd.read_parquet(run / "results.parquet")
    frame[list(OLD_COLUMNS)].to_parquet(run / "results.parquet", index=False)
    (run / "run.json").unlink()
    summary = json.loads((run / "summary.json").read_text())
    for key in ("n_error", "n_timeout", "n_cancelled"):  # keys this version added
        del summary[key]
    (run / "summary.json").write_text(json.dumps(summary))

    (as_written,) = load_sources([run]).runs
    assert as_written.run is None and as_written.label == "round_robin"
    assert as_written.summary["slo_attainment"] == pytest.approx(
        res.summary(0.4, 0.01)["slo_attainment"]
    )
    (recomputed,) = load_sources([run], slo_ttft_s=0.4, slo_tpot_s=0.01).runs
    want = res.summary(0.4, 0.01)
    for key in KEYS:
        assert recomputed.summary[key] == pytest.approx(want[key]), key
    assert recomputed.summary["roles"] == ["mixed", "mixed"]  # guessed from the ids
    # ITL and utilization are not in the records; the written summary keeps them.
    assert recomputed.summary["itl_p90_s"] == pytest.approx(want["itl_p90_s"])
    assert recomputed.summary["utilization"] == pytest.approx(want["utilization"])
    page = write_report([run], tmp_path / "report").html.read_text()
    assert "unknown (no run.json)" in page


def test_recomputed_summaries_take_instance_roles_from_run_json(tmp_path):
    res = simulated("1:2")
    res.write(tmp_path / "pd")
    (rec,) = load_sources([tmp_path / "pd"], slo_ttft_s=1.0).runs
    assert rec.summary["roles"] == ["prefill", "decode", "decode"]
    assert rec.summary["n_instances"] == 3
    frame = pd.read_parquet(tmp_path / "pd" / "results.parquet")
    guessed = summary_from_frame(frame, 1.0, None)
    assert guessed["roles"] == ["mixed"]  # without run.json: guessed from the instance column


def test_the_report_shows_where_each_runs_records_come_from(tmp_path):
    res = simulated()
    res.write(tmp_path / "sim" / "rr", options={"prefix_knowledge": "oracle"})
    live = tmp_path / "live" / "rr"
    live.mkdir(parents=True)
    pd.read_parquet(tmp_path / "sim" / "rr" / "results.parquet").to_parquet(
        live / "results.parquet", index=False
    )
    RunMetadata(
        source="replay",
        target_url="http://gpu-7:30000",
        instances=[InstanceRecord(id=0, name="a", url="http://gpu-7:30001")],
        options={"poll_interval_s": 0.5},
    ).write(live)
    paths = write_report([tmp_path / "sim", tmp_path / "live"], tmp_path / "report")
    page = paths.html.read_text()
    assert 'id="run-origins"' in page
    assert "replay → http://gpu-7:30000" in page and "poll_interval_s=0.5" in page
    assert "prefix_knowledge=oracle" in page and "instance-1 (mixed)" in page
    runs = pd.read_csv(paths.csv)
    assert sorted(runs["records_from"]) == ["replay", "simulator"]
    assert "option_prefix_knowledge" in runs.columns
