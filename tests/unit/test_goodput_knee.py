"""bench/bench_goodput_knee.py: the figures that show where goodput goes at the knee."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_goodput_knee as gk
from _matrix import overhead_profile, parse_policy
from bench_head_to_head import GPU, MODEL, cell_of


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    cell = cell_of("chat", "x4", 10.0)
    profile = overhead_profile(MODEL, GPU, 0.0017, tmp_path_factory.mktemp("profile"))
    return cell, profile


def test_a_pool_too_small_for_its_prefills_shows_as_the_worst_instance(setting):
    cell, profile = setting
    balanced = gk.run_one(cell, 44.37, 1, parse_policy("laps"), profile, {})
    starved = gk.run_one(
        cell,
        44.37,
        1,
        parse_policy(
            "laps mode=spatial short_share=0.75 threshold_tokens=2048 rebalance_ratio=100"
        ),
        profile,
        {},
    )
    for figures in (balanced, starved):
        assert 0.0 < figures["prefill_share"] <= figures["worst_share"] <= 1.0
        assert 0.0 <= figures["violations"] <= 1.0 and figures["goodput"] > 0.0
    # One long instance of four takes every prompt past 2,048 uncached tokens:
    # it prefills nearly all the time and its queue runs seconds deep.
    assert starved["worst_share"] > 0.9 > balanced["worst_share"]
    assert starved["worst_ttft_p90_s"] > 2.0 > balanced["worst_ttft_p90_s"]


def test_an_engine_limit_reaches_the_simulated_engine(setting):
    cell, profile = setting
    row = parse_policy("cache_aware")
    plain = gk.run_one(cell, 44.37, 1, row, profile, {})
    mixed = gk.run_one(cell, 44.37, 1, row, profile, {"enable_mixed_chunk": True})
    # Mixed steps carry the decodes: no step is a prefill step alone.
    assert plain["prefill_share"] > 0.3
    assert mixed["prefill_share"] < plain["prefill_share"]
    assert mixed["goodput"] != plain["goodput"]


def test_a_limit_without_a_value_is_refused(capsys):
    with pytest.raises(SystemExit):
        gk.main(["--limit", "enable_mixed_chunk", "--spans", "5"])
    assert "expected KEY=VALUE" in capsys.readouterr().err
