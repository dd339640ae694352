"""The replay client against a real HTTP server on loopback: timing, records, prompts, failures."""

from __future__ import annotations

import asyncio
import socket
import time

import numpy as np
import pandas as pd
import pytest

from tests.unit.replay.mock_server import MockServer
from traces.records import RESULT_COLUMNS, RESULT_SCHEMA
from traces.replay import (
    Replay,
    ReplayConfig,
    lag_report,
    lag_warning,
    records_frame,
    run_replay,
)
from traces.tokenizer import WordTokenizer
from traces.trace import Trace

ENDPOINTS = [("openai", "completions"), ("openai", "chat"), ("sglang", "generate")]


def _trace(arrivals, prompt=20, output=8, **cols) -> Trace:
    n = len(arrivals)
    frame = pd.DataFrame(
        {
            "arrival_s": np.asarray(arrivals, dtype=float),
            "prompt_tokens": np.broadcast_to(prompt, n).copy(),
            "output_tokens": np.broadcast_to(output, n).copy(),
            **cols,
        }
    )
    return Trace(frame, name="test")


def _replay(trace: Trace, url: str, **kw) -> Replay:
    kw.setdefault("timeout_s", 20.0)
    replay = Replay(trace, ReplayConfig(url, **kw))
    run_replay(replay)
    return replay


def test_open_loop_sends_on_schedule_while_every_response_takes_a_second():
    arrivals = np.arange(30) * 0.05
    with MockServer(first_token_delay_s=1.0) as server:
        replay = _replay(_trace(arrivals, output=2), server.url)
    frame = records_frame(replay)
    assert (frame["outcome"] == "ok").all()
    lag = frame["send_s"] - frame["arrival_s"]
    assert lag.abs().median() < 0.005 and lag.abs().max() < 0.025, lag.describe()
    # The server saw them arrive on the schedule too, not one per answer.
    seen = np.array(sorted(s.at_s for s in server.seen))
    assert np.abs((seen - seen[0]) - arrivals).max() < 0.03
    assert frame["ttft_s"].min() >= 1.0
    # About 20 were in flight at once: the whole run took about 1.5 s + 1 s, not 30 s.
    assert replay.wall_s < 4.0
    assert lag_report(replay)["n_late"] == 0


@pytest.mark.parametrize(("protocol", "endpoint"), ENDPOINTS)
def test_records_have_the_schema_and_the_measured_values(protocol, endpoint):
    with MockServer(
        first_token_delay_s=0.1, token_gap_s=0.02, tokens_per_chunk=2, cached_tokens=4
    ) as server:
        replay = _replay(
            _trace([0.0, 0.01, 0.02]), server.url, protocol=protocol, endpoint=endpoint
        )
    frame = records_frame(replay)
    assert tuple(frame.columns) == RESULT_COLUMNS
    for col, dtype in RESULT_SCHEMA.items():
        assert str(frame[col].dtype) == dtype, col
    assert list(frame["outcome"]) == ["ok"] * 3
    assert list(frame["output_tokens"]) == [8] * 3
    assert list(frame["max_tokens"]) == [8] * 3
    assert list(frame["n_chunks"]) == [4] * 3
    assert list(frame["prompt_tokens"]) == [20] * 3
    assert list(frame["cached_tokens"]) == [4] * 3
    assert list(frame["http_status"]) == [200] * 3
    assert frame["ttft_s"].between(0.09, 0.25).all(), frame["ttft_s"]
    # 2 tokens a chunk, 20 ms apart: 10 ms per token.
    assert frame["itl_p50_s"].between(0.008, 0.02).all(), frame["itl_p50_s"]
    assert frame["tpot_s"].between(0.008, 0.03).all()
    assert 0.008 < replay.itl.quantile(0.5) < 0.02


@pytest.mark.parametrize(
    ("protocol", "endpoint", "fmt"),
    # Chat takes text only.
    [(p, e, f) for p, e in ENDPOINTS for f in ("ids", "text") if (e, f) != ("chat", "ids")],
)
def test_prompts_have_the_traces_lengths(protocol, endpoint, fmt):
    lengths = [1, 7, 64, 300]
    with MockServer() as server:
        _replay(
            _trace([0.0, 0.0, 0.0, 0.0], prompt=np.array(lengths), output=3),
            server.url,
            protocol=protocol,
            endpoint=endpoint,
            prompt_format=fmt,
        )
    got = {int(s.headers["x-request-id"]): s for s in server.seen}
    assert [got[i].prompt_tokens for i in range(4)] == lengths
    assert all((got[i].prompt_ids is not None) == (fmt == "ids") for i in range(4))
    # The output length is enforced as each protocol says it.
    body = got[0].body
    if endpoint == "generate":
        params = body["sampling_params"]
        assert (params["max_new_tokens"], params["min_new_tokens"], params["ignore_eos"]) == (
            3,
            3,
            True,
        )
    else:
        assert (body["max_tokens"], body["min_tokens"], body["ignore_eos"]) == (3, 3, True)
        assert body["stream_options"]["include_usage"] is True


@pytest.mark.parametrize(
    ("protocol", "endpoint"), [("sglang", "generate"), ("openai", "completions")]
)
def test_a_sessions_second_turn_starts_with_the_first_turns_prompt_and_response(protocol, endpoint):
    trace = _trace(
        [0.0, 0.4, 0.45],
        prompt=np.array([10, 30, 12]),
        output=5,
        session_id=["chat-1", "chat-1", None],
    )
    with MockServer() as server:
        replay = _replay(trace, server.url, protocol=protocol, endpoint=endpoint)
    got = {int(s.headers["x-request-id"]): s for s in server.seen}
    first, second, other = got[0].prompt_ids, got[1].prompt_ids, got[2].prompt_ids
    response = [(7 * j) % 4096 for j in range(5)]  # what the mock answered
    assert len(second) == 30
    assert second[:15] == first + response
    assert other[:10] != first  # an unrelated request shares nothing
    assert replay.prompts.early_turns == 0


def test_a_turn_due_before_its_previous_turn_finished_still_starts_with_its_prompt():
    trace = _trace([0.0, 0.05], prompt=np.array([10, 30]), output=5, session_id=["s", "s"])
    with MockServer(first_token_delay_s=0.5) as server:
        replay = _replay(trace, server.url, protocol="sglang")
    got = {int(s.headers["x-request-id"]): s for s in server.seen}
    assert got[1].at_s - got[0].at_s < 0.2  # sent on time, not after the answer
    assert got[1].prompt_ids[:10] == got[0].prompt_ids
    assert len(got[1].prompt_ids) == 30
    assert replay.prompts.early_turns == 1


def test_the_hint_headers_arrive_with_every_request():
    trace = _trace(
        [0.0, 0.0],
        session_id=["conv-9", None],
        slo_ttft_s=[0.25, np.nan],
    )
    with MockServer() as server:
        _replay(trace, server.url, slo_tpot_s=0.04)
    got = {int(s.headers["x-request-id"]): s.headers for s in server.seen}
    assert got[0]["x-session-id"] == "conv-9"
    assert got[0]["x-slo-ttft-ms"] == "250"
    assert "x-session-id" not in got[1] and "x-slo-ttft-ms" not in got[1]
    assert got[0]["x-slo-tpot-ms"] == got[1]["x-slo-tpot-ms"] == "40"


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_port_gives_error_outcomes_counted_by_kind():
    started = time.monotonic()
    replay = _replay(_trace(np.arange(10) * 0.01), f"http://127.0.0.1:{_dead_port()}")
    frame = records_frame(replay)
    assert (frame["outcome"] == "error").all()
    assert dict(replay.errors) == {"connection refused": 10}
    assert frame["error_message"].str.contains("refused").all()
    assert time.monotonic() - started < 5


def test_a_dead_target_is_given_up_after_the_connection_failures_allowed():
    replay = _replay(
        _trace(np.arange(50) * 0.01), f"http://127.0.0.1:{_dead_port()}", max_connect_errors=3
    )
    assert replay.errors["connection refused"] == 3
    assert "3 connection failures" in (replay.stopped_reason or "")
    assert len(records_frame(replay)) < 50  # the rest were never sent


def test_an_error_status_is_recorded_with_the_servers_message():
    with MockServer(status=503) as server:
        replay = _replay(_trace([0.0, 0.0]), server.url)
    frame = records_frame(replay)
    assert list(frame["outcome"]) == ["error", "error"]
    assert list(frame["http_status"]) == [503, 503]
    assert list(frame["error_message"]) == ["mock overloaded"] * 2
    assert dict(replay.errors) == {"HTTP 503": 2}


def test_a_request_that_takes_too_long_times_out():
    with MockServer(first_token_delay_s=3.0) as server:
        started = time.monotonic()
        replay = _replay(_trace([0.0]), server.url, timeout_s=0.3)
        assert time.monotonic() - started < 2.5
    assert list(records_frame(replay)["outcome"]) == ["timeout"]


def test_stopping_cancels_what_is_in_flight_and_keeps_the_records():
    trace = _trace([0.0, 0.0, 0.1, 5.0])
    with MockServer(first_token_delay_s=5.0) as server:
        replay = Replay(trace, ReplayConfig(server.url))

        async def main():
            asyncio.get_running_loop().call_later(0.4, replay.stop, "interrupted")
            await replay.run()

        started = time.monotonic()
        asyncio.run(main())
        assert time.monotonic() - started < 3
    frame = records_frame(replay)
    assert list(frame["outcome"]) == ["cancelled"] * 3  # the fourth was never sent
    assert frame["send_s"].notna().all()


def test_time_scale_runs_faster_and_records_stay_on_the_trace_clock():
    arrivals = np.arange(8) * 0.2
    with MockServer(first_token_delay_s=0.05) as server:
        replay = _replay(_trace(arrivals, output=2), server.url, time_scale=4.0, load=2.0)
    frame = records_frame(replay)
    # load 2 halves the trace's gaps; the records are in trace seconds.
    assert np.allclose(frame["arrival_s"], arrivals / 2)
    assert (frame["send_s"] - frame["arrival_s"]).abs().max() < 0.04
    # 50 ms of wall time is 200 ms of trace time.
    assert frame["ttft_s"].between(0.19, 0.4).all(), frame["ttft_s"]
    seen = np.array(sorted(s.at_s for s in server.seen))
    assert abs((seen[-1] - seen[0]) - 1.4 / 2 / 4) < 0.02


def test_requests_the_trace_marks_failed_are_recorded_failed_not_sent():
    trace = _trace([0.0, 0.0], failed=[False, True])
    with MockServer() as server:
        replay = _replay(trace, server.url)
    assert len(server.seen) == 1
    assert list(records_frame(replay)["outcome"]) == ["ok", "failed"]


def test_max_requests_and_duration_bound_what_is_sent():
    with MockServer() as server:
        a = _replay(_trace(np.arange(10) * 0.01), server.url, max_requests=4)
        b = _replay(_trace(np.arange(10) * 0.1), server.url, duration_s=0.35)
    assert len(records_frame(a)) == 4
    assert len(records_frame(b)) == 4


def test_the_builtin_tokenizer_is_the_default():
    replay = Replay(_trace([0.0]), ReplayConfig("http://127.0.0.1:1"))
    assert isinstance(replay.tokenizer, WordTokenizer)


def test_a_client_that_falls_behind_records_its_lag_and_says_so():
    import warnings

    from sim.cli.replay import _report

    trace = _trace(np.arange(20) * 0.01, output=1)
    with MockServer() as server:
        replay = Replay(trace, ReplayConfig(server.url))

        async def main():
            # Block the event loop for 150 ms: the requests due meanwhile leave late.
            asyncio.get_running_loop().call_later(0.06, time.sleep, 0.15)
            await replay.run()

        asyncio.run(main())
    frame = records_frame(replay)
    lag = frame["send_s"] - frame["arrival_s"]
    assert lag.max() > 0.08  # recorded per request, not hidden
    assert (frame["ttft_s"] >= lag).all()  # TTFT counts from the scheduled time
    report = lag_report(replay)
    assert report["n_late"] >= 5 and report["lag_max_s"] > 0.08
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _report(replay)
    text = " ".join(str(w.message) for w in caught)
    assert "fell behind its schedule" in text and f"{report['n_late']:,} of 20" in text
    # `llmsched fidelity` says the same, in the same words.
    assert lag_warning(report) in text
    assert lag_warning({**report, "n_late": 0}) is None


def test_a_request_is_sent_before_the_next_one_is_built():
    # Building a long prompt takes milliseconds; it must not hold back a request already due.
    class SlowBuild(Replay):
        def _prepare(self, i):
            if i > 0:
                time.sleep(0.1)
            return super()._prepare(i)

    with MockServer(first_token_delay_s=0.01) as server:
        replay = SlowBuild(_trace([0.0, 0.01]), ReplayConfig(server.url, timeout_s=20.0))
        run_replay(replay)
    frame = records_frame(replay)
    lag = (frame["send_s"] - frame["arrival_s"]).tolist()
    assert (frame["outcome"] == "ok").all()
    assert lag[0] < 0.03, lag  # not after the second request's 0.1 s build
