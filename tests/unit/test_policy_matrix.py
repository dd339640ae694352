"""The policy matrix's pure parts (bench/_matrix.py): knee search, flags, misses, cells."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from _matrix import (
    Cell,
    KneeSearch,
    interpolate_knee,
    miss_breakdown,
    parse_policy,
    select_cells,
)


def drive(search: KneeSearch, curve, seeds=(0.0,)) -> KneeSearch:
    """Feed ``search`` the curve's attainment (plus per-seed offsets) until it stops."""
    for _ in range(50):
        load = search.next_load()
        if load is None:
            return search
        search.add(load, [min(1.0, max(0.0, curve(load) + d)) for d in seeds])
    raise AssertionError("the search did not stop")


def logistic(knee: float, steep: float):
    """Attainment 0.9 at ``knee``, falling faster with larger ``steep``."""
    return lambda x: 1.0 / (1.0 + (x / knee) ** steep / 9.0)


def test_interpolation_is_linear_in_log_load():
    assert interpolate_knee(10.0, 0.95, 20.0, 0.85, 0.9) == pytest.approx(math.sqrt(200.0))
    assert interpolate_knee(10.0, 0.9, 20.0, 0.5, 0.9) == pytest.approx(10.0)


@pytest.mark.parametrize("guess", [1.0, 10.0, 100.0])
def test_search_finds_a_steep_knee_from_any_guess(guess):
    s = drive(KneeSearch(guess, tol=0.05, max_steps=8, max_bisect=6), logistic(12.0, 20.0))
    lo, hi = s.bracket()
    assert hi / lo <= 1.05
    assert s.knee == pytest.approx(12.0, rel=0.02)
    assert s.flags() == []
    assert len(s.points) <= 12


def test_a_flat_curve_is_flagged():
    s = drive(KneeSearch(10.0, max_bisect=4), logistic(12.0, 0.8))
    assert s.knee == pytest.approx(12.0, rel=0.1)
    assert s.shift_per_point() > 0.1
    assert "flat" in s.flags()


def test_a_cliff_and_a_rise_are_flagged():
    def cliff(x: float) -> float:
        if x > 15.0:
            return 0.99  # recovers at high load: non-monotone
        return 0.95 if x < 11.0 else 0.7

    s = drive(KneeSearch(10.0, step=1.3, tol=0.05, max_bisect=6), cliff)
    s.add(20.0, [cliff(20.0)])
    assert s.knee == pytest.approx(11.0, rel=0.06)
    assert {"cliff", "nonmono"} <= set(s.flags())


def test_noisy_seeds_are_flagged():
    s = drive(KneeSearch(10.0), logistic(12.0, 20.0), seeds=(-0.08, 0.08))
    assert "noisy" in s.flags()


def test_out_of_range_knees():
    low = drive(KneeSearch(10.0, max_steps=3), lambda x: 0.5)
    assert low.knee == 0.0
    assert "low" in low.flags()
    assert min(low.points) == pytest.approx(10.0 / 1.6**3)
    high = drive(KneeSearch(10.0, max_steps=3), lambda x: 0.99)
    assert high.knee is None
    assert "high" in high.flags()


def test_parse_policy():
    row = parse_policy("laps  mode=temporal window_ms=0 graph_buckets=false")
    assert row.label == "laps mode=temporal window_ms=0 graph_buckets=false"
    assert row.name == "laps" and row.is_laps
    assert dict(row.params) == {"mode": "temporal", "window_ms": 0, "graph_buckets": False}
    assert not parse_policy("least_load").is_laps
    with pytest.raises(ValueError, match="key=value"):
        parse_policy("laps temporal")


def records(rows):
    cols = [
        "arrival_s",
        "dispatch_s",
        "prefill_start_s",
        "first_token_s",
        "ttft_s",
        "tpot_s",
        "e2e_s",
        "prompt_tokens",
        "cached_tokens",
        "outcome",
    ]
    df = pd.DataFrame(rows, columns=cols)
    df["outcome"] = df["outcome"].astype("category")
    return df


def test_miss_breakdown_places_each_miss():
    nan = np.nan
    df = records(
        [
            # warm-up (first 10% of the span): not counted
            (0.0, 0.0, 5.0, 5.1, 5.1, 0.01, 6.0, 100, 0, "ok"),
            # short, met
            (10.0, 10.0, 10.0, 10.1, 0.1, 0.01, 1.0, 100, 0, "ok"),
            # short, held by the router
            (20.0, 20.5, 20.5, 20.6, 0.6, 0.01, 1.6, 300, 100, "ok"),
            # long, waited on the instance
            (30.0, 30.0, 30.4, 30.5, 0.5, 0.01, 1.5, 2000, 0, "ok"),
            # long, its own prefill too slow
            (40.0, 40.0, 40.0, 40.6, 0.6, 0.01, 1.6, 4000, 0, "ok"),
            # long, first token in time, decode too slow
            (50.0, 50.0, 50.0, 50.2, 0.2, 0.5, 9.0, 2000, 0, "ok"),
            # long, never served
            (60.0, nan, nan, nan, nan, nan, nan, 9000, 0, "rejected"),
            # flagged failed by the trace: not counted
            (70.0, nan, nan, nan, nan, nan, nan, 100, 0, "failed"),
            (100.0, 100.0, 100.0, 100.1, 0.1, 0.01, 1.0, 100, 0, "ok"),
        ]
    )
    m = miss_breakdown(df, slo_ttft_s=0.4, slo_tpot_s=0.1, short_tokens=256)
    assert m["n"] == 7 and m["met"] == 2
    assert (m["n_short"], m["miss_short"]) == (3, 1)
    assert (m["n_long"], m["miss_long"]) == (4, 4)
    assert m["where"]["short"] == {"router": 1, "queue": 0, "prefill": 0, "tpot": 0, "unserved": 0}
    assert m["where"]["long"] == {"router": 0, "queue": 1, "prefill": 1, "tpot": 1, "unserved": 1}
    assert m["span_s"] == pytest.approx(90.0)


def cell(**kw) -> Cell:
    base = dict(
        model="qwen2.5-32b",
        gpu="h200",
        short="qwen32b-h200",
        workload="bundled:azure-code",
        cv=None,
        instances=4,
        pd=None,
        guess_rps=10.0,
        span_s=240.0,
        native_rps=2.5,
        native_span_s=3400.0,
    )
    return Cell(**(base | kw))


def test_cells_make_traces_of_the_asked_span():
    c = cell()
    assert c.id == "qwen32b-h200/azure-code/x4"
    assert c.n_requests(10.0, cap=8000) == 2400
    assert c.n_requests(100.0, cap=8000) == 8000
    assert c.n_requests(0.1, cap=8000) == 400
    for seed in range(4):
        t = c.trace(10.0, seed, cap=8000)
        start, end = t["transforms"]["window_s"]
        assert start >= 0.0 and end <= c.native_span_s + 1.0
        assert t["transforms"]["rate_rps"] == 10.0
    assert c.trace(10.0, 1, 8000) != c.trace(10.0, 2, 8000)
    chat = cell(workload="chat", cv=4.0, pd="1:3")
    assert chat.id == "qwen32b-h200/chat-cv4/pd1:3"
    params = chat.trace(5.0, 1, cap=8000)["generator"]["params"]
    assert params == {"n_requests": 1200, "rate_rps": 5.0, "cv": 4.0}
    picked = select_cells([c, chat], ["*/chat-*/*"])
    assert picked == [chat]
    assert select_cells([c, chat], None) == [c, chat]
