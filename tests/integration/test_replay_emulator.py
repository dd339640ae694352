"""Emulator equals simulator under load: a bundled trace replayed against ``llmsched emulate`` is ``llmsched simulate``.

The first 300 requests of the bundled Azure conversation trace (84 trace
seconds, 3.6 requests/s, prompts of about 1,000 tokens and answers of about
200) go, as three console commands, to one emulated vLLM (llama-3.1-8b on
an A100, SGLang's default limits) by ``llmsched replay`` at load 1, both at
time scale 2.5 (the run takes about 40 s), and through ``llmsched
simulate`` with the same model, GPU, limits and load. That is a moderate
load: batches of a dozen, TTFT p50 about 90 ms, p90 about 280 ms, TPOT
about 18 ms. ``llmsched report`` puts both folders side by side.

What agrees within 5%: E2E p50 and p90 (within a few tenths of a percent)
and, in most runs, TTFT p90 (+4% or less, with little margin on a busy
machine). What does not: TTFT p50 is about 7 ms of trace time late (8%
at this time scale), and the test measures why from the records: the
client leaves a median 1.2 wall ms after the scheduled instant (asyncio
wakes on whole milliseconds, then a task is started; TTFT counts from the
scheduled time, as an open-loop client must), and from the send to the
first token it takes a median 0.7 wall ms more than the engine's own TTFT
(the request's HTTP and JSON, the step timer's wake-up, the chunk's way
back). Both are wall time, so the time scale multiplies them: about 5 ms
of the trace clock on a TTFT of 91 ms. The assertions on TTFT p50 and p90
are therefore that the offset is no more than what the two measured
overheads account for (plus 5% of the simulator's figure); E2E is held to
5% flat. The message prints every figure.
"""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd

from tests.loopback import LLMSCHED, free_port, run_llmsched, stop_process, wait_healthy

TRACE = ["--trace", "bundled:azure-conv", "--transform", "max_requests=300"]
ENGINE = ["--model", "llama-3.1-8b", "--gpu", "a100"]
TIME_SCALE = "2.5"


_cli = functools.partial(run_llmsched, timeout_s=180)


def _replayed(out: Path) -> None:
    port = free_port()
    cmd = [str(LLMSCHED), "emulate", "--protocol", "vllm", "--port", str(port), *ENGINE]
    proc = subprocess.Popen(
        [*cmd, "--time-scale", TIME_SCALE],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_healthy([url], lambda: _alive(proc)), "emulate did not come up"
        done = _cli(
            "replay", *TRACE, "--target", url, "--protocol", "openai",
            "--time-scale", TIME_SCALE, "--out", str(out), "-q",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    finally:
        stop_process(proc)


def _alive(proc: subprocess.Popen) -> None:
    assert proc.poll() is None, f"emulate exited: {proc.communicate()[1]}"


def test_a_replayed_trace_has_the_simulators_ttft_and_e2e(tmp_path: Path) -> None:
    live, simulated = tmp_path / "replay", tmp_path / "sim"
    _replayed(live)
    sim = _cli("simulate", *TRACE, *ENGINE, "--out", str(simulated), "-q")
    assert sim.returncode == 0, sim.stderr
    report = _cli("report", str(live), str(simulated), "--out", str(tmp_path / "report"), "-q")
    assert report.returncode == 0, report.stderr
    table = pd.read_csv(tmp_path / "report" / "summary.csv")
    assert sorted(table["source"]) == ["replay", "sim"], table["source"].tolist()
    rows = {r["source"]: r for _, r in table.iterrows()}
    for key in ("n_requests", "n_completed"):
        assert rows["replay"][key] == rows["sim"][key] == 300

    r = json.loads((live / "summary.json").read_text())
    s = json.loads((simulated / "summary.json").read_text())
    records = pd.read_parquet(live / "results.parquet").sort_values("request_id")
    predicted = pd.read_parquet(simulated / "results.parquet").sort_values("request_id")
    assert records["request_id"].tolist() == predicted["request_id"].tolist()
    send_lag = float(np.median(records["send_s"] - records["arrival_s"]))
    from_send = float(
        np.median(
            (records["first_token_s"] - records["send_s"]).to_numpy()
            - predicted["ttft_s"].to_numpy()
        )
    )
    figures = {
        k: (s[k], r[k], r[k] / s[k] - 1)
        for k in ("ttft_p50_s", "ttft_p90_s", "e2e_p50_s", "e2e_p90_s")
    }
    note = "; ".join(
        f"{k} simulated {a * 1e3:.1f} ms, replayed {b * 1e3:.1f} ms ({d * 100:+.1f}%)"
        for k, (a, b, d) in figures.items()
    ) + (
        f"; median send lag {send_lag * 1e3:.2f} ms and median excess from send to first token "
        f"{from_send * 1e3:.2f} ms (trace clock, time scale {TIME_SCALE})"
    )
    for k in ("e2e_p50_s", "e2e_p90_s"):
        assert abs(figures[k][2]) <= 0.05, note
    # TTFT: within 5%, plus the client's own measured overhead (send lag and
    # loopback HTTP), which the simulator does not model and which shifts
    # every request's TTFT by about the same wall time.
    client_s = max(send_lag, 0) + max(from_send, 0)
    for k in ("ttft_p50_s", "ttft_p90_s"):
        off = r[k] - s[k]
        assert -0.05 * s[k] <= off <= 0.05 * s[k] + client_s, note
    print(note)
