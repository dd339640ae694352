"""``llmsched replay`` flags: bad values are named, a run prints its headline figures."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from sim.cli import app
from tests.unit.replay.mock_server import MockServer
from traces.loaders import save
from traces.trace import Trace


def _trace_file(tmp_path: Path) -> Path:
    frame = pd.DataFrame(
        {"arrival_s": np.arange(4) * 0.01, "prompt_tokens": [5] * 4, "output_tokens": [3] * 4}
    )
    path = tmp_path / "t.parquet"
    save(Trace(frame), path)
    return path


def _invoke(*args: str):
    return CliRunner().invoke(app, ["replay", *args])


def test_a_target_that_is_not_a_url_is_named(tmp_path: Path) -> None:
    got = _invoke("--trace", str(_trace_file(tmp_path)), "--target", "localhost:8000",
                  "--out", str(tmp_path / "o"))  # fmt: skip
    assert got.exit_code == 2
    assert "--target" in got.output and "http://" in got.output


def test_an_endpoint_the_protocol_lacks_is_named(tmp_path: Path) -> None:
    got = _invoke("--trace", str(_trace_file(tmp_path)), "--target", "http://127.0.0.1:1",
                  "--endpoint", "generate", "--out", str(tmp_path / "o"))  # fmt: skip
    assert got.exit_code == 2
    assert "openai offers completions, chat" in got.output


def test_an_unknown_bundled_trace_is_named(tmp_path: Path) -> None:
    got = _invoke("--trace", "bundled:nope", "--target", "http://127.0.0.1:1",
                  "--out", str(tmp_path / "o"))  # fmt: skip
    assert got.exit_code == 2 and "nope" in got.output


def test_a_run_prints_its_counts_and_latencies(tmp_path: Path) -> None:
    with MockServer(first_token_delay_s=0.02) as server:
        got = _invoke("--trace", str(_trace_file(tmp_path)), "--target", server.url,
                      "--endpoint", "chat", "--out", str(tmp_path / "o"))  # fmt: skip
    assert got.exit_code == 0, got.output
    assert "4 of 4 completed (0 errors" in got.output
    p50_ms = float(re.search(r"TTFT ms  p50 ([\d.,]+)", got.output).group(1).replace(",", ""))
    assert p50_ms >= 20  # the server's 20 ms before the first token
    assert [s.path for s in server.seen] == ["/v1/chat/completions"] * 4
