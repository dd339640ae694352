"""Sweeps: every point written once, the cache skipping finished points, executors agreeing."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import sim.sweep as sweep
from sim.scenario import ScenarioError, parse_scenario
from sim.sweep import LocalExecutor, make_executor, points_of, run_sweep
from traces.errors import ConfigError
from traces.loaders import save
from traces.trace import Trace


@pytest.fixture
def scenario_data(tmp_path):
    n = 60
    frame = pd.DataFrame(
        {
            "arrival_s": np.arange(n) * 0.25,
            "prompt_tokens": [100 + 97 * (i % 11) for i in range(n)],
            "output_tokens": [10 + (i % 7) for i in range(n)],
        }
    )
    save(Trace(frame, name="t"), tmp_path / "t.parquet")
    return {
        "loads": [1.0, 2.0],
        "trace": {"path": str(tmp_path / "t.parquet")},
        "cluster": {"model": "llama-3.1-8b", "gpu": "h100", "instances": 2},
        "slo": {"ttft_ms": 200},
        "policies": [{"name": "round_robin"}, {"name": "power_of_two", "label": "p2c"}],
    }


def stamps(out):
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("points/*/results.parquet")}


def test_each_point_writes_its_result_records(tmp_path, scenario_data):
    out = tmp_path / "out"
    result = run_sweep(parse_scenario(scenario_data), out, LocalExecutor(1))
    assert (result.ran, result.cached) == (4, 0)
    names = sorted(p.name for p in result.point_dirs)
    assert names == [
        "p2c__load1__seed0",
        "p2c__load2__seed0",
        "round_robin__load1__seed0",
        "round_robin__load2__seed0",
    ]
    for d in result.point_dirs:
        assert {"results.parquet", "summary.json", "queue.parquet", "point.json"} <= {
            p.name for p in d.iterdir()
        }
    summary = json.loads((out / "points" / "p2c__load2__seed0" / "summary.json").read_text())
    assert summary["n_requests"] == 60 and summary["slo_ttft_s"] == 0.2
    assert (summary["config"]["label"], summary["config"]["load"]) == ("p2c", 2.0)
    meta = json.loads((out / "sweep.json").read_text())
    assert meta["points"] == [p.id for p in points_of(parse_scenario(scenario_data))]
    assert set(meta["versions"]) >= {"llmsched", "python", "numpy", "pandas", "simpy"}


def test_a_rerun_skips_finished_points(tmp_path, scenario_data):
    out = tmp_path / "out"
    run_sweep(parse_scenario(scenario_data), out, LocalExecutor(1))
    before = stamps(out)
    seen = []
    again = run_sweep(
        parse_scenario(scenario_data),
        out,
        LocalExecutor(1),
        on_point=lambda p, cached: seen.append(cached),
    )
    assert (again.ran, again.cached) == (0, 4)
    assert seen == [True] * 4
    assert stamps(out) == before


def test_a_changed_point_reruns_and_only_it(tmp_path, scenario_data):
    out = tmp_path / "out"
    run_sweep(parse_scenario(scenario_data), out, LocalExecutor(1))
    before = stamps(out)
    scenario_data["policies"][1]["params"] = {"seed": 11}
    again = run_sweep(parse_scenario(scenario_data), out, LocalExecutor(1))
    assert (again.ran, again.cached) == (2, 2)
    after = stamps(out)
    changed = sorted(k for k in before if after[k] != before[k])
    assert changed == ["p2c__load1__seed0", "p2c__load2__seed0"]


def test_an_unfinished_point_and_force(tmp_path, scenario_data):
    out = tmp_path / "out"
    run_sweep(parse_scenario(scenario_data), out, LocalExecutor(1))
    (out / "points" / "p2c__load1__seed0" / "point.json").unlink()  # as if killed mid-write
    (out / "points" / ".p2c__load2__seed0.tmp").mkdir()  # a leftover temporary folder
    again = run_sweep(parse_scenario(scenario_data), out, LocalExecutor(1))
    assert (again.ran, again.cached) == (1, 3)
    forced = run_sweep(parse_scenario(scenario_data), out, LocalExecutor(1), force=True)
    assert (forced.ran, forced.cached) == (4, 0)


def test_processes_give_the_same_results_as_one_process(tmp_path, scenario_data):
    scenario = parse_scenario(scenario_data)
    run_sweep(scenario, tmp_path / "one", LocalExecutor(1))
    run_sweep(scenario, tmp_path / "two", LocalExecutor(2))
    for point in points_of(scenario):
        a = json.loads((tmp_path / "one" / "points" / point.id / "summary.json").read_text())
        b = json.loads((tmp_path / "two" / "points" / point.id / "summary.json").read_text())
        for timing in ("wall_s", "cpu_s"):
            a["config"].pop(timing), b["config"].pop(timing)
        assert a == b
        frames = [
            pd.read_parquet(tmp_path / d / "points" / point.id / "results.parquet")
            for d in ("one", "two")
        ]
        pd.testing.assert_frame_equal(*frames)


def test_an_unregistered_policy_stops_the_sweep_before_it_starts(tmp_path, scenario_data):
    scenario_data["policies"].append({"name": "lifo"})
    with pytest.raises(ScenarioError, match=r"policies\[2\]\.name: unknown policy 'lifo'"):
        run_sweep(parse_scenario(scenario_data), tmp_path / "out", LocalExecutor(1))
    assert not (tmp_path / "out").exists()


def test_a_failing_point_is_named(tmp_path, scenario_data, monkeypatch):
    def broken(spec, trace=None):
        raise KeyError(42)

    monkeypatch.setattr(sweep, "execute", broken)
    with pytest.raises(RuntimeError, match=r"point round_robin__load1__seed0 failed: KeyError"):
        run_sweep(parse_scenario(scenario_data), tmp_path / "out", LocalExecutor(1))


def test_executor_choices_are_checked():
    with pytest.raises(ConfigError, match="expected 'local' or 'ray'; got 'slurm'"):
        make_executor("slurm")
    with pytest.raises(ConfigError, match="--address applies to --executor ray only"):
        make_executor("local", address="auto")
    with pytest.raises(ConfigError, match="jobs: expected an integer >= 1"):
        LocalExecutor(0)


def _source_tree(tmp_path):
    """A copy of the project's packages (sources only), to edit without touching the real ones."""
    import shutil
    from pathlib import Path

    root = Path(sweep.__file__).resolve().parents[1]
    for package in ("traces", "scheduler", "sim"):
        shutil.copytree(
            root / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "data")
        )
    return tmp_path


def test_the_code_version_covers_only_the_code_a_simulation_runs(tmp_path):
    root = _source_tree(tmp_path)
    version = sweep.code_version.__wrapped__  # uncached: the files change below
    before = version(root)
    modules = sweep.simulation_modules(root)
    # What a point runs: the runner, the loop and engine, every built-in policy, the trace loaders.
    for name in (
        "sim.runner",
        "sim.loop",
        "sim.engine",
        "scheduler.policies.laps",
        "traces.loaders",
    ):
        assert name in modules
    # What it does not: the command line, reports, the offline fitter.
    assert not [m for m in modules if m.startswith(("sim.cli", "sim.report"))]
    assert "scheduler.calibration" not in modules

    # Editing a command, a report or a new server module keeps finished points.
    (root / "sim" / "cli" / "simulate.py").write_text("# edited\n", encoding="utf-8")
    with open(root / "sim" / "report" / "__init__.py", "a") as f:
        f.write("\n# edited\n")
    (root / "sim" / "emulator").mkdir(exist_ok=True)  # the real package is copied too
    (root / "sim" / "emulator" / "server.py").write_text("import sim.loop\n")
    assert version(root) == before
    # Editing the engine, or a policy the registry loads by name, invalidates them.
    engine = root / "sim" / "engine.py"
    engine.write_text(engine.read_text() + "\n# edited\n")
    assert version(root) != before
    after_engine = version(root)
    policy = root / "scheduler" / "policies" / "round_robin.py"
    policy.write_text(policy.read_text() + "\n# edited\n")
    assert version(root) != after_engine
