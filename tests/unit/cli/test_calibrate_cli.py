"""`llmsched calibrate` turns measured steps into a profile that `simulate` accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from scheduler.cost_model import CostModel
from sim.cli import app
from traces.bundled import bundled_path

runner = CliRunner()


def _flat(result) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def _measured_steps(path: Path, slowdown: float) -> None:
    """Steps of an engine `slowdown` times slower than the default model, as a CSV."""
    cost = CostModel.from_names("llama-3.1-8b", "h100")
    rows = []
    for batch in (1, 2, 4, 8):
        for new in (16, 64, 256, 1024, 4096):
            latency = cost.prefill_time_s([new] * batch, [0] * batch) * slowdown
            rows.append(("prefill", batch, new * batch, 0, None, latency))
        for context in (256, 1024, 4096):
            latency = cost.decode_time_s(batch * 8, batch * 8 * context) * slowdown
            rows.append(("decode", batch * 8, None, None, batch * 8 * context, latency))
    columns = ["kind", "batch_size", "new_tokens", "cached_tokens", "context_tokens", "latency_s"]
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)


def test_calibrated_profile_fits_and_slows_the_simulation(tmp_path: Path) -> None:
    steps, profile = tmp_path / "steps.csv", tmp_path / "profile.json"
    _measured_steps(steps, slowdown=1.5)
    args = ["calibrate", str(steps), "--model", "llama-3.1-8b", "--gpu", "h100", "-o"]
    result = runner.invoke(app, [*args, str(profile), "--source", "test"])
    assert result.exit_code == 0, result.output
    fit = json.loads(profile.read_text())["fit"]
    assert fit["prefill"]["r2"] > 0.99 and fit["decode"]["r2"] > 0.99

    trace = str(bundled_path("azure-code"))
    base = ["simulate", "--trace", trace, "--model", "llama-3.1-8b", "--gpu", "h100"]
    summaries = []
    for name, extra in (("default", []), ("calibrated", ["--profile", str(profile)])):
        result = runner.invoke(app, [*base, "--out", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
        summaries.append(json.loads((tmp_path / name / "summary.json").read_text()))
    default, calibrated = summaries
    assert calibrated["tpot_mean_s"] > 1.3 * default["tpot_mean_s"]


def test_malformed_measurements_name_the_line_and_field(tmp_path: Path) -> None:
    steps = tmp_path / "steps.csv"
    steps.write_text("kind,batch_size,latency_s\nprefill,1,0.01\nsideways,1,0.02\n")
    args = ["calibrate", str(steps), "--model", "llama-3.1-8b", "--gpu", "h100", "-o", "p.json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "steps.csv:3" in result.output and "kind" in result.output


def test_a_binary_file_is_one_line(tmp_path: Path) -> None:
    steps = tmp_path / "steps.parquet"
    steps.write_bytes(b"PAR1\x00\x15\x04" + bytes(range(256)) * 4)
    args = ["calibrate", str(steps), "--model", "llama-3.1-8b", "--gpu", "h100", "-o", "p.json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "steps.parquet: not a CSV file (binary data)" in _flat(result)
    assert "Traceback" not in _flat(result)


def test_a_csv_or_a_target_not_both_nor_neither(tmp_path: Path) -> None:
    base = ["calibrate", "--model", "llama-3.1-8b", "--gpu", "h100", "-o", str(tmp_path / "p.json")]
    neither = runner.invoke(app, base)
    both = runner.invoke(app, [*base, str(tmp_path / "x.csv"), "--target", "http://127.0.0.1:9"])
    for result in (neither, both):
        assert result.exit_code == 2
        assert "a CSV of measurements or --target URL" in _flat(result)


def test_an_unreachable_server_is_one_line(tmp_path: Path) -> None:
    from tests.loopback import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    args = ["calibrate", "--target", url, "--model", "llama-3.1-8b", "--gpu", "h100"]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "p.json")])
    assert result.exit_code == 2
    assert f"{url}: cannot reach the server" in _flat(result)
    assert not (tmp_path / "p.json").exists()


def test_too_few_points_are_refused_not_shown_as_a_perfect_fit(tmp_path: Path) -> None:
    steps = tmp_path / "steps.csv"
    steps.write_text("kind,batch_size,new_tokens,latency_s\nttft,1,64,0.03\n")
    args = ["calibrate", str(steps), "--model", "llama-3.1-8b", "--gpu", "h100"]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "p.json")])
    assert result.exit_code == 2
    assert "1 point cannot fit" in _flat(result) and "1.0000" not in _flat(result)


def test_a_cpu_engine_outside_the_catalogue_is_calibrated_and_simulated(tmp_path: Path) -> None:
    tiny = "name=tiny,layers=4,hidden=256,heads=4,kv_heads=2,ffn=1024,vocab=32000,dtype=fp32"
    cpu = "name=xeon-8480,flops=3e12,bandwidth=2.5e11,memory=64e9"
    cost = CostModel.from_names(tiny, cpu)
    rows = [
        ("ttft", 1, n, 0, None, 0.008 + cost.prefill_time_s([n], [0])) for n in (16, 64, 256, 1024)
    ]
    rows += [("prefill", 1, n, 0, None, cost.prefill_time_s([n], [0])) for n in (32, 512, 2048)]
    rows += [
        ("decode", b, None, None, b * c, cost.decode_time_s(b, b * c))
        for b in (1, 4, 16)
        for c in (64, 512)
    ]
    columns = ["kind", "batch_size", "new_tokens", "cached_tokens", "context_tokens", "latency_s"]
    pd.DataFrame(rows, columns=columns).to_csv(tmp_path / "steps.csv", index=False)
    profile = tmp_path / "cpu.json"
    args = [
        "calibrate",
        str(tmp_path / "steps.csv"),
        "--model",
        tiny,
        "--gpu",
        cpu,
        "-o",
        str(profile),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads(profile.read_text())
    assert saved["gpu"] == "xeon-8480" and saved["model"] == "tiny"
    assert saved["coefficients"]["request_overhead_s"] == pytest.approx(0.008, rel=0.02)

    trace = str(bundled_path("azure-code"))
    sim = ["simulate", "--trace", trace, "--model", tiny, "--gpu", cpu, "--profile", str(profile)]
    result = runner.invoke(app, [*sim, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    summary = (tmp_path / "run" / "summary.json").read_text()
    assert "xeon-8480" in summary
    assert not any(name in summary for name in ("H100", "H200", "A100", "h100", "h200"))
    # The same profile under a catalogue GPU is refused, not silently re-labelled.
    result = runner.invoke(
        app, [*sim[:5], "--gpu", "h100", "--profile", str(profile), "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 2 and "profile is for" in _flat(result)


def _calibrate_against(server, tmp_path: Path):
    args = ["calibrate", "--target", server.url, "--model", "llama-3.1-8b", "--gpu", "h100"]
    return runner.invoke(app, [*args, "-o", str(tmp_path / "p.json")])


def test_a_server_that_errors_is_quoted_in_one_line(tmp_path: Path) -> None:
    from tests.unit.replay.mock_server import MockServer

    with MockServer(status=503) as server:
        result = _calibrate_against(server, tmp_path)
    assert result.exit_code == 2
    assert "the server answered 503" in _flat(result) and "mock overloaded" in _flat(result)
    assert not (tmp_path / "p.json").exists()


def test_a_prefix_cache_that_cannot_be_defeated_is_refused(tmp_path: Path) -> None:
    from tests.unit.replay.mock_server import MockServer

    # A server that claims a hit on prompts of random ids it has never seen.
    with MockServer(cached_tokens=16) as server:
        result = _calibrate_against(server, tmp_path)
    assert result.exit_code == 2
    assert "16 cached tokens for a prompt of" in _flat(result)
    assert "prefix cache cannot be defeated" in _flat(result)
