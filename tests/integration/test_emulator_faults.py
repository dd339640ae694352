"""Fault injection: each ``--fault-*`` of the emulator is what a client sees, and the replay counts it by kind.

Every test serves a real emulator on loopback (a background thread, or
``llmsched emulate`` as a process for the crash) and plays a small trace
against it with the replay client, or sends plain requests with httpx.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from sim.emulator import EmulatorConfig, running_in_thread
from sim.emulator.faults import CRASH_EXIT_STATUS, FaultSpec
from tests.loopback import free_port, wait_healthy
from traces.errors import ConfigError
from traces.records import OUTCOME_ERROR, OUTCOME_OK, OUTCOME_TIMEOUT
from traces.replay import Replay, ReplayConfig, run_replay
from traces.trace import Trace

LLMSCHED = Path(sys.executable).with_name("llmsched")
TIME_SCALE = 10.0  # the emulated GPU runs ten times faster than real time


def _trace(n: int, gap_s: float = 0.5, output_tokens: int = 8) -> Trace:
    frame = pd.DataFrame(
        {
            "arrival_s": np.arange(n) * gap_s,
            "prompt_tokens": np.full(n, 64),
            "output_tokens": np.full(n, output_tokens),
        }
    )
    return Trace(frame, name="faults")


def _config(faults: FaultSpec, protocol: str = "vllm") -> EmulatorConfig:
    return EmulatorConfig(
        protocol=protocol, time_scale=TIME_SCALE, port=free_port(), faults=faults, seed=7
    )


def _replay(url: str, trace: Trace, protocol: str = "openai", **kw: object) -> Replay:
    cfg = ReplayConfig(target_url=url, protocol=protocol, time_scale=TIME_SCALE, **kw)  # type: ignore[arg-type]
    return run_replay(Replay(trace, cfg))


def _url(srv: object) -> str:
    return f"http://127.0.0.1:{srv.ports[0]}"  # type: ignore[attr-defined]


@pytest.mark.parametrize(("protocol", "replayed"), [("vllm", "openai"), ("sglang", "sglang")])
def test_an_error_rate_answers_that_share_with_the_status_and_the_replay_counts_them(
    protocol: str, replayed: str
) -> None:
    spec = FaultSpec(error_rate=0.3, error_status=503, seed=7)
    n = 40
    # The draws are the spec's alone: the requests that fail are known before any is sent.
    expected = sum(spec.draws(0, k)[0] for k in range(n))
    assert 0 < expected < n
    with running_in_thread(_config(spec, protocol)) as srv:
        run = _replay(_url(srv), _trace(n, gap_s=0.2), replayed)
    frame_status = run.m.http_status
    assert run.errors == {"HTTP 503": expected}
    assert int((run.m.outcome == OUTCOME_OK).sum()) == n - expected
    assert int((frame_status == 503).sum()) == expected
    assert all(
        "emulated fault" in (m or "")
        for m, s in zip(run.m.error_message, frame_status, strict=True)
        if s == 503
    )


def test_injected_errors_have_each_servers_body_and_repeat_for_a_seed() -> None:
    def statuses(protocol: str, seed: int, path: str, body: dict) -> tuple[list[int], list[dict]]:
        spec = FaultSpec(error_rate=0.5, error_status=429, seed=seed)
        with (
            running_in_thread(_config(spec, protocol)) as srv,
            httpx.Client(base_url=_url(srv), timeout=10) as c,
        ):
            got = [c.post(path, json=body) for _ in range(16)]
            assert c.get("/health").status_code == 200  # only generation requests draw faults
        return [r.status_code for r in got], [r.json() for r in got if r.status_code == 429]

    completion = {"prompt": "a b c", "max_tokens": 2}
    first, bodies = statuses("vllm", 1, "/v1/completions", completion)
    assert set(first) == {200, 429}
    assert statuses("vllm", 1, "/v1/completions", completion)[0] == first
    assert statuses("vllm", 2, "/v1/completions", completion)[0] != first
    err = bodies[0]["error"]
    assert err["code"] == 429 and err["type"] == "TooManyRequestsError" and err["param"] is None
    _, sg = statuses("sglang", 1, "/v1/completions", completion)
    assert sg[0]["object"] == "error" and sg[0]["code"] == 429 and "message" in sg[0]
    generate = {"text": "a b c", "sampling_params": {"max_new_tokens": 2}}
    _, gen = statuses("sglang", 1, "/generate", generate)
    assert set(gen[0]) == {"error"} and "message" in gen[0]["error"]


def test_a_latency_spike_adds_its_seconds_before_the_first_token() -> None:
    spike_s = 2.0  # emulated seconds: 0.2 s of wall time at the time scale
    with running_in_thread(_config(FaultSpec())) as srv:
        calm = _replay(_url(srv), _trace(6))
    with running_in_thread(_config(FaultSpec(spike_rate=1.0, spike_s=spike_s))) as srv:
        spiked = _replay(_url(srv), _trace(6))
    calm_ttft = calm.m.first * TIME_SCALE - calm.plan.arrival_s
    spiked_ttft = spiked.m.first * TIME_SCALE - spiked.plan.arrival_s
    assert (spiked.m.outcome == OUTCOME_OK).all()
    added = spiked_ttft - calm_ttft
    assert (added > spike_s * 0.95).all() and (added < spike_s * 1.25).all(), added


def test_a_hang_after_n_requests_accepts_and_never_answers_so_the_replay_times_out() -> None:
    with running_in_thread(_config(FaultSpec(hang_after=3))) as srv:
        run = _replay(_url(srv), _trace(6), timeout_s=1.0)
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(_url(srv) + "/health", timeout=0.5)  # the hung server answers nothing
    assert run.m.outcome.tolist() == [OUTCOME_OK] * 3 + [OUTCOME_TIMEOUT] * 3
    assert run.errors == {"timeout": 3}


def test_a_slow_stream_holds_every_chunk() -> None:
    delay_s = 0.5  # emulated: 50 ms of wall time per chunk
    with running_in_thread(_config(FaultSpec())) as srv:
        calm = _replay(_url(srv), _trace(4, gap_s=2.0))
    with running_in_thread(_config(FaultSpec(chunk_delay_s=delay_s))) as srv:
        slow = _replay(_url(srv), _trace(4, gap_s=2.0))
    assert (slow.m.outcome == OUTCOME_OK).all() and (slow.m.output_tokens == 8).all()
    calm_e2e = calm.m.finish * TIME_SCALE - calm.plan.arrival_s
    slow_e2e = slow.m.finish * TIME_SCALE - slow.plan.arrival_s
    # Every write waits its delay (token chunks, then usage and [DONE]); tokens made meanwhile
    # ride in the next chunk, so the stream has fewer, fuller chunks.
    added, chunks = slow_e2e - calm_e2e, slow.m.n_chunks
    assert (added >= chunks * delay_s * 0.95).all(), (added, chunks)
    assert (added <= (chunks + 2) * delay_s * 1.1).all(), (added, chunks)
    assert (chunks < calm.m.n_chunks).all()


@pytest.mark.parametrize(("protocol", "replayed"), [("vllm", "openai"), ("sglang", "sglang")])
def test_a_cut_stream_closes_after_k_chunks_and_the_replay_calls_it_a_cut(
    protocol: str, replayed: str
) -> None:
    with running_in_thread(_config(FaultSpec(cut_after_chunks=3), protocol)) as srv:
        run = _replay(_url(srv), _trace(5), replayed)
        # The instance keeps serving after cutting: a plain request gets its three chunks, then EOF.
        path = "/v1/completions" if protocol == "vllm" else "/generate"
        body = (
            {"prompt": "a b", "max_tokens": 8, "stream": True}
            if protocol == "vllm"
            else {"text": "a b", "stream": True, "sampling_params": {"max_new_tokens": 8}}
        )
        with (
            pytest.raises(httpx.RemoteProtocolError),
            httpx.stream("POST", _url(srv) + path, json=body, timeout=10) as r,
        ):
            lines = []
            for line in r.iter_lines():
                lines.append(line)
    assert sum(1 for x in lines if x.startswith("data: {")) == 3
    assert run.m.outcome.tolist() == [OUTCOME_ERROR] * 5
    assert run.errors == {"stream cut": 5}
    assert run.m.n_chunks.tolist() == [3] * 5


def test_a_crash_after_n_requests_ends_the_process_and_the_replay_counts_what_followed() -> None:
    port = free_port()
    cmd = [str(LLMSCHED), "emulate", "--port", str(port), "--time-scale", str(TIME_SCALE)]
    cmd += ["--fault-crash-after", "4", "--fault-error-rate", "0.25", "--fault-status", "500"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def alive() -> None:
            assert proc.poll() is None, proc.communicate()[1]

        assert wait_healthy([url], alive), "emulate did not come up"
        run = _replay(url, _trace(8))
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == CRASH_EXIT_STATUS
    assert "emulated crash at generation request 5" in err and "Traceback" not in err
    spec = FaultSpec(error_rate=0.25, error_status=500, seed=0)
    failed = [spec.draws(0, k)[0] for k in range(4)]
    first4 = run.m.outcome[:4].tolist()
    assert first4 == [OUTCOME_ERROR if f else OUTCOME_OK for f in failed]
    assert (run.m.outcome[4:] == OUTCOME_ERROR).all()
    # The fifth request dies with the process (on a kept-alive connection the client tries once
    # more, and is refused, as the rest are: no one listens any more).
    assert run.errors["connection lost"] + run.errors["connection refused"] == 4, run.errors
    assert run.errors.get("HTTP 500", 0) == sum(failed)


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"error_rate": 1.5}, "--fault-error-rate"),
        ({"error_status": 200}, "--fault-status"),
        ({"spike_s": -1.0}, "--fault-spike-s"),
        ({"hang_after": -1}, "--fault-hang-after"),
    ],
)
def test_a_bad_fault_names_its_flag(kwargs: dict, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        FaultSpec(**kwargs)
