"""The fidelity table: figures side by side, relative errors, a band, and errors on bad input."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from sim.cli import app
from sim.fidelity import METRICS, compare_runs, fidelity, to_markdown
from traces.errors import ConfigError

LIVE = {"ttft_p50_s": 0.200, "ttft_p90_s": 0.500, "e2e_p50_s": 2.0, "throughput_rps": 4.0}
SIMULATED = {"ttft_p50_s": 0.220, "ttft_p90_s": 0.400, "e2e_p50_s": 2.0, "throughput_rps": 4.2}


def test_every_figure_is_side_by_side_in_its_unit_with_the_simulations_relative_error():
    table = compare_runs(LIVE, SIMULATED).set_index("metric")
    assert list(table.index) == [m[0] for m in METRICS]
    assert table.loc["ttft_p50_s", "live"] == pytest.approx(200.0)  # ms
    assert table.loc["ttft_p50_s", "simulated"] == pytest.approx(220.0)
    assert table.loc["ttft_p50_s", "error"] == pytest.approx(0.10)
    assert table.loc["ttft_p90_s", "error"] == pytest.approx(-0.20)
    assert table.loc["e2e_p50_s", "error"] == pytest.approx(0.0)
    assert table.loc["throughput_rps", "unit"] == "req/s"
    assert table.loc["throughput_rps", "error"] == pytest.approx(0.05)
    # A figure neither run has is undefined, not zero error.
    assert math.isnan(table.loc["tpot_p99_s", "error"])


def test_a_band_gives_the_range_of_each_figure_low_to_high():
    low = {k: v * 0.9 for k, v in SIMULATED.items()}
    high = {k: v * 1.3 for k, v in SIMULATED.items()}
    table = compare_runs(LIVE, SIMULATED, high, low).set_index("metric")  # either order
    assert table.loc["ttft_p50_s", "simulated_low"] == pytest.approx(198.0)
    assert table.loc["ttft_p50_s", "simulated_high"] == pytest.approx(286.0)
    text = to_markdown(table.reset_index())
    assert "| TTFT p50 (ms) | 200.0 | 220.0 | 198.0 - 286.0 | +10.0% |" in text


def test_a_band_holds_the_point_prediction_when_a_tail_figure_does_not_move_with_cost():
    # Near saturation both scaled runs can land below the unscaled one on a tail figure.
    low = {k: v * 0.9 for k, v in SIMULATED.items()}
    high = {k: v * 0.95 for k, v in SIMULATED.items()}
    table = compare_runs(LIVE, SIMULATED, low, high).set_index("metric")
    assert table.loc["ttft_p50_s", "simulated_low"] == pytest.approx(198.0)
    assert table.loc["ttft_p50_s", "simulated_high"] == pytest.approx(220.0)


def test_markdown_prints_errors_in_percent_and_dashes_for_undefined_figures():
    text = to_markdown(compare_runs(LIVE, SIMULATED))
    assert "| TTFT p90 (ms) | 500.0 | 400.0 | -20.0% |" in text
    assert "| TPOT p50 (ms) | - | - | - |" in text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": "localhost:8000"}, "target: expected an http:// or https:// URL"),
        ({"band": 1.5}, "band: expected a fraction between 0 and 1"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_sent(tmp_path, kwargs, message):
    args = {"target": "http://127.0.0.1:9", "band": None, **kwargs}
    with pytest.raises(ConfigError, match=message):
        fidelity(
            "bundled:azure-code", args["target"], tmp_path / "p.json", tmp_path, band=args["band"]
        )


def test_the_command_names_a_missing_profile_in_one_line(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "fidelity",
            "--trace",
            "bundled:azure-code",
            "--target",
            "http://127.0.0.1:9",
            "--profile",
            str(tmp_path / "none.json"),
            "--out",
            str(tmp_path / "out"),
            "-q",
        ],
        env={"COLUMNS": "400"},
    )
    assert result.exit_code == 2
    assert "none.json: cannot read profile" in result.output
    assert "Traceback" not in result.output
