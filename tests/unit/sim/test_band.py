"""Bands: the same run with every step cost scaled down and up, in summaries, tables and sweeps."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import sim.runner as runner
from scheduler.cost_model import CostModel
from scheduler.profile import CoefficientsModel, FitQuality, Profile, save_profile
from sim.band import profile_error, scaled_cost
from sim.cli import app
from sim.runner import prepare
from sim.scenario import ScenarioError, parse_run, parse_scenario
from sim.sweep import points_of
from traces.loaders import save
from traces.trace import Trace

cli = CliRunner()


@pytest.fixture
def trace_file(tmp_path):
    """300 requests in 30 s: one H100 serving Llama-3.1-8B saturates at about 14 req/s."""
    rng = np.random.default_rng(0)
    n = 300
    frame = pd.DataFrame(
        {
            "arrival_s": np.sort(rng.uniform(0, 30, n)),
            "prompt_tokens": rng.integers(500, 3000, n),
            "output_tokens": rng.integers(50, 300, n),
        }
    )
    path = tmp_path / "t.parquet"
    save(Trace(frame, name="t"), path)
    return path


def _profile(path, fit: dict[str, FitQuality]) -> str:
    coefficients = CostModel.from_names("llama-3.1-8b", "h100").coefficients
    save_profile(
        Profile(
            model="Llama-3.1-8B",
            gpu="H100-SXM",
            tp=1,
            coefficients=CoefficientsModel(**dataclasses.asdict(coefficients)),
            fit=fit,
        ),
        path,
    )
    return str(path)


def _spec(trace_file, **overrides):
    data = {
        "trace": {"path": str(trace_file)},
        "cluster": {"model": "llama-3.1-8b", "gpu": "h100"},
        "policy": {"name": "fcfs"},
        "slo": {"ttft_ms": 500},
    }
    return parse_run(data | overrides)


def _simulate(*args: str):
    return cli.invoke(app, ["simulate", *args], catch_exceptions=False)


def test_scaled_costs_scale_every_step_and_nothing_else():
    catalogue = CostModel.from_names("llama-3.1-8b", "h100")
    with_overhead = dataclasses.replace(catalogue.coefficients, request_overhead_s=0.008)
    cost = CostModel(catalogue.model, catalogue.gpu, coefficients=with_overhead)
    up = scaled_cost(cost, 1.1)
    assert up.prefill_time_s([3000, 40], [0, 512]) == pytest.approx(
        1.1 * cost.prefill_time_s([3000, 40], [0, 512])
    )
    assert up.decode_time_s(48, 48 * 900) == pytest.approx(1.1 * cost.decode_time_s(48, 48 * 900))
    assert up.decode_time_s(3, 10, cuda_graph=False) == pytest.approx(
        1.1 * cost.decode_time_s(3, 10, cuda_graph=False)
    )
    assert up.mixed_time_s([256], [0], 20, 20_000) == pytest.approx(
        1.1 * cost.mixed_time_s([256], [0], 20, 20_000)
    )
    # Outside the steps: the server's per-request overhead and the KV link.
    assert up.request_overhead_s == 0.008
    assert up.kv_transfer_time_s(4096) == cost.kv_transfer_time_s(4096)
    assert up.kv_capacity_tokens(0.9) == cost.kv_capacity_tokens(0.9)


def test_a_band_near_saturation_brackets_the_figure_and_writes_the_factors(trace_file, tmp_path):
    out = tmp_path / "run"
    result = _simulate(
        "--trace", str(trace_file), "--model", "llama-3.1-8b", "--gpu", "h100",
        "--load", "4", "--slo-ttft-ms", "500", "--band", "0.1", "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    s = json.loads((out / "summary.json").read_text())
    assert (s["band_cost_scale_lo"], s["band_cost_scale_hi"]) == (0.9, 1.1)
    # Past the knee a tenth more per step moves p50 TTFT by far more than a tenth.
    assert s["ttft_p50_s_lo"] < s["ttft_p50_s"] < s["ttft_p50_s_hi"]
    assert s["ttft_p50_s_hi"] / s["ttft_p50_s_lo"] > 1.5
    assert s["throughput_rps_lo"] > s["throughput_rps"] > s["throughput_rps_hi"]
    assert s["slo_attainment_lo"] >= s["slo_attainment"] >= s["slo_attainment_hi"]
    assert s["config"]["spec"]["band"] == 0.1
    # The terminal table shows the range beside the figure, lower end first.
    ms = [f"{s[k] * 1000:,.1f}" for k in ("ttft_p50_s", "ttft_p50_s_lo", "ttft_p50_s_hi")]
    assert f"{ms[0]} ({ms[1]}–{ms[2]})" in result.output
    assert "every step cost ×0.9 and ×1.1" in result.output


def test_a_band_at_light_load_still_holds_its_figure(trace_file):
    result = prepare(_spec(trace_file, load=0.5, band=0.1)).run()
    s = result.summary(0.5, None)
    for key in ("ttft_p50_s", "ttft_p99_s", "tpot_p90_s", "e2e_p50_s"):
        assert s[f"{key}_lo"] <= s[key] <= s[f"{key}_hi"], key
    assert "band_cost_scale_lo" not in prepare(_spec(trace_file, load=0.5)).run().summary()


def test_the_policy_of_every_band_run_sees_the_cost_model_as_given(trace_file, monkeypatch):
    seen = []
    build = runner.build_policy

    def spy(spec, seed=0, *, slo_ttft_ms=None, cost=None):
        seen.append(cost.coefficients)
        return build(spec, seed, slo_ttft_ms=slo_ttft_ms, cost=cost)

    monkeypatch.setattr(runner, "build_policy", spy)
    prepared = prepare(_spec(trace_file, band=0.2))
    prepared.run()
    assert len(seen) == 3 and seen[1] == seen[2] == seen[0] == prepared.cost.coefficients


def test_bare_band_reads_the_profiles_rms_error(trace_file, tmp_path):
    fit = {
        "prefill": FitQuality(r2=0.99, points=10, rms_rel_error=0.03),
        "decode": FitQuality(r2=0.98, points=30, rms_rel_error=0.05),
    }
    profile = _profile(tmp_path / "p.json", fit)
    pooled = math.sqrt((10 * 0.03**2 + 30 * 0.05**2) / 40)
    assert profile_error(profile) == pytest.approx(pooled)
    out = tmp_path / "run"
    result = _simulate(
        "--trace", str(trace_file), "--model", "llama-3.1-8b", "--gpu", "h100",
        "--profile", profile, "--band", "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    s = json.loads((out / "summary.json").read_text())
    assert s["band_cost_scale_lo"] == pytest.approx(1 - pooled)
    assert s["band_cost_scale_hi"] == pytest.approx(1 + pooled)


def test_bare_band_without_a_profile_asks_for_a_number(trace_file, tmp_path):
    result = _simulate("--trace", str(trace_file), "--band", "--out", str(tmp_path / "r"))
    assert result.exit_code == 2
    assert "give the error as a number, e.g. --band 0.05" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("value", "expected"),
    [("5%", "got '5%'"), ("1.5", "up to (not including) 1"), ("-0.1", "got -0.1")],
)
def test_a_band_that_is_no_relative_error_is_one_line_naming_the_flag(
    trace_file, tmp_path, value, expected
):
    result = _simulate("--trace", str(trace_file), "--band", value, "--out", str(tmp_path / "r"))
    assert result.exit_code == 2
    assert result.output.startswith("error: --band") and expected in result.output


def test_a_profile_without_fit_quality_gives_no_default_band(trace_file, tmp_path):
    profile = _profile(tmp_path / "p.json", {})
    with pytest.raises(ScenarioError, match="records no fit error"):
        _spec(
            trace_file,
            cluster={"model": "llama-3.1-8b", "gpu": "h100", "profile": profile},
            band="profile",
        )


def _scenario(trace_file, **keys):
    data = {
        "trace": {"path": str(trace_file)},
        "cluster": {"model": "llama-3.1-8b", "gpu": "h100"},
        "loads": [4.0],
        "policies": [{"name": "fcfs"}],
    }
    return parse_scenario(data | keys)


def test_sweep_points_are_keyed_by_their_band(trace_file):
    keys = [points_of(_scenario(trace_file, **band))[0].key for band in
            ({}, {"band": 0.1}, {"band": 0.2})]  # fmt: skip
    assert len(set(keys)) == 3
    assert [p.spec.band for p in points_of(_scenario(trace_file, band=0.1))] == [0.1]


def test_a_scenarios_profile_band_needs_a_profile(trace_file):
    with pytest.raises(ScenarioError, match=r"band: the default band .* give the band as a number"):
        _scenario(trace_file, band="profile")


def test_compare_band_reaches_the_headline_the_report_and_the_markdown(trace_file, tmp_path):
    scenario = tmp_path / "s.toml"
    scenario.write_text(
        f'loads = [4.0]\n[trace]\npath = "{trace_file}"\n'
        '[cluster]\nmodel = "llama-3.1-8b"\ngpu = "h100"\n'
        '[slo]\nttft_ms = 500\n[[policies]]\nname = "fcfs"\n'
    )
    out = tmp_path / "cmp"
    result = cli.invoke(
        app, ["compare", str(scenario), "--band", "0.1", "--out", str(out), "-j", "1"],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (point,) = (out / "points").iterdir()
    s = json.loads((point / "summary.json").read_text())
    p50 = [f"{s[k] * 1000:,.0f}" for k in ("ttft_p50_s", "ttft_p50_s_lo", "ttft_p50_s_hi")]
    assert f"{p50[0]} ({p50[1]}–{p50[2]})" in result.output
    assert "every step cost scaled ×0.9 and ×1.1" in (out / "report.html").read_text()
    assert f"({p50[1]}–{p50[2]})" in (out / "summary.md").read_text()
    # The command that reruns it from the scenario copy passes the band again.
    assert (
        f"llmsched compare {out / 'scenario.toml'} --out {out} --band 0.1"
        in (out / "report.html").read_text()
    )
