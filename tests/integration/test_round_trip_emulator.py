"""The loop closed without a real engine: calibrate against the emulator, simulate, replay.

An emulated vLLM (llama-3.1-8b on an A100, vLLM's scheduler, half speed)
is measured from the client side by ``llmsched calibrate --target``, which
knows nothing of its cost model. The profile it writes then predicts, through
``llmsched simulate --profile``, a replay of 200 requests of the bundled
Azure conversation trace against the same emulator (``llmsched replay``, load
1, about 56 trace seconds). TTFT p50 and p90 of the prediction must be
within 5% of the replay's: what the calibration measured (the per-request
overhead of HTTP and the server's frontend included) is what the replay
meets, so nothing is left to explain.
"""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path

from tests.loopback import LLMSCHED, free_port, run_llmsched, stop_process, wait_healthy

TRACE = ["--trace", "bundled:azure-conv", "--transform", "max_requests=200"]
ENGINE = ["--model", "llama-3.1-8b", "--gpu", "a100", "--engine", "vllm"]
#: Half speed: the client's own costs (a loop wake-up, the JSON of a request)
#: shrink to half in engine seconds.
TIME_SCALE = "0.5"
#: Prompt lengths spanning the trace's (most of 200-3,000 tokens), fewer
#: decode runs than the default plan, so the calibration takes about a minute.
PLAN = ["--prompt-tokens", "64,256,1024,2048,4096", "--repeats", "2"]
PLAN += ["--streams", "1,4,16", "--stream-prompt-tokens", "256,1024", "--decode-tokens", "16"]
PLAN += ["--prefix-tokens", "1024", "--mixed-prompt-tokens", "256,1024"]


_cli = functools.partial(run_llmsched, timeout_s=300)


def test_a_profile_calibrated_on_the_emulator_predicts_its_replay(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(LLMSCHED), "emulate", "--protocol", "vllm", "--port", str(port), *ENGINE,
         "--time-scale", TIME_SCALE],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    profile, live, simulated = tmp_path / "profile.json", tmp_path / "live", tmp_path / "sim"
    try:
        assert wait_healthy([url], lambda: _alive(proc)), "emulate did not come up"
        cal = _cli(
            "calibrate", "--target", url, "--protocol", "openai", *ENGINE[:4],
            "--engine", "vllm", "--time-scale", TIME_SCALE, *PLAN, "-o", str(profile),
        )  # fmt: skip
        assert cal.returncode == 0, cal.stdout + cal.stderr
        done = _cli(
            "replay", *TRACE, "--target", url, "--protocol", "openai",
            "--time-scale", TIME_SCALE, "--out", str(live), "-q",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    finally:
        stop_process(proc)
    sim = _cli(
        "simulate", *TRACE, *ENGINE, "--profile", str(profile), "--out", str(simulated), "-q"
    )
    assert sim.returncode == 0, sim.stderr

    r = json.loads((live / "summary.json").read_text())
    s = json.loads((simulated / "summary.json").read_text())
    assert r["n_completed"] == s["n_completed"] == 200
    figures = {k: (s[k], r[k], r[k] / s[k] - 1) for k in ("ttft_p50_s", "ttft_p90_s", "e2e_p50_s")}
    note = "; ".join(
        f"{k} simulated {a * 1e3:.1f} ms, replayed {b * 1e3:.1f} ms ({d * 100:+.1f}%)"
        for k, (a, b, d) in figures.items()
    )
    fitted = json.loads(profile.read_text())["coefficients"]
    note += f"; fitted request overhead {fitted['request_overhead_s'] * 1e3:.2f} ms"
    print(note)
    for k in ("ttft_p50_s", "ttft_p90_s"):
        assert abs(figures[k][2]) <= 0.05, note


def _alive(proc: subprocess.Popen) -> None:
    assert proc.poll() is None, f"emulate exited: {proc.communicate()[1]}"
