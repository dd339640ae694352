"""Reports: records read from any folder, the headline and its marks, the files written."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest

from scheduler.registry import create
from sim.loop import simulate
from sim.report import ReportOptions, load_sources, write_report
from sim.report.records import RunRecords, summary_from_frame
from sim.report.series import occupancy, short_long
from sim.report.tables import best_marks, headline, markdown
from sim.scenario import parse_scenario
from sim.sweep import LocalExecutor, run_sweep
from tests.unit.sim.fakes import AffineCost, make_limits, make_trace
from traces.errors import ConfigError
from traces.loaders import save
from traces.trace import Trace

PLOTS = ("ttft-cdf", "p90-ttft", "slo-attainment", "goodput", "timeline", "short-long")


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    n = 80
    frame = pd.DataFrame(
        {
            "arrival_s": np.arange(n) * 0.2,
            "prompt_tokens": [60 + 131 * (i % 13) for i in range(n)],
            "output_tokens": [8 + (i % 9) for i in range(n)],
        }
    )
    save(Trace(frame, name="t"), tmp / "t.parquet")
    scenario = parse_scenario(
        {
            "name": "tiny comparison",
            "loads": [1.0, 3.0],
            "seeds": [0, 1],
            "trace": {"path": str(tmp / "t.parquet")},
            "cluster": {"model": "llama-3.1-8b", "gpu": "h100", "instances": 2},
            "slo": {"ttft_ms": 150, "tpot_ms": 50},
            "policies": [{"name": "round_robin"}, {"name": "random"}],
            "report": {"short_prompt_tokens": 500},
        }
    )
    out = tmp / "out"
    run_sweep(scenario, out, LocalExecutor(1))
    return out


def write_run(path, frame, summary=None):
    path.mkdir(parents=True)
    frame.to_parquet(path / "results.parquet", index=False)
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def measured_frame():
    """Records as a replay against a live server might write them: no llmsched extras."""
    return pd.DataFrame(
        {
            "arrival_s": [0.0, 0.5, 1.0, 1.5],
            "first_token_s": [0.1, 0.9, 1.2, np.nan],
            "finish_s": [1.1, 1.9, 2.2, np.nan],
            "prompt_tokens": [100, 900, 120, 50],
            "output_tokens": [11, 11, 6, 0],
        }
    )


def test_summary_from_records_matches_the_simulators():
    trace = make_trace([0.0, 0.0, 0.5, 3.0], [100, 2000, 50, 700], [1, 101, 11, 40])
    res = simulate(trace, AffineCost(), create("fcfs"), make_limits(max_running_requests=2))
    want = res.summary(0.4, 0.01)
    got = summary_from_frame(res.frame(), 0.4, 0.01)
    for key in ("ttft_p90_s", "tpot_mean_s", "e2e_p99_s", "slo_attainment", "goodput_rps"):
        assert got[key] == pytest.approx(want[key]), key
    assert (got["n_completed"], got["throughput_rps"]) == (4, pytest.approx(want["throughput_rps"]))


def test_measured_records_with_only_the_required_columns_are_reported(tmp_path):
    run = write_run(tmp_path / "live-fcfs", measured_frame())
    sources = load_sources([run], slo_ttft_s=0.2)
    (rec,) = sources.runs
    assert rec.label == "live-fcfs" and rec.load == 1.0
    s = rec.summary
    assert (s["n_completed"], s["n_failed"]) == (3, 1)
    assert s["ttft_p50_s"] == pytest.approx(0.2)
    assert s["slo_attainment"] == pytest.approx(2 / 3)
    paths = write_report([run], tmp_path / "report")
    page = paths.html.read_text()
    assert all(f'id="plot-{p}"' in page for p in PLOTS)
    assert "KV-cache" not in page  # no queue log for a measured run


def test_bad_folders_are_named(tmp_path):
    bad = write_run(tmp_path / "bad", measured_frame().drop(columns=["first_token_s"]))
    with pytest.raises(
        ConfigError, match=r"bad/results\.parquet: missing column\(s\) first_token_s"
    ):
        load_sources([bad])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty: no result records"):
        load_sources([tmp_path / "empty"])


def test_one_policy_from_two_folders_keeps_two_labels(tmp_path):
    summary = {"policy": "fcfs", "config": {"policy": "fcfs"}}
    a = write_run(tmp_path / "sim" / "fcfs", measured_frame(), summary)
    b = write_run(tmp_path / "live" / "fcfs", measured_frame(), summary)
    labels = [r.label for r in load_sources([a.parent, b.parent]).runs]
    assert labels == ["fcfs [sim]", "fcfs [live]"]


def run_records(label, load, seed, **summary):
    frame = measured_frame()
    return RunRecords(label, load, seed, "x", None, frame, summary)  # type: ignore[arg-type]


def test_headline_averages_seeds_and_marks_the_best_at_each_load():
    runs = [
        run_records("a", 1.0, 0, ttft_p90_s=1.0, goodput_rps=2.0, slo_attainment=0.5),
        run_records("a", 1.0, 1, ttft_p90_s=3.0, goodput_rps=2.0, slo_attainment=0.7),
        run_records("b", 1.0, 0, ttft_p90_s=2.5, goodput_rps=3.0, slo_attainment=0.6),
        run_records("a", 2.0, 0, ttft_p90_s=9.0, goodput_rps=1.0, slo_attainment=0.1),
    ]
    table = headline(runs)
    assert table[["label", "load"]].values.tolist() == [["a", 1.0], ["b", 1.0], ["a", 2.0]]
    assert table.loc[0, "ttft_p90_s"] == pytest.approx(2.0)
    assert table.loc[0, "n_seeds"] == 2
    marks = best_marks(table)
    assert marks.loc[0, "ttft_p90_s"] and not marks.loc[1, "ttft_p90_s"]  # lower wins
    assert marks.loc[1, "goodput_rps"] and not marks.loc[0, "goodput_rps"]  # higher wins
    assert marks.loc[0, "slo_attainment"] and marks.loc[1, "slo_attainment"]  # 60% each: a tie
    assert not marks.loc[2].any()  # one policy alone at its load: nothing to mark
    assert math.isnan(table.loc[0, "e2e_p99_s"]) and not marks["e2e_p99_s"].any()
    md = markdown(table, marks)
    assert "| a | 1 |" in md and "**2,000**" in md and "| b | 1 |" in md


def test_a_sweep_report_is_one_offline_page_with_every_plot(sweep_dir, tmp_path):
    paths = write_report([sweep_dir], tmp_path / "r", ReportOptions(command="llmsched compare x"))
    page = paths.html.read_text()
    library = re.findall(r"<script>/\*\*\s*\* plotly\.js v[\d.]+.*?</script>", page, re.S)
    assert len(library) == 1  # plotly.js inline, once
    assert len(library[0]) > 1_000_000
    rest = page.replace(library[0], "")
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=", page)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", rest)  # nothing fetched
    for p in PLOTS:
        assert page.count(f'id="plot-{p}"') == 1
    assert 'id="plot-batches"' not in page  # no graph-bucket policy here
    assert "tiny comparison" in page and "llmsched compare x" in page
    assert "at most 500 uncached prompt tokens" in page  # the scenario's report option
    runs = pd.read_csv(paths.csv)
    assert len(runs) == 8
    assert set(runs["label"]) == {"round_robin", "random"}
    assert {"seed", "offered_rps", "ttft_p90_s", "slo_attainment", "goodput_rps"} <= set(runs)
    marked = paths.markdown.read_text()
    assert marked.count("\n") == 2 + 4 and "**" in marked


def test_graph_steps_bring_the_batch_plot(sweep_dir, tmp_path):
    run = write_run(tmp_path / "graphs", measured_frame(), {"config": {"policy": "laps"}})
    batches = pd.DataFrame(
        {
            "n_prefill": [4, 8, 3, 1],
            "shape_tokens": [1024, 2048, 1024, 600],
            "padding_tokens": [100, 0, 250, 0],
            "cuda_graph": [True, True, True, False],
        }
    )
    batches.to_parquet(run / "batches.parquet")
    page = write_report([run], tmp_path / "r").html.read_text()
    assert 'id="plot-batches"' in page


def test_occupancy_counts_queued_and_in_flight_requests():
    frame = pd.DataFrame(
        {
            "arrival_s": [0.0, 0.0, 1.0],
            "prefill_start_s": [0.5, 1.5, 1.5],
            "first_token_s": [0.6, 1.6, 1.6],
            "finish_s": [2.0, 3.0, 4.0],
        }
    )
    t, queued, in_flight = occupancy(frame, bins=4)
    assert t.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert queued.tolist() == [2, 2, 0, 0]
    assert in_flight.tolist() == [1, 3, 2, 1]


def test_short_and_long_count_uncached_prompt_tokens():
    frame = pd.DataFrame(
        {
            "arrival_s": [0.0, 0.0, 0.0],
            "first_token_s": [0.1, 0.2, 0.3],
            "finish_s": [1.0, 1.0, 1.0],
            "prompt_tokens": [1000, 1000, 200],
            "cached_tokens": [900, 0, 0],
            "output_tokens": [5, 5, 5],
        }
    )
    split = short_long(frame, 256)
    assert split["short"].tolist() == pytest.approx([100.0, 300.0])
    assert split["long"].tolist() == pytest.approx([200.0])
