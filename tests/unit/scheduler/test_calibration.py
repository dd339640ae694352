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
    # Step rows price no request, and nothing compares eager with CUDA-graph steps.
    assert profile.unfitted == ["request_overhead_s", "lm_head_s_per_seq", "eager_extra_s"]
    assert any(note.startswith("request_overhead_s: no row") for note in profile.notes)


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
    assert any("no ttft, prefill or mixed rows" in note for note in profile.notes)
    assert "prefill_overhead_s" in profile.unfitted and "decode_overhead_s" not in profile.unfitted


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
            r"steps\.csv:3: field 'kind': expected 'ttft', 'prefill', 'mixed' or 'decode'; got 'warmup'",
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


# -- client-side rows: a per-request overhead of its own ---------------------------


def _client_side(truth: Coefficients, noise: float = 0.005, seed: int = 1) -> pd.DataFrame:
    """What `calibrate --target` measures: lone-request TTFTs, stream gaps with a prefill
    riding (mixed steps) and inter-token times of concurrent streams."""
    cm = CostModel(model_spec("llama-3.1-8b"), gpu_spec("h100"), coefficients=truth)
    rng = np.random.default_rng(seed)
    rows = []
    for n in (16, 64, 256, 512, 1024, 2048):
        for c in (0, 1024):
            ttft = truth.request_overhead_s + cm.prefill_time_s([n], [c])
            rows.append({"kind": "ttft", "new_tokens": n, "cached_tokens": c, "latency_s": ttft})
    for n in (64, 512, 2048):
        for streams in (1, 4):
            t = cm.mixed_time_s([n], [0], streams, streams * 600)
            rows.append(
                {
                    "kind": "mixed",
                    "new_tokens": n,
                    "decode_seqs": streams,
                    "context_tokens": streams * 600,
                    "latency_s": t,
                }
            )
    for streams in (1, 2, 4, 8, 16):
        for ctx in (256, 2048):
            t = cm.decode_time_s(streams, streams * ctx)
            rows.append(
                {
                    "kind": "decode",
                    "batch_size": streams,
                    "context_tokens": streams * ctx,
                    "latency_s": t,
                }
            )
    frame = pd.DataFrame(rows).assign(batch_size=lambda f: f["batch_size"].fillna(1))
    frame["latency_s"] *= 1 + rng.normal(0, noise, len(frame))
    return frame


def _client_truth(overhead_s: float = 0.009) -> Coefficients:
    prior = Coefficients.from_specs(model_spec("llama-3.1-8b"), gpu_spec("h100"))
    return dataclasses.replace(
        prior,
        request_overhead_s=overhead_s,
        prefill_overhead_s=prior.prefill_overhead_s * 2,
        linear_s_per_token=prior.linear_s_per_token * 1.3,
        decode_overhead_s=prior.decode_overhead_s * 1.5,
        decode_s_per_seq=40e-6,
    )


def test_client_side_rows_fit_the_request_overhead_apart_from_the_step_constant():
    truth = _client_truth(0.009)
    profile = fit_profile(_client_side(truth), "llama-3.1-8b", "h100")
    fit = Coefficients(**profile.coefficients.model_dump())
    assert fit.request_overhead_s == pytest.approx(0.009, rel=0.05)
    assert fit.prefill_overhead_s == pytest.approx(truth.prefill_overhead_s, rel=0.1)
    assert fit.linear_s_per_token == pytest.approx(truth.linear_s_per_token, rel=0.04)
    assert fit.decode_s_per_seq == pytest.approx(truth.decode_s_per_seq, rel=0.1)
    assert set(profile.fit) == {"ttft", "mixed", "decode"}
    assert "request_overhead_s" not in profile.unfitted
    assert "prefill_overhead_s" not in profile.unfitted
    assert all(q.rms_rel_error < 0.02 for q in profile.fit.values())


def test_ttft_rows_alone_cannot_split_the_overhead_and_say_so():
    ttft_only = _client_side(_client_truth()).query("kind == 'ttft'")
    profile = fit_profile(ttft_only, "llama-3.1-8b", "h100")
    assert "prefill_overhead_s" in profile.unfitted
    note = next(n for n in profile.notes if n.startswith("prefill_overhead_s"))
    assert "not separable from" in note and "request_overhead_s" in note


def test_residuals_come_with_the_fit():
    from scheduler.calibration import calibrate

    result = calibrate(_client_side(_client_truth(), noise=0.0), "llama-3.1-8b", "h100")
    res = result.residuals
    assert len(res) == 12 + 6 + 10
    assert {"predicted_s", "rel_error"} <= set(res.columns)
    assert res["rel_error"].abs().max() < 0.01
    assert result.profile.fit["ttft"].max_rel_error == pytest.approx(
        res.query("kind == 'ttft'")["rel_error"].abs().max()
    )


def test_too_few_points_for_the_terms_are_refused():
    rows = pd.DataFrame(
        {
            "kind": ["decode", "decode", "decode"],
            "batch_size": [1, 2, 4],
            "context_tokens": [100, 2000, 900],
            "latency_s": [0.010, 0.011, 0.0125],
        }
    )
    with pytest.raises(ConfigError, match=r"decode rows: 3 points cannot fit 3 terms .*at least 4"):
        fit_profile(rows, "llama-3.1-8b", "h100")
    # One point never claims a perfect fit: it is refused before any R^2 is printed.
    one = pd.DataFrame(
        {"kind": ["ttft"], "batch_size": [1], "new_tokens": [64], "latency_s": [0.03]}
    )
    with pytest.raises(ConfigError, match=r"ttft rows: 1 point cannot fit 1 term "):
        fit_profile(one, "llama-3.1-8b", "h100")


def test_r2_is_left_out_where_it_means_nothing():
    rows = pd.DataFrame(
        {
            "kind": ["decode"] * 4,
            "batch_size": [1, 1, 1, 1],
            "context_tokens": [100, 100, 100, 100],
            "latency_s": [0.010, 0.010, 0.010, 0.010],
        }
    )
    profile = fit_profile(rows, "llama-3.1-8b", "h100")
    assert profile.fit["decode"].r2 is None
    assert {"decode_s_per_seq", "kv_read_s_per_token"} <= set(profile.unfitted)


def test_data_the_model_cannot_fit_is_refused_with_the_worst_point():
    rows = _client_side(_client_truth()).query("kind == 'ttft'").copy()
    # A server whose TTFT falls as prompts grow is no engine the cost model describes.
    rows["latency_s"] = rows["latency_s"].to_numpy()[::-1]
    with pytest.raises(ConfigError, match=r"does not fit the ttft rows: rms relative error \d+%"):
        fit_profile(rows, "llama-3.1-8b", "h100")


def test_a_binary_file_is_one_clear_error(tmp_path):
    path = tmp_path / "steps.csv"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ConfigError, match=r"steps\.csv: not a CSV file \(binary data\)"):
        load_measurements(path)
    gz = tmp_path / "steps.csv.gz"
    gz.write_bytes(b"\x1f\x8b\x08\x00" + b"\xff\xfe" * 100)
    with pytest.raises(ConfigError, match=r"not a CSV file"):
        load_measurements(gz)
