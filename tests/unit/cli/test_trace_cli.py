"""`llmsched trace gen / convert / stats` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sim.cli import app
from traces.bundled import bundled_path
from traces.loaders import load, save

runner = CliRunner()


def _stats(path: Path) -> dict:
    result = runner.invoke(app, ["trace", "stats", "--json", str(path)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_gen_writes_the_requested_rate_and_burstiness(tmp_path: Path) -> None:
    out = tmp_path / "g.parquet"
    args = ["trace", "gen", "--n-requests", "20000", "--rate-rps", "8", "--cv", "2", "-o", str(out)]
    # One-shot requests only: session follow-up turns are not part of the renewal process.
    result = runner.invoke(app, [*args, "--seed", "3", "--set", "conversation_share=0"])
    assert result.exit_code == 0, result.output
    s = _stats(out)
    assert s["n_requests"] == 20000
    assert s["rate_mean_rps"] == pytest.approx(8, rel=0.05)
    assert s["interarrival_cv"] == pytest.approx(2, rel=0.05)


def test_gen_is_deterministic_for_a_seed_and_set_overrides_any_field(tmp_path: Path) -> None:
    paths = [tmp_path / f"{i}.parquet" for i in range(3)]
    for path, seed in zip(paths, (1, 1, 2), strict=True):
        args = ["trace", "gen", "--n-requests", "500", "--seed", str(seed), "-o", str(path)]
        result = runner.invoke(app, [*args, "--set", "failure_rate=0.5"])
        assert result.exit_code == 0, result.output
    first, again, other = (load(p) for p in paths)
    assert first.equals(again) and not first.equals(other)
    assert 0.4 < first.frame["failed"].mean() < 0.6


def test_gen_names_a_bad_parameter() -> None:
    result = runner.invoke(app, ["trace", "gen", "-o", "x.parquet", "--set", "cv=-1"])
    assert result.exit_code == 2
    assert "cv" in result.output


def test_convert_applies_transforms(tmp_path: Path) -> None:
    src = bundled_path("azure-conv")
    out = tmp_path / "conv.jsonl.gz"
    args = ["trace", "convert", str(src), str(out), "--window", "600:1200", "--rate-rps", "20"]
    result = runner.invoke(app, [*args, "--max-prompt-tokens", "2048"])
    assert result.exit_code == 0, result.output
    s = _stats(out)
    full = load(src)
    in_window = ((full.arrival_s >= 600) & (full.arrival_s < 1200)).sum()
    assert s["n_requests"] == in_window
    assert s["rate_mean_rps"] == pytest.approx(20)
    assert s["prompt_tokens_max"] == 2048


def test_convert_filters_burstgpt_rows_by_log_type_and_failure(tmp_path: Path) -> None:
    src = bundled_path("burstgpt-synthetic")
    out = tmp_path / "conv.parquet"
    args = ["trace", "convert", str(src), str(out), "--log-type", "Conversation log"]
    result = runner.invoke(app, [*args, "--drop-failed"])
    assert result.exit_code == 0, result.output
    trace = load(out)
    assert len(trace) > 0
    assert set(trace.frame["log_type"].astype(str)) == {"Conversation log"}
    assert not trace.frame["failed"].any()
    assert trace.frame["session_id"].notna().all()


def test_malformed_trace_exits_2_naming_line_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.9799600,12,3\n2023-11-16 18:17:04.0000000,lots,3\n"
    )
    result = runner.invoke(app, ["trace", "stats", str(bad)])
    assert result.exit_code == 2
    assert "bad.csv:3" in result.output and "ContextTokens" in result.output


def test_convert_rejects_a_reversed_window(tmp_path: Path) -> None:
    src = bundled_path("azure-code")
    result = runner.invoke(
        app, ["trace", "convert", str(src), str(tmp_path / "o.parquet"), "--window", "50:10"]
    )
    assert result.exit_code == 2
    assert "window" in result.output


def test_load_option_false_turns_jitter_off_and_maybe_is_refused() -> None:
    path = bundled_path("mooncake-synthetic")
    plain = _stats(path)
    args = ["trace", "stats", "--json", str(path), "--load-option"]
    off = runner.invoke(app, [*args, "jitter=False"])
    assert off.exit_code == 0, off.output
    assert json.loads(off.stdout)["dispersion_1s"] == plain["dispersion_1s"]
    on = runner.invoke(app, [*args, "jitter=true"])
    assert json.loads(on.stdout)["dispersion_1s"] != plain["dispersion_1s"]
    maybe = runner.invoke(app, [*args, "jitter=maybe"])
    assert maybe.exit_code == 2
    assert "option jitter: expected true or false, got 'maybe'" in " ".join(maybe.output.split())


SAMPLE = bundled_path("burstgpt-synthetic")


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--window", "0:600:5"], "Invalid value for --window: expected START:END in seconds"),
        (["--window", "600:0"], "Invalid value for --window: end (0) must be after start (600)"),
        (["--max-requests", "0"], "Invalid value for --max-requests"),
        (["--model", "GPT-5"], "models 'GPT-5' match no request; it has: ChatGPT (8,422), GPT-4"),
        (["--window", "5000:6000"], "[5000, 6000) s holds no arrival"),
    ],
)
def test_convert_refuses_what_would_write_nothing_or_cannot_be_read(
    tmp_path: Path, flags: list[str], says: str
) -> None:
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["trace", "convert", str(SAMPLE), str(out), *flags])
    assert result.exit_code == 2
    assert says in " ".join(result.output.replace("│", " ").split())
    assert "Traceback" not in result.output and not out.exists()


def test_a_converted_file_goes_by_its_own_name(tmp_path: Path) -> None:
    out = tmp_path / "first-ten-minutes.parquet"
    result = runner.invoke(app, ["trace", "convert", str(SAMPLE), str(out), "--window", "0:600"])
    assert result.exit_code == 0, result.output
    assert _stats(out)["name"] == "first-ten-minutes.parquet"


def test_bundled_names_work_where_a_trace_file_does(tmp_path: Path) -> None:
    assert _stats(Path("bundled:ragpulse"))["name"] == "ragpulse"
    out = tmp_path / "azure.parquet"
    args = ["trace", "convert", "bundled:azure-code", str(out), "--window", "0:60"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert _stats(out)["n_requests"] == len(load(out)) > 0
    unknown = runner.invoke(app, ["trace", "stats", "bundled:nope"])
    assert unknown.exit_code == 2
    assert "no bundled trace named 'nope'; known: azure-code" in " ".join(unknown.output.split())


def test_stats_labels_a_converted_file_by_its_own_name(tmp_path: Path) -> None:
    # A file written by an older convert still records its source's name.
    source = load(SAMPLE)
    save(source, tmp_path / "kept.parquet")
    assert load(tmp_path / "kept.parquet").name == "burstgpt_sample.csv"
    assert _stats(tmp_path / "kept.parquet")["name"] == "kept.parquet"


def test_an_undetectable_file_points_at_the_format_flag(tmp_path: Path) -> None:
    path = tmp_path / "mystery.csv"
    path.write_text("foo,bar\n1,2\n")
    result = runner.invoke(app, ["trace", "stats", str(path)])
    assert result.exit_code == 2
    assert "name one with --format" in " ".join(result.output.split())


def test_gen_cv_help_says_sessions_pull_the_measured_cv_toward_1() -> None:
    result = runner.invoke(app, ["trace", "gen", "--help"], env={"COLUMNS": "200"})
    assert "pulled toward 1" in " ".join(result.output.replace("│", " ").split())
