"""`llmsched compare` and `llmsched report` as a user runs them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from sim.cli import app
from traces.loaders import save
from traces.trace import Trace

runner = CliRunner()

SCENARIO = """
name = "cli"
loads = [1.0, 2.0]

[trace]
path = "t.parquet"

[cluster]
model = "llama-3.1-8b"
gpu = "h100"
instances = 2

[slo]
ttft_ms = 100

[[policies]]
name = "round_robin"

[[policies]]
name = "least_load"
"""


@pytest.fixture
def scenario(tmp_path: Path) -> Path:
    n = 50
    frame = pd.DataFrame(
        {
            "arrival_s": np.arange(n) * 0.3,
            "prompt_tokens": [80 + 113 * (i % 7) for i in range(n)],
            "output_tokens": [6 + (i % 5) for i in range(n)],
        }
    )
    save(Trace(frame, name="t"), tmp_path / "t.parquet")
    path = tmp_path / "cli.toml"
    path.write_text(SCENARIO)
    return path


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    return " ".join(text.split())


def test_compare_writes_the_report_and_reuses_finished_points(scenario, tmp_path):
    out = tmp_path / "out"
    first = invoke("compare", scenario, "--out", out, "--jobs", "1")
    assert first.exit_code == 0, first.output
    assert "Ran 4 point(s), 0 from the cache" in flat(first.output)
    assert "report.html" in first.output and "round_robin" in first.output
    for name in ("report.html", "summary.csv", "summary.md", "scenario.toml", "sweep.json"):
        assert (out / name).is_file(), name
    assert len(list(out.glob("points/*/results.parquet"))) == 4
    assert len(pd.read_csv(out / "summary.csv")) == 4
    again = invoke("compare", scenario, "--out", out, "--jobs", "1")
    assert again.exit_code == 0, again.output
    assert "Ran 0 point(s), 4 from the cache" in flat(again.output)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("instances = 2", "instances = 0", "cluster.instances: Input should be greater than 0"),
        ("instances = 2", "instancs = 2", "cluster.instancs: unknown key"),
        ('name = "least_load"', 'name = "lifo"', "policies[1].name: unknown policy 'lifo'"),
        ('path = "t.parquet"', 'path = "t.csv"', "trace.path: no such file"),
    ],
)
def test_a_broken_scenario_exits_with_the_key_and_the_problem(
    scenario, tmp_path, old, new, message
):
    scenario.write_text(SCENARIO.replace(old, new))
    result = invoke("compare", scenario, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert message in flat(result.output)
    assert "cli.toml" in result.output and "Traceback" not in result.output


def test_an_unknown_executor_is_refused(scenario, tmp_path):
    result = invoke("compare", scenario, "--out", tmp_path / "o", "--executor", "slurm")
    assert result.exit_code == 2
    assert "expected 'local' or 'ray'; got 'slurm'" in flat(result.output)


def test_report_puts_runs_from_several_folders_side_by_side(scenario, tmp_path):
    trace = scenario.parent / "t.parquet"
    for policy in ("round_robin", "least_load"):
        done = invoke(
            "simulate", "--trace", trace, "--out", tmp_path / "runs" / policy, "--policy", policy,
            "--instances", "2", "--model", "llama-3.1-8b", "--gpu", "h100", "-q",
        )  # fmt: skip
        assert done.exit_code == 0, done.output
    result = invoke("report", tmp_path / "runs", "--out", tmp_path / "rep", "--slo-ttft-ms", "80")
    assert result.exit_code == 0, result.output
    runs = pd.read_csv(tmp_path / "rep" / "summary.csv")
    assert sorted(runs["label"]) == ["least_load", "round_robin"]
    assert (runs["slo_ttft_s"] == 0.08).all()
    assert (tmp_path / "rep" / "report.html").stat().st_size > 1_000_000


def test_report_of_a_folder_without_records_is_an_error(tmp_path):
    (tmp_path / "nothing").mkdir()
    result = invoke("report", tmp_path / "nothing", "--out", tmp_path / "rep")
    assert result.exit_code == 2
    assert "nothing: no result records" in flat(result.output)


def test_flags_override_the_scenarios_cluster_and_reach_every_point(scenario, tmp_path):
    import json

    scenario.write_text(SCENARIO.replace("instances = 2", 'instances = 2\nbatch_hints = "group"'))
    out = tmp_path / "out"
    args = ("compare", scenario, "--out", out, "--jobs", "1", "-q")
    result = invoke(*args, "--cuda-graph-max-bs", "8", "--prefix-knowledge", "oracle")
    assert result.exit_code == 0, result.output
    configs = [json.loads(p.read_text())["config"] for p in out.glob("points/*/summary.json")]
    assert len(configs) == 4
    for config in configs:
        assert config["limits"]["cuda_graph_max_bs"] == 8
        assert config["prefix_knowledge"] == "oracle"
        assert config["batch_hints"] == "group"  # the scenario's own key stands
    # A different flag is a different point: nothing is taken from the cache.
    again = invoke(*args[:-1], "--cuda-graph-max-bs", "16")
    assert again.exit_code == 0, again.output
    assert "Ran 4 point(s), 0 from the cache" in flat(again.output)
    bad = invoke(*args, "--max-running-requests", "0")
    assert bad.exit_code == 2
    assert "--max-running-requests: expected an integer >= 1" in flat(bad.output)
    assert "limits." not in bad.output  # the flag as typed, not the scenario key


def test_the_terminal_headline_keeps_labels_in_brackets(scenario, tmp_path):
    # Two runs of one policy from different sources are labelled "fcfs [folder]": rich must
    # not read the brackets as markup and print both rows as a bare "fcfs".
    trace = scenario.parent / "t.parquet"
    for name in ("live", "sim"):
        done = invoke(
            "simulate", "--trace", trace, "--out", tmp_path / "runs" / name, "--policy", "fcfs",
            "--model", "llama-3.1-8b", "--gpu", "h100", "-q",
        )  # fmt: skip
        assert done.exit_code == 0, done.output
    live = tmp_path / "runs" / "live" / "run.json"
    live.write_text(live.read_text().replace('"source": "simulator"', '"source": "replay"'))
    result = invoke(
        "report", tmp_path / "runs" / "live", tmp_path / "runs" / "sim", "--out", tmp_path / "rep"
    )
    assert result.exit_code == 0, result.output
    labels = set(pd.read_csv(tmp_path / "rep" / "summary.csv")["label"])
    assert len(labels) == 2
    for label in labels:
        assert label in result.output


@pytest.mark.parametrize("inside", [False, True])
def test_an_out_path_that_is_a_file_is_refused_by_flag(scenario, tmp_path, inside):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    out = taken / "sub" if inside else taken
    result = invoke("compare", scenario, "--out", out)
    assert result.exit_code == 2
    assert f"--out {out}:" in flat(result.output) and "is a file" in flat(result.output)
    assert "Traceback" not in result.output
    assert taken.read_text() == "not a folder"


def test_ray_address_auto_with_no_cluster_running_is_one_clear_error(
    scenario, tmp_path, monkeypatch
):
    pytest.importorskip("ray", reason="ray is in the dev extra (llmsched[ray])")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "no-ray-here"))  # no cluster file to find
    result = invoke(
        "compare", scenario, "--out", tmp_path / "o", "--executor", "ray", "--address", "auto"
    )
    assert result.exit_code == 2, result.output
    assert "--address auto: found no running Ray cluster" in flat(result.output)
    assert "Traceback" not in result.output
