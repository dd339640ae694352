"""Fitting cost-model coefficients to measured steps, and profile files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scheduler.calibration import fit_profile, load_measurements
from scheduler.cost_model import Coefficients, CostModel
from scheduler.hardware import gpu_spec, model_spec
from scheduler.profile import load_profile, save_profile
from traces.errors import ConfigError

EXAMPLE = Path(__file__).parents[3] / "examples" / "profiles" / "qwen2.5-32b-h200-tp1.json"


def _truth() -> Coefficients:
    """A 'real' engine that differs from the first-principles guess."""
    prior = Coefficients.from_specs(model_spec("qwen2.5-32b"), gpu_spec("h200"))
    return dataclasses.replace(
        prior,
        linear_s_per_token=prior.linear_s_per_token * 1.25,
        weight_read_s=prior.weight_read_s * 0.9,
        attention_s_per_unit=prior.attention_s_per_unit * 1.5,
        prefill_overhead_s=prior.prefill_overhead_s * 1.5,
        decode_overhead_s=prior.decode_overhead_s * 0.7,
        kv_read_s_per_token=prior.kv_read_s_per_token * 1.2,
        decode_s_per_seq=prior.decode_s_per_seq * 5,
    )


def _measure(truth: Coefficients, noise: float = 0.005, seed: int = 0) -> pd.DataFrame:
    """bench_one_batch-style steps of the true engine, with relative noise."""
    cm = CostModel(model_spec("qwen2.5-32b"), gpu_spec("h200"), coefficients=truth)
    rng = np.random.default_rng(seed)
    rows = []
    for b in (1, 2, 4, 8):
        for n in (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096):
            for c in (0, 1024, 4096):
                t = cm.prefill_time_s([n] * b, [c] * b) * (1 + rng.normal(0, noise))
                rows.append(
                    {
                        "kind": "prefill",
                        "batch_size": b,
                        "new_tokens": n * b,
                        "cached_tokens": c * b,
                        "latency_s": t,
                    }
                )
    for b in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        for ctx in (128, 1024, 4096, 16384):
            t = cm.decode_time_s(b, b * ctx) * (1 + rng.normal(0, noise))
            rows.append(
                {"kind": "decode", "batch_size": b, "context_tokens": b * ctx, "latency_s": t}
            )
    return pd.DataFrame(rows)


def test_fit_recovers_known_coefficients():
    truth = _truth()
    profile = fit_profile(_measure(truth), "qwen2.5-32b", "h200", source="synthetic")
    fit = Coefficients(**profile.coefficients.model_dump())
    for name in (
        "prefill_overhead_s",
        "linear_s_per_token",
        "attention_s_per_unit",
        "weight_read_s",
        "kv_read_s_per_token",
    ):
        assert getattr(fit, name) == pytest.approx(getattr(truth, name), rel=0.04), name
    assert fit.decode_s_per_seq == pytest.approx(truth.decode_s_per_seq, rel=0.10)
    # A memory-bound decode step's fixed part is overhead + weight read; only
    # the sum is seen there.
    assert fit.decode_overhead_s + fit.weight_read_s == pytest.approx(
        truth.decode_overhead_s + truth.weight_read_s, rel=0.01
    )
    assert profile.fit["prefill"].points == 120 and profile.fit["decode"].points == 36
    assert profile.fit["prefill"].r2 > 0.999 and profile.fit["decode"].r2 > 0.999
    assert profile.notes == []


def test_a_saved_profile_drives_the_cost_model(tmp_path):
    truth = _truth()
    csv = tmp_path / "steps.csv"
    _measure(truth, noise=0.002).to_csv(csv, index=False)
    path = tmp_path / "qwen32-h200.json"
    save_profile(fit_profile(csv, "Qwen/Qwen2.5-32B-Instruct", "h200"), path)

    saved = json.loads(path.read_text())
    assert (saved["model"], saved["gpu"], saved["tp"]) == ("Qwen2.5-32B", "H200", 1)
    fitted = CostModel.from_names("qwen2.5-32b", "h200", profile=path)
    real = CostModel(model_spec("qwen2.5-32b"), gpu_spec("h200"), coefficients=truth)
    default = CostModel.from_names("qwen2.5-32b", "h200")
    for new, cached in (([64], [0]), ([2048], [0]), ([512] * 4, [4096] * 4)):
        want = real.prefill_time_s(new, cached)
        assert fitted.prefill_time_s(new, cached) == pytest.approx(want, rel=0.02)
    # The uncalibrated model is 25% off where the GEMMs dominate.
    want = real.prefill_time_s([2048], [0])
    assert default.prefill_time_s([2048], [0]) < 0.85 * want
    for n, ctx in ((1, 1000), (32, 32_000), (200, 400_000)):
        assert fitted.decode_time_s(n, ctx) == pytest.approx(real.decode_time_s(n, ctx), rel=0.02)


def test_a_profile_for_another_setup_is_refused(tmp_path):
    path = tmp_path / "p.json"
    save_profile(fit_profile(_measure(_truth()), "qwen2.5-32b", "h200"), path)
    with pytest.raises(ConfigError, match=r"profile is for \('Qwen2\.5-32B', 'H200', 1\)"):
        CostModel.from_names("qwen2.5-32b", "h100", profile=path)
    with pytest.raises(ConfigError, match="profile is for"):
        CostModel.from_names("qwen2.5-32b", "h200", tp=2, profile=path)


def test_missing_kinds_keep_first_principles_values():
    decode_only = _measure(_truth()).query("kind == 'decode'")
    profile = fit_profile(decode_only, "qwen2.5-32b", "h200")
    prior = Coefficients.from_specs(model_spec("qwen2.5-32b"), gpu_spec("h200"))
    fit = Coefficients(**profile.coefficients.model_dump())
    assert fit.linear_s_per_token == prior.linear_s_per_token
    assert fit.prefill_overhead_s == prior.prefill_overhead_s
    assert "prefill" not in profile.fit
    assert any("no prefill rows" in note for note in profile.notes)


def _profile_json(tmp_path: Path, edit) -> Path:
    path = tmp_path / "p.json"
    save_profile(fit_profile(_measure(_truth()), "qwen2.5-32b", "h200"), path)
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda r: r["coefficients"].update(linear_s_per_token=-1.0),
            r"field 'coefficients\.linear_s_per_token': .*greater than or equal to 0; got -1\.0",
        ),
        (lambda r: r.pop("gpu"), r"field 'gpu': Field required"),
        (lambda r: r["coefficients"].pop("weight_read_s"), r"field 'coefficients\.weight_read_s'"),
        (lambda r: r.update(colour="blue"), r"field 'colour': Extra inputs"),
        (lambda r: r.update(tp=0), r"field 'tp'"),
    ],
)
def test_a_malformed_profile_names_the_field(tmp_path, edit, message):
    path = _profile_json(tmp_path, edit)
    with pytest.raises(ConfigError, match=message):
        load_profile(path)
    with pytest.raises(ConfigError, match=message):
        CostModel.from_names("qwen2.5-32b", "h200", profile=path)


def test_unreadable_profiles_say_why(tmp_path):
    with pytest.raises(ConfigError, match="cannot read profile"):
        load_profile(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "Qwen2.5-32B",\n  "gpu": }')
    with pytest.raises(ConfigError, match=r"bad\.json:2: not valid JSON"):
        load_profile(bad)


@pytest.mark.parametrize(
    ("csv", "message"),
    [
        (
            "kind,batch_size,new_tokens,latency_s\nprefill,1,128,0.02\nwarmup,1,128,0.02\n",
            r"steps\.csv:3: field 'kind': expected 'prefill' or 'decode'; got 'warmup'",
        ),
        (
            "kind,batch_size,new_tokens,latency_s\nprefill,1,128,0\n",
            r"steps\.csv:2: field 'latency_s': expected a number > 0",
        ),
        ("kind,batch_size,new_tokens\nprefill,1,128\n", r"field 'latency_s': expected a column"),
        (
            "kind,batch_size,latency_s\ndecode,4,0.01\n",
            r"field 'context_tokens': expected a column",
        ),
        (
            "kind,batch_size,context_tokens,latency_s\ndecode,0,10,0.01\n",
            r"steps\.csv:2: field 'batch_size': expected a number >= 1; got 0",
        ),
        (
            "kind,batch_size,context_tokens,latency_s,cuda_graph\ndecode,1,10,0.01,maybe\n",
            r"field 'cuda_graph': expected true or false; got 'maybe'",
        ),
    ],
)
def test_malformed_measurements_name_line_and_field(tmp_path, csv, message):
    path = tmp_path / "steps.csv"
    path.write_text(csv)
    with pytest.raises(ConfigError, match=message):
        load_measurements(path)


def test_measurement_defaults():
    rows = load_measurements(
        pd.DataFrame(
            {
                "kind": ["Prefill", "decode"],
                "batch_size": [2, 3],
                "new_tokens": [64, None],
                "context_tokens": [None, 300],
                "latency_s": [0.02, 0.01],
            }
        )
    )
    assert rows["kind"].tolist() == ["prefill", "decode"]
    assert rows["cached_tokens"].tolist() == [0, 0]
    assert rows["cuda_graph"].tolist() == [False, True]


def test_the_example_profile_loads():
    cm = CostModel.from_names("qwen2.5-32b", "h200", profile=EXAMPLE)
    assert 0.1 < cm.prefill_time_s([2048], [0]) < 0.3


def test_the_profile_format_stores_exactly_the_cost_models_coefficients():
    # The file format is kept apart from the cost model; a coefficient added to
    # one and not the other would be silently dropped from every profile.
    from scheduler.profile import CoefficientsModel

    assert list(CoefficientsModel.model_fields) == [
        f.name for f in dataclasses.fields(Coefficients)
    ]
