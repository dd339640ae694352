"""The figures a run prints are named for what they measure."""

from __future__ import annotations

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from sim.cli import app
from traces.loaders import save
from traces.trace import Trace


def test_simulate_calls_busy_time_the_share_of_time_running_steps(tmp_path):
    # Light load: a few ms of TTFT, yet an instance can be busy most of the time.
    n = 30
    frame = pd.DataFrame(
        {
            "arrival_s": np.arange(n) * 0.5,
            "prompt_tokens": [200] * n,
            "output_tokens": [20] * n,
        }
    )
    save(Trace(frame, name="t"), tmp_path / "t.parquet")
    args = ["simulate", "--trace", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, [*args, "--model", "llama-3.1-8b", "--gpu", "h100"])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if "time running steps" in x)
    assert line.rstrip().endswith("(mean of instances)"), line
    assert "utilization" not in result.output
