"""Degenerate command-line input is refused by flag, with what was expected."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from sim.cli import app
from traces.loaders import save
from traces.trace import Trace

runner = CliRunner()


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    frame = pd.DataFrame(
        {"arrival_s": [0.0, 0.5, 1.0], "prompt_tokens": [300, 40, 900], "output_tokens": [5, 9, 3]}
    )
    path = tmp_path / "t.parquet"
    save(Trace(frame, name="t"), path)
    return path


def simulate(trace: Path, out: Path, *args: str):
    return runner.invoke(app, ["simulate", "--trace", str(trace), "--out", str(out), "-q", *args])


@pytest.mark.parametrize(("model", "tp"), [("qwen2.5-32b", "3"), ("llama-3.1-8b", "6")])
def test_a_tp_that_does_not_split_the_heads_is_refused(trace, tmp_path, model, tp):
    result = simulate(trace, tmp_path / "x", "--model", model, "--tp", tp)
    assert result.exit_code == 2, result.output
    text = flat(result.output)
    assert "error: --tp: expected a tensor-parallel size that splits the" in text
    assert f"heads of {model}" in text and f"got {tp}" in text
    assert "(1, 2, 4, 8" in text  # the sizes that work
    assert not (tmp_path / "x").exists()


def test_a_tp_that_splits_the_heads_runs(trace, tmp_path):
    result = simulate(trace, tmp_path / "ok", "--model", "qwen2.5-32b", "--tp", "8")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ok" / "results.parquet").is_file()
