"""``llmsched simulate``: files written, summary printed, errors reported."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from sim.cli.simulate import simulate
from traces.loaders import save
from traces.trace import Trace

app = typer.Typer()
app.command()(simulate)
runner = CliRunner()


@pytest.fixture
def trace_file(tmp_path):
    frame = pd.DataFrame(
        {
            "arrival_s": [0.0, 0.2, 0.4, 0.6, 5.0],
            "prompt_tokens": [512, 2048, 128, 9000, 64],
            "output_tokens": [64, 16, 200, 8, 0],
            "failed": [False, False, False, False, True],
        }
    )
    path = tmp_path / "tiny.parquet"
    save(Trace(frame, name="tiny"), path)
    return path


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_simulate_writes_results_summary_and_queue(trace_file, tmp_path):
    out = tmp_path / "run"
    result = invoke(
        "--trace",
        str(trace_file),
        "--out",
        str(out),
        "--instances",
        "2",
        "--slo-ttft-ms",
        "400",
        "--slo-tpot-ms",
        "50",
        "--max-running-requests",
        "8",
    )
    assert result.exit_code == 0, result.output
    assert "TTFT ms" in result.output and "req/CPU-s" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["n_requests"], summary["n_completed"], summary["n_failed"]) == (5, 4, 1)
    assert summary["slo_ttft_s"] == 0.4 and summary["slo_tpot_s"] == 0.05
    config = summary["config"]
    assert config["limits"]["max_running_requests"] == 8
    assert config["limits"]["chunked_prefill_size"] == 8192  # SGLang's default on an H200
    assert config["model"] == "qwen2.5-32b" and config["instances"] == 2
    results = pd.read_parquet(out / "results.parquet")
    assert len(results) == 5 and set(results["instance"][:4]) == {0, 1}
    assert len(pd.read_parquet(out / "queue.parquet")) > 0


def test_fast_forward_and_stepping_write_the_same_results(trace_file, tmp_path):
    for flag in ("--fast-forward", "--no-fast-forward"):
        result = invoke("--trace", str(trace_file), "--out", str(tmp_path / flag), "--quiet", flag)
        assert result.exit_code == 0, result.output
    a = pd.read_parquet(tmp_path / "--fast-forward" / "results.parquet")
    b = pd.read_parquet(tmp_path / "--no-fast-forward" / "results.parquet")
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-9, rtol=0)


def test_pd_split_runs_prefill_and_decode_instances(trace_file, tmp_path):
    result = invoke("--trace", str(trace_file), "--out", str(tmp_path / "pd"), "--pd", "1:2", "-q")
    assert result.exit_code == 0, result.output
    results = pd.read_parquet(tmp_path / "pd" / "results.parquet")
    ok = results[results["outcome"] == "ok"]
    assert set(ok["instance"]) == {0}
    assert set(ok["decode_instance"]) <= {1, 2} and ok["kv_transfer_s"].notna().all()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--policy", "lifo"), "--policy: unknown policy 'lifo'; known policies:"),
        (
            ("--pd", "1:1", "--decode-policy", "laps"),
            "--decode-policy: decode policy 'laps' cannot choose decode instances",
        ),
        (("--pd", "2-2"), "error: --pd: expected P:D"),
        (("--pd", "0:3"), "error: --pd: expected P:D with two positive integers; got '0:3'"),
        (("--instances", "0"), "error: --instances: Input should be greater than 0"),
        (("--gpu", "tpu9"), "unknown GPU 'tpu9'"),
        (
            ("--max-running-requests", "0"),
            "error: --max-running-requests: expected an integer >= 1",
        ),
        (("--policy-param", "window_ms=3"), "error: --policy-param: policy 'fcfs' takes no"),
        (("--slo-ttft-ms", "-1"), "error: --slo-ttft-ms: Input should be greater than 0"),
    ],
)
def test_bad_options_exit_with_a_message_naming_them(trace_file, tmp_path, args, message):
    result = invoke("--trace", str(trace_file), "--out", str(tmp_path / "x"), *args)
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert message in text
    assert "options:" not in text and "cluster." not in text  # the flag, not the key path


def test_transforms_load_and_bundled_traces(tmp_path):
    common = ("--trace", "bundled:burstgpt-synthetic", "--transform", "max_requests=200", "-q")
    for load in ("1", "2"):
        result = invoke(*common, "--load", load, "--out", str(tmp_path / load))
        assert result.exit_code == 0, result.output
    one, two = (json.loads((tmp_path / x / "summary.json").read_text()) for x in ("1", "2"))
    assert one["n_requests"] == two["n_requests"] == 200
    assert two["config"]["offered_rps"] == pytest.approx(2 * one["config"]["offered_rps"])
    assert two["config"]["trace"] == "bundled:burstgpt-synthetic"


def test_decode_policy_picks_the_decode_instances(trace_file, tmp_path):
    args = ("--trace", str(trace_file), "--pd", "1:2", "--decode-policy", "round_robin", "-q")
    result = invoke(*args, "--out", str(tmp_path / "pd"))
    assert result.exit_code == 0, result.output
    results = pd.read_parquet(tmp_path / "pd" / "results.parquet")
    assert results.loc[results["outcome"] == "ok", "decode_instance"].tolist() == [1, 2, 1, 2]
    alone = invoke("--trace", str(trace_file), "--decode-policy", "round_robin", "--out", "x")
    assert alone.exit_code == 2
    assert "a decode policy needs cluster.pd" in " ".join(alone.output.split())


def test_decode_choice_flag_reaches_the_pair_and_a_bad_one_names_the_flag(trace_file, tmp_path):
    args = ("--trace", str(trace_file), "--pd", "1:2", "--decode-policy", "round_robin", "-q")
    result = invoke(*args, "--decode-choice", "dispatch", "--out", str(tmp_path / "pd"))
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "pd" / "summary.json").read_text())["config"]
    assert config["decode_choice"] == "dispatch"
    assert (tmp_path / "pd" / "run.json").is_file()
    bad = invoke(*args, "--decode-choice", "later", "--out", str(tmp_path / "bad"))
    assert bad.exit_code == 2
    assert "--decode-choice" in bad.output


def test_every_engine_limit_and_simulator_option_is_a_flag_that_reaches_the_config(
    trace_file, tmp_path
):
    out = tmp_path / "flags"
    result = invoke(
        "--trace",
        str(trace_file),
        "--out",
        str(out),
        "-q",
        "--cuda-graph-max-bs",
        "16",
        "--max-prefill-tokens",
        "4096",
        "--enable-mixed-chunk",
        "--prefix-knowledge",
        "oracle",
        "--poll-interval-ms",
        "20",
        "--batch-hints",
        "group",
    )
    assert result.exit_code == 0, result.output
    config = json.loads((out / "summary.json").read_text())["config"]
    assert config["limits"]["cuda_graph_max_bs"] == 16
    assert config["limits"]["max_prefill_tokens"] == 4096 and config["limits"]["mixed_chunk"]
    assert config["prefix_knowledge"] == "oracle"
    assert config["poll_interval_ms"] == 20.0 and config["batch_hints"] == "group"
    # One flag per row of the limits table, each the scenario key with dashes
    # (SGLang's own --enable-mixed-chunk included), vLLM's beside SGLang's.
    from sim.limits import LIMIT_OPTIONS

    flags = {f for p in typer.main.get_command(app).params for f in p.opts}
    assert {o.cli_flag for o in LIMIT_OPTIONS} <= flags
    assert all(o.cli_flag == "--" + o.key.replace("_", "-") for o in LIMIT_OPTIONS)
    assert {"--enable-mixed-chunk", "--cuda-graph-max-bs", "--max-running-requests"} <= flags
    assert {"--engine", "--max-num-seqs", "--max-num-batched-tokens", "--block-size"} <= flags


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (("--prefix-knowledge", "exact"), "'--prefix-knowledge'"),
        (("--batch-hints", "cuda"), "'--batch-hints'"),
        (("--poll-interval-ms", "-5"), "'--poll-interval-ms'"),
    ],
)
def test_a_bad_simulator_option_names_the_flag(trace_file, tmp_path, args, flag):
    result = runner.invoke(app, ["--trace", str(trace_file), "--out", str(tmp_path / "x"), *args])
    assert result.exit_code == 2
    assert flag in " ".join(result.output.split())


def test_the_summary_says_what_the_policy_saw(trace_file, tmp_path):
    plain = invoke("--trace", str(trace_file), "--out", str(tmp_path / "a"))
    assert "prefixes from its own record, gauges live" in " ".join(plain.output.split())
    oracle = invoke(
        "--trace",
        str(trace_file),
        "--out",
        str(tmp_path / "b"),
        "--prefix-knowledge",
        "oracle",
        "--poll-interval-ms",
        "100",
        "--batch-hints",
        "group",
    )
    text = " ".join(oracle.output.split())
    assert "prefixes from the caches (oracle), gauges polled every 100 ms" in text
    assert "hints as released groups" in text


def said(result) -> str:
    """The command's output as one line (rich wraps long messages)."""
    return " ".join(result.output.split())


def test_a_limit_of_the_other_engine_is_refused_by_the_flag_to_use(trace_file, tmp_path):
    out = str(tmp_path / "x")
    result = invoke(
        "--trace", str(trace_file), "--out", out, "--engine", "vllm", "--max-running-requests", "4"
    )
    assert result.exit_code == 2
    assert "--max-running-requests is SGLang's name" in said(result)
    assert "use --max-num-seqs" in said(result) and "Traceback" not in said(result)
    result = invoke(
        "--trace", str(trace_file), "--out", out, "--engine", "vllm", "--enable-mixed-chunk"
    )
    assert result.exit_code == 2
    assert "vLLM always runs prefill chunks inside decode steps" in said(result)
    result = invoke(
        "--trace", str(trace_file), "--out", out, "--engine", "sglang", "--block-size", "16"
    )
    assert result.exit_code == 2 and "use --page-size" in said(result)
    # Without --engine, simulate's engine is SGLang's.
    result = invoke("--trace", str(trace_file), "--out", out, "--max-num-seqs", "4")
    assert result.exit_code == 2
    assert "--max-num-seqs is vLLM's name" in said(result)
    assert "use --max-running-requests" in said(result)


def test_the_vllm_engine_runs_under_its_own_limits_and_writes_a_step_log(trace_file, tmp_path):
    out = tmp_path / "vllm"
    result = invoke(
        "--trace",
        str(trace_file),
        "--out",
        str(out),
        "-q",
        "--engine",
        "vllm",
        "--max-num-seqs",
        "3",
        "--max-num-batched-tokens",
        "1024",
        "--policy",
        "fcfs",
        "--step-log",
    )
    assert result.exit_code == 0, result.output
    config = json.loads((out / "summary.json").read_text())["config"]
    assert config["limits"]["engine"] == "vllm"
    assert config["limits"]["max_running_requests"] == 3
    assert config["limits"]["block_tokens"] == 16
    steps = pd.read_parquet(out / "steps.parquet")
    # 4 requests served (one failed in the trace): every token is in the log.
    produced = (steps["decode_batch"] * steps["n_steps"]).sum() + steps["n_first_tokens"].sum()
    assert produced == 64 + 16 + 200 + 8
    assert steps["n_finished"].sum() == 4 and "mixed" in set(steps["kind"])
    # At most 1024 new tokens per step, decodes included.
    assert (steps["prefill_tokens"] + steps["decode_batch"] <= 1024).all()


def test_a_transform_caps_output_tokens_as_it_caps_prompts(trace_file, tmp_path):
    out = tmp_path / "capped"
    result = invoke(
        "--trace",
        str(trace_file),
        "--out",
        str(out),
        "-q",
        "--transform",
        "max_output_tokens=32",
        "--transform",
        "max_prompt_tokens=1000",
    )
    assert result.exit_code == 0, result.output
    frame = pd.read_parquet(out / "results.parquet")
    assert list(frame["output_tokens"]) == [32, 16, 32, 8, 0]
    assert list(frame["prompt_tokens"]) == [512, 1000, 128, 1000, 64]
    result = invoke(
        "--trace", str(trace_file), "--out", str(out), "--transform", "max_output_tokens=0"
    )
    assert result.exit_code == 2 and "max_output_tokens" in said(result)
