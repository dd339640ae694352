"""Streaming records: the ITL histogram and the timeline."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sim.records import LogHistogram, Timeline


def test_arithmetic_sequence_lands_in_the_same_bins_as_adding_each_value():
    seq = LogHistogram()
    one_by_one = LogHistogram()
    first, step, n, weight = 0.0123, 3.7e-6, 5000, 7
    seq.add_arith(first, step, n, weight)
    for i in range(n):
        one_by_one.add(first + step * i, weight)
    assert seq.count == one_by_one.count == n * weight
    assert seq.sum == pytest.approx(one_by_one.sum, rel=1e-12)
    diff = np.abs(np.array(seq.counts) - np.array(one_by_one.counts))
    assert diff.sum() <= 2 * weight * 4  # at most a value or two on bin edges moves
    assert (seq.min, seq.max) == (first, pytest.approx(first + step * (n - 1)))


def test_decreasing_and_constant_sequences():
    h = LogHistogram()
    h.add_arith(0.02, -1e-6, 100)
    h.add_arith(0.5, 0.0, 10, 3)
    assert h.count == 130
    assert h.min == pytest.approx(0.02 - 99e-6)
    assert h.max == 0.5


def test_quantiles_are_within_bin_resolution():
    rng = np.random.default_rng(0)
    values = rng.lognormal(-4, 1, 20000)
    h = LogHistogram()
    for v in values:
        h.add(float(v))
    for q in (0.5, 0.9, 0.99):
        assert h.quantile(q) == pytest.approx(np.quantile(values, q), rel=0.012)
    assert h.mean == pytest.approx(values.mean(), rel=1e-12)
    assert math.isnan(LogHistogram().quantile(0.5))


def test_merge_adds_counts_and_refuses_other_binning():
    a, b = LogHistogram(), LogHistogram()
    a.add(0.01, 2)
    b.add(0.03)
    a.merge(b)
    assert (a.count, a.max) == (3, 0.03)
    with pytest.raises(ValueError, match="binning"):
        a.merge(LogHistogram(bins_per_decade=10))


def test_timeline_columns():
    t = Timeline()
    t.record(0.5, 1, 2, 3, 400)
    cols = t.columns()
    assert len(t) == 1
    assert cols["time_s"].tolist() == [0.5] and cols["kv_used_tokens"].dtype == np.int64
