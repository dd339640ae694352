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
from sim.report.plots import build_plots
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
    lead, table = marked.split("\n\n")
    assert lead == paths.takeaway and lead.startswith("On SLO attainment, ")
    assert table.count("\n") == 2 + 4 and "**" in table
    assert f'<p class="takeaway" id="takeaway">{paths.takeaway}</p>' in page
    # At a glance: the verdict first, then the latency quantiles; every figure below.
    head = re.search(r'<table id="headline-table">.*?</thead>', page, re.S).group(0)
    groups = re.findall(r'<th class="g" colspan="\d">([^<]+)</th>', head)
    assert groups == ["SLO", "goodput", "throughput", "TTFT (ms)", "TPOT (ms)", "E2E (s)"]
    assert len(re.findall(r"<th[ >]", head)) == 3 + 6 + 10 and "mean" not in head
    full = re.search(r'<table id="full-table">.*?</thead>', page, re.S).group(0)
    assert full.count(">mean<") == 3 and full.count(">p99<") == 3


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


def test_the_reproduce_block_names_the_records_command_and_git_commit(sweep_dir, tmp_path):
    from sim.sweep import git_commit

    commit = json.loads((sweep_dir / "sweep.json").read_text())["git_commit"]
    assert commit == git_commit()
    page = write_report([sweep_dir], tmp_path / "r").html.read_text()
    scenario = sweep_dir / "scenario.toml"
    if commit:  # a checkout: the commit, and whether it had uncommitted edits
        assert f"git {commit}" in page
        assert ("(uncommitted edits)" in page) == commit.endswith("-dirty")
    assert f"llmsched compare {scenario} --out {sweep_dir}" in page or not scenario.exists()


def test_git_commit_is_the_checkouts_head_with_a_dirty_flag(tmp_path):
    import subprocess

    from sim.sweep import git_commit

    def git(*args):
        out = subprocess.run(
            ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        return out.stdout.strip()

    git("init", "-q")
    (tmp_path / "sim").mkdir()
    (tmp_path / "sim" / "a.py").write_text("x = 1\n")
    git("add", "sim/a.py")
    git("commit", "-q", "-m", "one")
    head = git("rev-parse", "--short=12", "HEAD")
    assert git_commit.__wrapped__(tmp_path) == head
    (tmp_path / "sim" / "a.py").write_text("x = 2\n")
    assert git_commit.__wrapped__(tmp_path) == head + "-dirty"
    assert git_commit.__wrapped__(tmp_path / "sim") is None  # not the checkout's top
    assert git_commit.__wrapped__(tmp_path.parent) is None  # no checkout at all


def test_bands_show_as_ranges_and_shaded_areas():
    from sim.report.build import build_report
    from sim.report.records import Sources

    band = {"ttft_p90_s_lo": 0.8, "ttft_p90_s_hi": 1.4, "slo_attainment_lo": 0.7}
    runs = [
        run_records("a", 1.0, 0, ttft_p90_s=1.0, slo_attainment=0.6, **band),
        run_records("b", 1.0, 0, ttft_p90_s=2.0, slo_attainment=0.5),
        run_records(
            "a", 2.0, 0, ttft_p90_s=3.0, slo_attainment=0.4, ttft_p90_s_lo=3.5, ttft_p90_s_hi=2.5
        ),
    ]
    parts = build_report(Sources(runs))
    page = parts["html"]
    head = re.search(r'<table id="headline-table">.*?</table>', page, re.S).group(0)
    # The p90 TTFT of a, ms, with its band beneath (lower bound first, whichever run gave it).
    assert '1,000<span class="band">800–<wbr>1.4k</span>' in head
    assert '3,000<span class="band">2.5k–<wbr>3.5k</span>' in head
    assert head.count('class="band"') == 2  # half a band (no _hi) is no band
    table = parts["table"]
    plots = build_plots(runs, table, load=1.0, seed=0, short_prompt_tokens=256, slo_ttft_ms=None)
    p90 = next(p for p in plots if p.id == "p90-ttft").figure
    shaded = [t for t in p90.data if t.fill == "toself"]
    assert [t.name for t in shaded] == ["a band"]
    assert list(shaded[0].y) == [1400.0, 3500.0, 2500.0, 800.0]  # upper out, lower back


def test_a_band_whose_ends_both_fall_below_its_figure_still_spans_the_figure():
    from sim.report.build import build_report
    from sim.report.records import Sources
    from sim.report.tables import markdown

    # Near saturation a tail quantile can fall with step costs scaled either way.
    runs = [run_records("a", 1.0, 0, ttft_p90_s=3.0, ttft_p90_s_lo=2.5, ttft_p90_s_hi=2.8)]
    parts = build_report(Sources(runs))
    assert '3,000<span class="band">2.5k–<wbr>3k</span>' in parts["html"]
    assert "3,000 (2,500–3,000)" in markdown(parts["table"], parts["marks"])
    plots = build_plots(runs, parts["table"], load=1.0, seed=0, short_prompt_tokens=256,
                        slo_ttft_ms=None)  # fmt: skip
    p90 = next(p for p in plots if p.id == "p90-ttft").figure
    (shaded,) = [t for t in p90.data if t.fill == "toself"]
    assert list(shaded.y) == [3000.0, 2500.0]  # upper out, lower back


def test_log_axes_label_decades_and_a_narrow_span_gets_2s_and_5s():
    from sim.report.plots import log_ticks_ms

    wide = log_ticks_ms([15.0, 3_000.0, 80_000.0])
    assert wide["ticktext"] == ["10 ms", "100 ms", "1 s", "10 s", "100 s"]
    narrow = log_ticks_ms([1_800.0, 2_600.0, 9_000.0])
    assert narrow["ticktext"] == ["2 s", "5 s", "10 s"]
    two_decades = log_ticks_ms([1_400.0, 166_000.0])
    assert two_decades["ticktext"] == ["1 s", "2 s", "5 s", "10 s", "20 s", "50 s", "100 s",
                                       "200 s"]  # fmt: skip
    assert log_ticks_ms([0.0, float("nan")]) == {}


def test_short_requests_show_beside_long_ones_and_goodput_starts_at_zero():
    short = run_records("a", 1.0, 0, goodput_rps=1.5, slo_attainment=0.5)
    plots = {
        p.id: p.figure
        for p in build_plots(
            [short], headline([short]), load=1.0, seed=0, short_prompt_tokens=500, slo_ttft_ms=None
        )
    }
    split = plots["short-long"].layout
    assert split.yaxis.type == "log" and split.yaxis2.type == "log"
    assert split.yaxis.range == split.yaxis2.range  # one scale: the panels compare
    # measured_frame: short TTFTs of 100 and 200 ms, a long one of 400 ms, all in range.
    low, high = split.yaxis.range
    assert 10**low < 100 and 10**high > 400
    goodput = plots["goodput"]
    offered = next(t for t in goodput.data if t.name == "offered")
    assert goodput.layout.yaxis.range[0] == 0
    assert goodput.layout.yaxis.range[1] >= max(offered.y)  # the offered line stays inside
    kv_free = plots["timeline"].layout
    assert kv_free.yaxis.title.text == "requests" and kv_free.yaxis2.title.text == "requests"


def test_no_figure_sits_alone_in_a_half_row():
    from sim.report.html import _wide
    from sim.report.plots import Plot

    def plots(*ids):
        return [Plot(i, i, "", None) for i in ids]  # type: ignore[arg-type]

    ids = ("ttft-cdf", "p90-ttft", "slo-attainment", "goodput", "short-long", "timeline")
    assert _wide(plots(*ids)) == [True, False, False, False, False, True]
    assert _wide(plots(*ids, "batches")) == [True, False, False, False, False, True, True]
    assert _wide(plots("ttft-cdf", "p90-ttft", "goodput", "timeline")) == [
        True, False, False, True]  # fmt: skip
    assert _wide(plots("ttft-cdf", "p90-ttft", "timeline")) == [True, True, True]


def test_summary_csv_names_utilization_as_the_share_of_time_running_steps(tmp_path):
    summary = summary_from_frame(measured_frame(), 1.0, None) | {"utilization": [1.0, 0.5]}
    run = write_run(tmp_path / "run", measured_frame(), summary)
    rows = pd.read_csv(write_report([run], tmp_path / "r").csv)
    assert rows["share_of_time_running_steps"].tolist() == [0.75]
    assert not [c for c in rows.columns if "utilization" in c]


def test_bands_reach_the_markdown_and_survive_an_slo_override_where_no_slo_moves_them(
    tmp_path,
):
    summary = summary_from_frame(measured_frame(), 1.0, None) | {
        "ttft_p90_s_lo": 0.3,
        "ttft_p90_s_hi": 0.9,
        "slo_attainment_lo": 1.0,
        "slo_attainment_hi": 0.4,
        "band_cost_scale_lo": 0.95,
        "band_cost_scale_hi": 1.05,
    }
    a = write_run(tmp_path / "a", measured_frame(), summary | {"config": {"policy": "a"}})
    paths = write_report([a], tmp_path / "r")
    md = paths.markdown.read_text()
    assert "(300–900)" in md and "(40.0–100.0)" in md
    assert "every step cost scaled ×0.95 and ×1.05" in paths.html.read_text()
    # An SLO of the report's own: SLO attainment's band no longer applies; latency's does.
    (kept,) = load_sources([a], slo_ttft_s=0.25).runs
    assert kept.summary["ttft_p90_s_lo"] == 0.3 and kept.summary["band_cost_scale_hi"] == 1.05
    assert "slo_attainment_lo" not in kept.summary
