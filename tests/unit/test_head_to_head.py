"""The head-to-head's pure parts (bench/bench_head_to_head.py): figures, ranking, the table, flags."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_head_to_head as h2h


def records(rows) -> pd.DataFrame:
    """Result records from (arrival, ttft, tpot, output tokens, outcome) rows."""
    out = []
    for arrival, ttft, tpot, tokens, outcome in rows:
        out.append(
            {
                "arrival_s": arrival,
                "dispatch_s": arrival,
                "prefill_start_s": arrival,
                "first_token_s": arrival + ttft,
                "finish_s": arrival + ttft + tpot * tokens,
                "ttft_s": ttft,
                "tpot_s": tpot,
                "e2e_s": ttft + tpot * tokens,
                "prompt_tokens": 100,
                "cached_tokens": 0,
                "output_tokens": tokens,
                "outcome": outcome,
            }
        )
    df = pd.DataFrame(out)
    df["outcome"] = df["outcome"].astype("category")
    return df


def test_outcome_counts_slow_first_tokens_and_lost_requests_as_violations() -> None:
    nan = np.nan
    df = records(
        [
            (0.0, 9.0, 0.01, 10, "ok"),  # warm-up: first 10% of the span, not counted
            (10.0, 0.1, 0.01, 10, "ok"),
            (20.0, 0.5, 0.01, 10, "ok"),  # TTFT over 0.4 s
            (30.0, 0.2, 0.5, 10, "ok"),  # TTFT in time, TPOT too slow: not a TTFT violation
            (40.0, nan, nan, 0, "error"),  # never completed
            (50.0, nan, nan, 0, "failed"),  # failed in the trace: not counted
            (100.0, 0.3, 0.01, 10, "ok"),
        ]
    )
    o = h2h.outcome(df)
    assert o.n == 5
    assert o.violations == pytest.approx(2 / 5)
    # Goodput needs both SLOs: 10, 100 (30 misses TPOT); over the 90 s of measured arrivals.
    assert o.goodput_rps == pytest.approx(2 / 90)
    assert o.ttft_p50_s == pytest.approx(0.25)
    # 40 output tokens of completed requests from the first measured arrival (10 s) to the last finish.
    assert o.throughput_tok_s == pytest.approx(40 / (100.0 + 0.3 + 0.1 - 10.0))


def test_spearman_of_same_reversed_and_tied_orders() -> None:
    assert h2h.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert h2h.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert h2h.spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert math.isnan(h2h.spearman([1], [1]))
    with pytest.raises(ValueError, match="3 values against 2"):
        h2h.spearman([1, 2, 3], [1, 2])


def row(router: str, policy: str, live: tuple[float, float], sim: tuple[float, float]) -> dict:
    def o(v: float, g: float) -> h2h.Outcome:
        return h2h.Outcome(100, v, g, 0.1, 0.3, 1000.0, 1, 2, {})

    return h2h.row_of(router, policy, o(*live), o(*sim), {})


def test_ranking_and_laps_against_the_best_peer() -> None:
    rows = [
        row("sglang", "cache_aware", (0.10, 20.0), (0.05, 21.0)),
        row("vllm", "round_robin", (0.20, 22.0), (0.20, 18.0)),
        row("llmsched", "laps", (0.06, 25.0), (0.04, 23.0)),
        row("llmsched", "fcfs", (0.10, 19.0), (0.08, 20.0)),
    ]
    # Fewer violations first; a tie goes to more goodput.
    assert h2h.rank_policies(rows, "live") == [
        "llmsched:laps",
        "sglang:cache_aware",
        "llmsched:fcfs",
        "vllm:round_robin",
    ]
    assert h2h.rank_policies(rows, "sim")[0] == "llmsched:laps"
    vs = h2h.compare_to_peers(rows)
    assert vs is not None
    assert vs["best_peer_by_violations"] == "sglang:cache_aware"
    assert vs["best_peer_by_goodput"] == "vllm:round_robin"
    assert vs["violation_cut"] == pytest.approx(0.4)
    assert vs["goodput_gain"] == pytest.approx(25 / 22 - 1)
    assert vs["meets_violation_target"] and not vs["meets_goodput_target"]
    assert h2h.compare_to_peers(rows[2:]) is None  # no peer row


def test_table_marks_stand_ins_and_says_whether_the_orders_agree() -> None:
    rows = [
        row("sglang", "power_of_two", (0.30, 10.0), (0.20, 12.0)),
        row("llmsched", "laps", (0.10, 14.0), (0.10, 14.0)),
    ]
    text = h2h.table(rows)
    lines = text.splitlines()
    peer = next(x for x in lines if x.startswith("sglang:power_of_two"))
    assert "power_of_two*" in peer and "30.0%" in peer and "20.0%" in peer
    assert "live:      llmsched:laps > sglang:power_of_two" in text
    assert "Spearman rho 1.00; same order" in text
    assert "67% fewer violations than sglang:power_of_two (target 25% fewer: met)" in text
    assert "40% more goodput than sglang:power_of_two (target 20% more: met)" in text
    worse = h2h.table([rows[0], row("llmsched", "laps", (0.39, 9.0), (0.1, 14.0))])
    assert "30% more violations than sglang:power_of_two (target 25% fewer: missed)" in worse
    assert "10% less goodput than" in worse


def test_flags_reject_unknown_names_with_one_line() -> None:
    with pytest.raises(SystemExit, match="--routers: unknown 'sglang:laps'"):
        h2h._parse_routers("sglang:laps")
    assert h2h._parse_routers("vllm") == [
        ("vllm", "round_robin"),
        ("vllm", "cache_aware"),
        ("vllm", "power_of_two"),
    ]
    with pytest.raises(SystemExit, match="--topologies: unknown x3; expected any of"):
        h2h._parse_list("x4,x3", list(h2h.TOPOLOGIES), "--topologies", [])


def test_routers_commands_bind_loopback_and_scale_laps_time_constants() -> None:
    w = h2h.Workers([], ["http://127.0.0.1:1"], [9000], ["http://127.0.0.1:2"], [])
    ours = h2h.router_cmd("llmsched", "laps", 8000, w, scale=2.0)
    assert ours[ours.index("--host") + 1] == "127.0.0.1"
    assert "window_ms=3" in ours and "max_wait_ms=200" in ours
    assert ours[ours.index("--bootstrap-port") + 1] == "9000"
    peer = h2h.router_cmd("sglang", "bucket", 8000, w, scale=2.0)
    assert peer[peer.index("--prefill") + 1 : peer.index("--prefill") + 3] == [
        "http://127.0.0.1:1",
        "9000",
    ]
    assert peer[peer.index("--prefill-policy") + 1] == "bucket"
    assert "--pd-disaggregation" in peer and peer[peer.index("--host") + 1] == "127.0.0.1"
    assert peer[peer.index("--bucket-adjust-interval-secs") + 1] == "2"  # 5 s at scale 2


def test_router_records_place_live_misses_in_the_router_or_on_the_worker() -> None:
    df = records(
        [
            (0.0, 0.1, 0.01, 10, "ok"),
            (10.0, 0.9, 0.01, 10, "ok"),  # held 0.8 s (0.4 wall s at scale 2) by the router
            (20.0, 0.9, 0.01, 10, "ok"),  # dispatched at once: waited on the worker
            (100.0, 0.1, 0.01, 10, "ok"),
        ]
    )
    df["request_id"] = [1, 2, 3, 4]
    df["send_s"] = df["arrival_s"]
    df["dispatch_s"] = np.nan  # the replay cannot see it
    assert h2h.outcome(df).where == {}
    router = pd.DataFrame(
        {
            "x_request_id": pd.array(["1", "2", "3", "4"], dtype="string"),
            "router_queue_s": [0.0, 0.4, 0.0, 0.0],
        }
    )
    o = h2h.outcome(h2h.with_router_hold(df, router, scale=2.0))
    assert o.short_misses == 2
    assert o.where["short"]["router"] == 1 and o.where["short"]["prefill"] == 1
    assert h2h.misses(o) == "short 2 (router 1, prefill 1) long 0"


def test_knee_is_where_the_best_policy_in_seed_mean_leaves_90_percent(monkeypatch) -> None:
    # Attainment falls linearly with the rate; laps holds on longest, and seed 2 a bit worse.
    reach = {"fcfs": 20.0, "least_load": 20.0, "cache_aware": 30.0, "laps": 40.0}

    def fake_outcome(run) -> h2h.Outcome:
        policy, rate, seed = run
        attainment = max(0.0, 1.0 - 0.1 * rate / reach[policy] - 0.01 * (seed - 1))
        return h2h.Outcome(100, 1.0 - attainment, 0.0, 0.1, 0.2, 0.0, 0, 0, {})

    monkeypatch.setattr(h2h, "workload", lambda cell, rate, seed, cap, out: (rate, seed))
    monkeypatch.setattr(
        h2h, "simulate", lambda cell, tr, policy, seed, profile=None: (policy, tr[0], tr[1])
    )
    monkeypatch.setattr(h2h, "outcome", fake_outcome)
    cell = h2h.cell_of("chat", "x4", 30.0)
    knee, seen = h2h.find_knee(cell, [1, 2], 1000, 0, lambda msg: None)
    # laps's mean attainment 1 - rate/400 - 0.005 is 0.9 at rate 38.
    assert knee == pytest.approx(38.0, rel=0.02)
    assert all(max(a, key=a.__getitem__) == "laps" for a in seen.values())


def test_the_overhead_profile_delays_every_simulated_first_token_by_the_overhead(
    tmp_path: Path,
) -> None:
    import sim
    from scheduler.cost_model import CostModel
    from scheduler.profile import load_profile
    from traces.trace import Trace

    path = h2h.overhead_profile(h2h.MODEL, h2h.GPU, 0.004, tmp_path)
    profile = load_profile(path)
    catalogue = CostModel.from_names(h2h.MODEL, h2h.GPU, 1).coefficients
    assert profile.coefficients.request_overhead_s == 0.004
    assert profile.coefficients.weight_read_s == catalogue.weight_read_s
    # Two lone requests far apart: each first token comes exactly the overhead later.
    frame = pd.DataFrame({"arrival_s": [0.0, 5.0], "prompt_tokens": 100, "output_tokens": 4})
    trace = Trace(frame, name="lone")
    runs = [
        sim.run(trace, "fcfs", model=h2h.MODEL, gpu=h2h.GPU, profile=p).records
        for p in (None, path)
    ]
    delay = runs[1]["ttft_s"].to_numpy() - runs[0]["ttft_s"].to_numpy()
    assert delay == pytest.approx([0.004, 0.004], abs=1e-9)
