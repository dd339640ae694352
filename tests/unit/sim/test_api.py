"""The Python API (sim.run, sim.compare, sim.load): the same runs as the command line, as frames."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import sim
from sim.runner import prepare
from sim.scenario import ScenarioError, parse_run
from traces.bundled import bundled_path
from traces.errors import ConfigError
from traces.loaders import load as load_trace
from traces.transforms import TraceTransforms

#: Two minutes of the bundled Mooncake trace; each seed samples another 80 % of it.
TRACE = "bundled:mooncake-synthetic"
WINDOW = {"window_s": [0, 120]}
SAMPLED = {**WINDOW, "sample": 0.8}
CLUSTER = {"model": "llama-3.1-8b", "gpu": "h100", "instances": 4}
SLO = {"slo_ttft_ms": 1500, "slo_tpot_ms": 100}


@pytest.fixture(scope="module")
def comparison():
    return sim.compare(
        trace=TRACE,
        transforms=SAMPLED,
        policies=[
            "fcfs",
            "least_load",
            {"name": "laps", "label": "laps-eager", "params": {"graph_buckets": False}},
        ],
        loads=[1.0, 2.0],
        seeds=[0, 1],
        **CLUSTER,
        **SLO,
    )


def test_importing_sim_loads_no_simulator_libraries_until_the_api_is_used():
    code = (
        "import sys, sim\n"
        "heavy = [m for m in ('simpy', 'pandas', 'plotly') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert {'run', 'compare', 'load'} <= set(dir(sim))\n"
        "sim.run\n"
        "assert 'pandas' in sys.modules\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    with pytest.raises(AttributeError, match="no attribute 'rnu'"):
        sim.rnu  # noqa: B018


def test_run_gives_the_records_and_summary_of_the_same_run_as_simulate():
    result = sim.run(TRACE, "least_load", transforms=WINDOW, load=1.5, **CLUSTER, **SLO)
    spec = parse_run(
        {
            "trace": {"bundled": "mooncake-synthetic", "transforms": WINDOW},
            "cluster": CLUSTER,
            "policy": {"name": "least_load"},
            "slo": {"ttft_ms": 1500, "tpot_ms": 100},
            "load": 1.5,
        }
    )
    expected = prepare(spec).run()
    want = expected.summary(spec.slo.ttft_s, spec.slo.tpot_s)
    for key in ("n_requests", "ttft_p90_s", "tpot_p90_s", "slo_attainment", "goodput_rps"):
        assert result.summary[key] == pytest.approx(want[key]), key
    records = result.records
    assert len(records) == want["n_requests"] > 50
    frame = expected.frame()
    np.testing.assert_allclose(records["ttft_s"], frame["ttft_s"])
    assert list(frame.columns) == list(records.columns)  # the results.parquet schema, whole
    assert result.label == "least_load" and result.load == 1.5
    assert result.config["policy"] == "least_load" and result.config["instances"] == 4
    assert result.queue is not None and len(result.queue) > 0
    row = result.summary_frame()
    assert len(row) == 1 and row.loc[0, "ttft_p90_s"] == pytest.approx(want["ttft_p90_s"])


def test_run_accepts_a_trace_object_or_a_dataframe_with_the_figures_of_the_file():
    by_name = sim.run(TRACE, "fcfs", transforms=WINDOW, **CLUSTER, **SLO)
    trace = TraceTransforms(**WINDOW).apply(load_trace(bundled_path("mooncake-synthetic")))
    by_object = sim.run(trace, "fcfs", **CLUSTER, **SLO)
    by_frame = sim.run(trace.frame, "fcfs", **CLUSTER, **SLO)
    for other in (by_object, by_frame):
        assert other.summary["ttft_p90_s"] == by_name.summary["ttft_p90_s"]
        assert other.summary["slo_attainment"] == by_name.summary["slo_attainment"]
    assert "in-memory" in by_object.config["trace"]
    with pytest.raises(ConfigError, match="transforms apply to a trace the run loads"):
        sim.run(trace, "fcfs", transforms=WINDOW)


def test_run_names_the_key_of_a_bad_argument():
    with pytest.raises(ConfigError, match=r"sim\.run: cluster\.instances: Input should be greater"):
        sim.run(TRACE, "fcfs", instances=0)
    with pytest.raises(ConfigError, match=r"cluster\.limits\.max_runing_requests: unknown key"):
        sim.run(TRACE, "fcfs", max_runing_requests=8)
    with pytest.raises(ConfigError, match=r"policy\.name: unknown policy 'fcsf'"):
        sim.run(TRACE, "fcsf")
    with pytest.raises(ConfigError, match="expected a file, bundled:NAME"):
        sim.run(42, "fcfs")


def test_engine_limits_pass_through_under_sglang_names():
    tight = sim.run(TRACE, "fcfs", transforms=WINDOW, max_running_requests=2, **CLUSTER, **SLO)
    loose = sim.run(TRACE, "fcfs", transforms=WINDOW, **CLUSTER, **SLO)
    assert tight.config["limits"]["max_running_requests"] == 2
    assert tight.summary["ttft_p90_s"] > loose.summary["ttft_p90_s"]


def test_compare_takes_the_engine_and_its_limit_names_as_keywords():
    cmp = sim.compare(
        trace=TRACE,
        transforms=WINDOW,
        policies=["fcfs"],
        loads=[1.0],
        engine="vllm",
        max_num_seqs=4,
        block_size=32,
        **CLUSTER,
    )
    limits = cmp.point("fcfs", 1.0).config["limits"]
    assert (limits["engine"], limits["max_running_requests"], limits["block_tokens"]) == (
        "vllm",
        4,
        32,
    )
    with pytest.raises(ConfigError, match="use max_num_seqs"):
        sim.compare(trace=TRACE, policies=["fcfs"], engine="vllm", max_running_requests=4)


def test_compare_has_one_summary_row_per_policy_load_and_seed(comparison):
    s = comparison.summaries
    assert len(s) == 3 * 2 * 2
    assert list(s.columns[:3]) == ["label", "load", "seed"]
    assert list(dict.fromkeys(s["label"])) == ["fcfs", "least_load", "laps-eager"]
    assert s["ttft_p90_s"].dtype == np.float64 and s["ttft_p90_s"].notna().all()
    # Each seed samples other requests, so seeds give different figures.
    fcfs = s[(s["label"] == "fcfs") & (s["load"] == 2.0)]
    assert fcfs["ttft_p90_s"].nunique() == 2


def test_compare_mean_averages_each_figure_over_seeds(comparison):
    s, m = comparison.summaries, comparison.mean()
    assert len(m) == 3 * 2
    assert (m["n_seeds"] == 2).all()
    assert "seed" not in m.columns
    for _, row in m.iterrows():
        same = s[(s["label"] == row["label"]) & (s["load"] == row["load"])]
        for key in ("ttft_p90_s", "slo_attainment", "goodput_rps", "n_completed"):
            assert row[key] == pytest.approx(same[key].mean()), key


def test_compare_gives_each_points_records(comparison):
    p = comparison.point("laps-eager", 2.0, seed=1)
    assert (p.label, p.load, p.seed) == ("laps-eager", 2.0, 1)
    assert len(p.records) == p.summary["n_requests"]
    assert p.spec is not None and p.spec.policy.params == {"graph_buckets": False}
    with pytest.raises(KeyError, match="pass seed="):
        comparison.point("fcfs", 1.0)
    with pytest.raises(KeyError, match="points: fcfs@1/seed 0"):
        comparison.point("random", 1.0, 0)
    every = comparison.records()
    assert len(every) == comparison.summaries["n_requests"].sum()
    assert list(every.columns[:3]) == ["label", "load", "seed"]


def test_compare_reads_a_mapping_or_a_file_and_keywords_replace_their_keys(tmp_path):
    data = {
        "name": "t",
        "loads": [1.0, 2.0],
        "trace": {"bundled": "mooncake-synthetic", "transforms": WINDOW},
        "cluster": CLUSTER,
        "slo": {"ttft_ms": 1500},
        "policies": [{"name": "fcfs"}, {"name": "round_robin"}],
    }
    from_dict = sim.compare(data)
    path = tmp_path / "t.toml"
    path.write_text(
        'name = "t"\nloads = [1.0, 2.0]\n'
        '[trace]\nbundled = "mooncake-synthetic"\n[trace.transforms]\nwindow_s = [0, 120]\n'
        '[cluster]\nmodel = "llama-3.1-8b"\ngpu = "h100"\ninstances = 4\n'
        "[slo]\nttft_ms = 1500\n"
        '[[policies]]\nname = "fcfs"\n[[policies]]\nname = "round_robin"\n'
    )
    from_file = sim.compare(path)
    pd.testing.assert_frame_equal(from_dict.summaries, from_file.summaries)
    narrowed = sim.compare(path, loads=[2.0], instances=1, policies=["fcfs"])
    assert narrowed.summaries[["label", "load"]].values.tolist() == [["fcfs", 2.0]]
    assert narrowed.point("fcfs", 2.0).config["instances"] == 1
    inside = sim.compare(data, instances=1, cluster={**CLUSTER, "instances": 3}, loads=[2.0])
    assert inside.point("fcfs", 2.0).config["instances"] == 1
    one_instance = narrowed.point("fcfs", 2.0).summary["ttft_p90_s"]
    assert one_instance > from_file.point("fcfs", 2.0).summary["ttft_p90_s"]


def test_compare_names_a_bad_key_or_keyword():
    with pytest.raises(ConfigError, match=r"sim\.compare: loads: each load must be a positive"):
        sim.compare(trace=TRACE, policies=["fcfs"], loads=[0.0])
    with pytest.raises(ConfigError, match="unknown keyword 'lods'"):
        sim.compare(trace=TRACE, policies=["fcfs"], lods=[1.0])
    with pytest.raises(ConfigError, match=r"policies\[0\]\.name: unknown policy 'fcsf'"):
        sim.compare(trace=TRACE, policies=["fcsf"])
    trace = load_trace(bundled_path("mooncake-synthetic"))
    with pytest.raises(ConfigError, match="in-memory trace cannot be compared"):
        sim.compare(trace=trace, policies=["fcfs"])


def test_compare_with_out_keeps_the_sweep_and_reuses_it(tmp_path):
    out = tmp_path / "sweep"
    keys = dict(trace=TRACE, transforms=WINDOW, policies=["fcfs", "round_robin"], **CLUSTER, **SLO)
    seen = []
    first = sim.compare(out=out, on_point=seen.append, **keys)
    assert sorted(r.label for r in seen) == ["fcfs", "round_robin"]
    assert (out / "sweep.json").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("points/*/results.parquet")}
    assert len(stamps) == 2
    again = sim.compare(out=out, **keys)
    assert {p: p.stat().st_mtime_ns for p in out.glob("points/*/results.parquet")} == stamps
    pd.testing.assert_frame_equal(first.summaries, again.summaries)
    in_memory = sim.compare(**keys)
    pd.testing.assert_frame_equal(first.summaries, in_memory.summaries)


def test_load_reads_back_a_sweep_and_a_written_run(tmp_path, comparison):
    out = tmp_path / "sweep"
    keys = dict(trace=TRACE, transforms=WINDOW, policies=["fcfs", "least_load"], **CLUSTER, **SLO)
    sim.compare(out=out, loads=[1.0, 2.0], **keys)
    loaded = sim.load(out)
    assert isinstance(loaded, sim.Comparison)
    assert loaded.path == out
    assert len(loaded.summaries) == 4
    assert loaded.mean()["n_seeds"].tolist() == [1, 1, 1, 1]

    run = comparison.point("least_load", 2.0, seed=0)
    folder = run.write(tmp_path / "one")
    assert {"results.parquet", "summary.json", "queue.parquet"} <= {
        p.name for p in folder.iterdir()
    }
    assert json.loads((folder / "summary.json").read_text())["config"]["label"] == "least_load"
    back = sim.load(folder)
    assert isinstance(back, sim.RunResult)
    assert (back.label, back.load, back.seed) == ("least_load", 2.0, 0)
    assert back.summary == run.summary
    pd.testing.assert_frame_equal(back.records, run.records)


def test_load_recomputes_summaries_under_a_given_slo(tmp_path, comparison):
    folder = comparison.point("fcfs", 2.0, seed=0).write(tmp_path / "fcfs")
    as_run = sim.load(folder)
    tight = sim.load(folder, slo_ttft_ms=1)
    assert as_run.summary["slo_attainment"] > 0.5
    assert tight.summary["slo_attainment"] == 0.0
    assert tight.summary["ttft_p90_s"] == pytest.approx(as_run.summary["ttft_p90_s"])


def test_undefined_figures_are_none_in_the_summary_and_nan_in_the_frames():
    result = sim.run(TRACE, "fcfs", transforms=WINDOW, **CLUSTER)  # no SLO: no attainment
    assert result.summary["slo_attainment"] is None
    assert np.isnan(result.summary_frame().loc[0, "slo_attainment"])


def test_simulator_options_and_the_decode_choice_are_keywords_too():
    trace = {"generator": {"preset": "chat", "params": {"n_requests": 300, "rate_rps": 20}}}
    one = sim.run(
        trace,
        "fcfs",
        pd="1:2",
        decode_policy="round_robin",
        decode_choice="dispatch",
        prefix_knowledge="oracle",
        poll_interval_ms=50,
        max_running_requests=64,
    )
    assert one.config["prefix_knowledge"] == "oracle"
    assert one.config["poll_interval_ms"] == 50
    assert one.config["decode_choice"] == "dispatch"
    assert one.config["limits"]["max_running_requests"] == 64
    both = sim.compare(
        trace=trace,
        policies=["cache_aware"],
        instances=2,
        prefix_knowledge="oracle",
        batch_hints="group",
    )
    assert both.point("cache_aware", 1.0, seed=0).config["batch_hints"] == "group"


def test_run_takes_the_engine_and_its_limit_names():
    trace = load_trace(bundled_path("azure-code")).frame.head(40)
    one, eight = (
        sim.run(trace, "fcfs", model="llama-3.1-8b", gpu="h100", engine="vllm", max_num_seqs=n)
        for n in (1, 8)
    )
    assert one.summary["n_completed"] == eight.summary["n_completed"] == 40
    # One sequence at a time queues every request behind the one decoding.
    assert one.summary["queue_delay_mean_s"] > 2 * eight.summary["queue_delay_mean_s"]
    with pytest.raises(ScenarioError, match="use max_num_seqs"):
        sim.run(
            trace, "fcfs", model="llama-3.1-8b", gpu="h100", engine="vllm", max_running_requests=8
        )
