"""What the live measurement makes of streams it timed: rows, dropped pairs, refusals."""

from __future__ import annotations

import asyncio

import pytest

from sim.live_calibration import (
    Measurement,
    MeasurePlan,
    _Answer,
    _probe_row,
    _steady_gaps,
    _ttft_rows,
)
from traces.errors import ConfigError
from traces.replay.protocol import StreamState
from traces.tokenizer import WordTokenizer


def _answer(sent_s: float, times_s: list[float], cached: int = 0) -> _Answer:
    state = StreamState("completions", WordTokenizer())
    state.cached_tokens = cached
    return _Answer(sent_s, times_s, [1] * len(times_s), state)


class _FakeServer:
    """Answers after ``overhead + per_token * new tokens``; caches prefixes it has seen."""

    url = "http://fake"

    def __init__(self, *, report_cached: bool, caches: bool = True) -> None:
        self.report_cached, self.caches = report_cached, caches
        self.seen: list[list[int]] = []
        self._next = 0

    def fresh_ids(self, n: int) -> list[int]:
        self._next += n
        return list(range(self._next - n, self._next))

    async def send(self, ids: list[int], max_tokens: int, on_token=None) -> _Answer:
        cached = 0
        if self.caches:
            for old in self.seen:
                if ids[: len(old)] == old:
                    cached = max(cached, len(old))
        self.seen.append(ids)
        ttft = 0.010 + 1e-4 * (len(ids) - cached)
        return _answer(0.0, [ttft], cached if self.report_cached else 0)


def _rows(server: _FakeServer) -> Measurement:
    plan = MeasurePlan(prompt_tokens=(64, 512), repeats=1, prefix_tokens=(512,), suffix_tokens=32)
    out = Measurement()
    asyncio.run(_ttft_rows(server, plan, 1.0, out))  # type: ignore[arg-type]
    return out


def test_a_reported_prefix_hit_becomes_a_cached_row() -> None:
    out = _rows(_FakeServer(report_cached=True))
    cached = [r for r in out.rows if r["cached_tokens"]]
    assert cached == [
        {
            "kind": "ttft",
            "batch_size": 1,
            "new_tokens": 32,
            "cached_tokens": 512,
            "latency_s": 0.0132,
        }
    ]
    assert not out.notes


def test_an_unreported_prefix_hit_is_dropped_not_read_as_an_uncached_prompt() -> None:
    out = _rows(_FakeServer(report_cached=False))
    assert [r["new_tokens"] for r in out.rows] == [64, 512]  # no 544-token "fresh" row
    assert "reported no cached tokens" in out.notes[0]


def test_a_server_without_a_prefix_cache_gives_uncached_rows() -> None:
    out = _rows(_FakeServer(report_cached=True, caches=False))
    assert [r["new_tokens"] for r in out.rows] == [64, 512, 544]
    assert "cached no repeated prefix" in out.notes[0]


def test_a_hit_on_a_fresh_prompt_is_refused() -> None:
    class Liar(_FakeServer):
        async def send(self, ids, max_tokens, on_token=None):
            return _answer(0.0, [0.02], cached=16)

    with pytest.raises(ConfigError, match=r"16 cached tokens for a prompt of 64 random token ids"):
        _rows(Liar(report_cached=True))


def test_decode_gaps_are_taken_while_every_stream_decodes() -> None:
    # Stream a's first gap (40 ms) holds b's prefill; after it both decode in 20 ms steps.
    a = _answer(0.0, [0.03] + [0.07 + 0.02 * k for k in range(9)])
    b = _answer(0.0, [0.07 + 0.02 * k for k in range(10)])
    gaps, _index = _steady_gaps([a, b])
    assert gaps == pytest.approx([0.02] * len(gaps)) and len(gaps) >= 14


def _stream_with_step(step_at: float, step_s: float, decode_s: float = 0.02) -> list[float]:
    times, t = [], 0.1
    while t < 0.6:
        times.append(t)
        t += step_s if abs(t - step_at) < 1e-9 else decode_s
    return times


@pytest.mark.parametrize("late_s", [0.0, 0.006])
def test_a_vllm_mixed_step_is_read_from_the_gap_around_the_probe(late_s: float) -> None:
    # The probe, sent at 0.205 s, rides in the 50 ms step after the token at 0.22 s.
    times = _stream_with_step(0.22, 0.05)
    # One token delivered late (the server busy taking the probe in) shifts the gaps, not their sum.
    times = [t + late_s if abs(t - 0.22) < 1e-9 else t for t in times]
    probe = _answer(0.205, [0.27])
    row = _probe_row([_answer(0.0, times)], probe, 256, 64, "vllm", 1.0)
    assert row is not None and row["kind"] == "mixed" and row["decode_seqs"] == 1
    assert row["latency_s"] == pytest.approx(0.05, rel=0.01)


def test_an_sglang_prefill_step_is_the_gap_less_a_decode_step() -> None:
    # SGLang alternates: the 30 ms prefill runs, then a 20 ms decode step.
    times = _stream_with_step(0.22, 0.05)
    probe = _answer(0.205, [0.25])
    row = _probe_row([_answer(0.0, times)], probe, 256, 64, "sglang", 1.0)
    assert row == {
        "kind": "prefill",
        "batch_size": 1,
        "new_tokens": 256,
        "latency_s": pytest.approx(0.03, rel=0.01),
    }
