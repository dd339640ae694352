"""``simulate`` and ``compare`` say when a run measures itself rather than the policy.

Past capacity the queue grows for as long as requests arrive; requests that
cannot fit the KV cache are rejected; a flag another flag overrides does
nothing. Each must be said on screen, not left for the user to infer from a
mean TTFT of twenty minutes.
"""

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


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    return " ".join(text.split())


def write_trace(path: Path, *, n: int, gap_s: float, prompt_tokens: int) -> Path:
    frame = pd.DataFrame(
        {
            "arrival_s": np.arange(n) * gap_s,
            "prompt_tokens": [prompt_tokens + 7 * (i % 5) for i in range(n)],
            "output_tokens": [8] * n,
        }
    )
    save(Trace(frame, name=path.stem), path)
    return path


@pytest.fixture
def heavy(tmp_path: Path) -> Path:
    """Far more prefill work than one instance does: 2,000-token prompts every 20 ms."""
    return write_trace(tmp_path / "heavy.parquet", n=600, gap_s=0.02, prompt_tokens=2000)


@pytest.fixture
def light(tmp_path: Path) -> Path:
    """Short prompts a second apart: the queue stays empty."""
    return write_trace(tmp_path / "light.parquet", n=120, gap_s=1.0, prompt_tokens=200)


def simulate(trace: Path, out: Path, *args: object):
    return invoke("simulate", "--trace", trace, "--out", out, "-q", *args)


def test_an_overloaded_run_says_by_how_much_the_queue_grows(heavy, light, tmp_path):
    over = simulate(heavy, tmp_path / "heavy")
    assert over.exit_code == 0, over.output
    text = flat(over.output)
    assert "warning: offered load exceeds capacity" in text
    assert "req/s" in text and "waiting at the last arrival" in text
    calm = simulate(light, tmp_path / "light")
    assert calm.exit_code == 0, calm.output
    assert "warning" not in calm.output


def test_rejecting_every_request_says_so_and_why(light, tmp_path):
    result = simulate(light, tmp_path / "run", "--max-total-tokens", "10")
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "warning: every request was rejected" in text
    assert "longer than the 10 tokens an instance's KV cache holds" in text
    assert "--max-total-tokens" in text


def test_a_run_that_completed_nothing_shows_no_nan(light, tmp_path):
    result = invoke(
        "simulate", "--trace", light, "--out", tmp_path / "r", "--max-total-tokens", "10"
    )
    assert result.exit_code == 0, result.output
    assert "nan" not in result.output.lower()
    throughput = next(line for line in result.output.splitlines() if "throughput" in line)
    assert throughput.split()[-1] == "-"


def test_some_rejections_are_counted(tmp_path):
    frame = pd.DataFrame(
        {"arrival_s": [0.0, 1.0, 2.0, 3.0], "prompt_tokens": [100, 5000, 100, 100]}
    )
    frame["output_tokens"] = 10
    trace = tmp_path / "one-long.parquet"
    save(Trace(frame, name="one-long"), trace)
    result = simulate(trace, tmp_path / "run", "--max-total-tokens", "2000")
    assert result.exit_code == 0, result.output
    assert "1 of 4 requests (25.0%) were rejected" in flat(result.output)
    assert "(5,010 tokens)" in flat(result.output)


def test_an_ignored_instances_flag_is_named(light, tmp_path):
    result = simulate(light, tmp_path / "run", "--instances", "8", "--pd", "1:3")
    assert result.exit_code == 0, result.output
    assert "warning: --instances 8 is ignored: --pd 1:3 sets the instances" in flat(result.output)
    alone = simulate(light, tmp_path / "alone", "--pd", "1:3")
    assert "ignored" not in alone.output


SCENARIO = """
name = "warn"
loads = [0.05, 1.0]

[trace]
path = "heavy.parquet"

[cluster]
model = "qwen2.5-32b"
gpu = "h200"
instances = 1

[[policies]]
name = "fcfs"

[[policies]]
name = "round_robin"
"""


def test_compare_names_the_points_past_capacity_and_those_that_rejected(heavy, tmp_path):
    scenario = tmp_path / "warn.toml"
    scenario.write_text(SCENARIO)
    result = invoke("compare", scenario, "--out", tmp_path / "out", "--jobs", "1", "-q")
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    # x0.05 (one request a second) keeps up; x1 (fifty a second) does not, for either policy.
    assert (
        "warning: offered load exceeds capacity for 2 policy-load pair(s): ×1 every policy" in text
    )
    assert "×0.05" not in text
    assert "rejected" not in text
    small = invoke(
        "compare", scenario, "--out", tmp_path / "small", "--jobs", "1", "-q",
        "--max-total-tokens", "1500",
    )  # fmt: skip
    assert small.exit_code == 0, small.output
    text = flat(small.output)
    assert "warning: requests rejected at 4 point(s)" in text
    assert "KV cache (1,500 tokens" in text and "fcfs ×0.05 seed 0 (600 of 600)" in text


def test_compare_names_a_scenario_key_that_pd_overrides(light, tmp_path):
    scenario = tmp_path / "both.toml"
    scenario.write_text(
        'name = "both"\n[trace]\npath = "light.parquet"\n'
        '[cluster]\ninstances = 8\npd = "1:1"\n[[policies]]\nname = "fcfs"\n'
    )
    result = invoke("compare", scenario, "--out", tmp_path / "out", "-j", "1", "-q")
    assert result.exit_code == 0, result.output
    expected = 'both.toml: cluster.instances = 8 is ignored: cluster.pd = "1:1" sets the instances'
    assert expected in flat(result.output)
