"""Long runs print progress lines where a progress bar cannot draw (a log, a pipe)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from sim.cli import app
from sim.cli._common import ProgressLines
from traces.loaders import save
from traces.trace import Trace

runner = CliRunner()  # its output is not a terminal, as in CI


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    n = 60
    frame = pd.DataFrame(
        {
            "arrival_s": np.arange(n) * 0.5,
            "prompt_tokens": [100 + 10 * (i % 7) for i in range(n)],
            "output_tokens": [4] * n,
        }
    )
    path = tmp_path / "t.parquet"
    save(Trace(frame, name="t"), path)
    return path


def test_simulate_and_compare_print_progress_lines_off_a_terminal(trace, tmp_path, monkeypatch):
    monkeypatch.setattr(ProgressLines, "EVERY_S", 0.0)  # a line at every update
    one = runner.invoke(app, ["simulate", "--trace", str(trace), "--out", str(tmp_path / "s")])
    assert one.exit_code == 0, one.output
    assert "simulated requests 60/60 (100%) after" in one.output
    scenario = tmp_path / "s.toml"
    scenario.write_text(
        'name = "s"\nloads = [1.0, 2.0]\n[trace]\npath = "t.parquet"\n[[policies]]\nname = "fcfs"\n'
    )
    sweep = runner.invoke(app, ["compare", str(scenario), "--out", str(tmp_path / "c"), "-j", "1"])
    assert sweep.exit_code == 0, sweep.output
    assert "points 1/2 (50%) after" in sweep.output and "points 2/2 (100%) after" in sweep.output


def test_a_short_run_prints_no_progress_lines(trace, tmp_path):
    one = runner.invoke(app, ["simulate", "--trace", str(trace), "--out", str(tmp_path / "s")])
    assert one.exit_code == 0, one.output
    assert "simulated requests" not in one.output
