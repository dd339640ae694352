"""A pooled distribution kept while a run goes: the inter-token-latency histogram.

:class:`LogHistogram` counts samples in log-spaced bins (quantiles exact to
about 1 %; count, sum, min and max exact). A stretch of simulated decode
steps adds its arithmetic sequence of durations in time proportional to the
bins it spans, not to its length; a live writer adds each gap as it sees
it. :mod:`traces.metrics` reads any :class:`QuantileSketch` for the run's
ITL percentiles.
"""

from __future__ import annotations

import math
from array import array
from typing import Protocol

import numpy as np

__all__ = ["LogHistogram", "QuantileSketch"]


class QuantileSketch(Protocol):
    """A pooled distribution a writer kept while running (the ITL histogram)."""

    @property
    def mean(self) -> float: ...

    def quantile(self, q: float) -> float: ...


class LogHistogram:
    """Counts in log-spaced bins, with exact count, sum, min and max.

    Bins span ``[lo, lo * 10**decades)`` with ``bins_per_decade`` bins a
    decade (200: each bin is 1.2 % wide), plus an underflow and an overflow
    bin. Quantiles interpolate geometrically inside a bin.

    Samples are buffered in typed arrays and binned with numpy in bulk
    (every ``flush_every`` entries, and before any read), so adding costs a
    few appends.
    """

    __slots__ = (
        "_a_first",
        "_a_n",
        "_a_step",
        "_a_weight",
        "_count",
        "_counts",
        "_flush_every",
        "_inv_width",
        "_log_lo",
        "_max",
        "_min",
        "_n_bins",
        "_p_value",
        "_p_weight",
        "_sum",
        "bins_per_decade",
        "lo",
    )

    def __init__(
        self,
        lo: float = 1e-6,
        decades: int = 10,
        bins_per_decade: int = 200,
        *,
        flush_every: int = 1 << 16,
    ) -> None:
        self.lo = lo
        self.bins_per_decade = bins_per_decade
        self._n_bins = decades * bins_per_decade
        self._log_lo = math.log10(lo)
        self._inv_width = float(bins_per_decade)
        self._flush_every = flush_every
        # Index 0 is underflow, 1.._n_bins the bins, _n_bins + 1 overflow.
        self._counts = np.zeros(self._n_bins + 2, dtype=np.int64)
        self._count = 0
        self._sum = 0.0
        self._min = math.inf
        self._max = -math.inf
        self._p_value, self._p_weight = array("d"), array("q")
        self._a_first, self._a_step = array("d"), array("d")
        self._a_n, self._a_weight = array("q"), array("q")

    # -- adding ------------------------------------------------------------------

    def add(self, value: float, weight: int = 1) -> None:
        """Add ``weight`` samples equal to ``value``."""
        self._p_value.append(value)
        self._p_weight.append(weight)
        if len(self._p_value) >= self._flush_every:
            self._flush()

    def add_arith(self, first: float, step: float, n: int, weight: int = 1) -> None:
        """Add ``weight`` samples of each ``first + step * i`` for ``i`` in ``range(n)``."""
        if n <= 0:
            return
        if n == 1 or step == 0.0:
            self.add(first, weight * n)
            return
        self._a_first.append(first)
        self._a_step.append(step)
        self._a_n.append(n)
        self._a_weight.append(weight)
        if len(self._a_n) >= self._flush_every:
            self._flush()

    def merge(self, other: LogHistogram) -> None:
        """Add another histogram's samples (same binning) to this one."""
        if (other.lo, other._n_bins, other.bins_per_decade) != (
            self.lo,
            self._n_bins,
            self.bins_per_decade,
        ):
            raise ValueError("histograms differ in binning")
        other._flush()
        self._flush()
        self._counts += other._counts
        self._count += other._count
        self._sum += other._sum
        self._min = min(self._min, other._min)
        self._max = max(self._max, other._max)

    # -- binning -------------------------------------------------------------------

    def _bins(self, values: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            idx = np.floor((np.log10(values) - self._log_lo) * self._inv_width) + 1
        idx = np.where(values < self.lo, 0, np.minimum(idx, self._n_bins + 1))
        return idx.astype(np.int64)

    def _upper(self, index: int) -> float:
        """Upper edge of bin ``index`` (inf for the overflow bin)."""
        if index > self._n_bins:
            return math.inf
        return 10.0 ** (self._log_lo + index / self._inv_width)

    def _flush(self) -> None:
        size = len(self._counts)
        if self._p_value:
            v = np.frombuffer(self._p_value, dtype=np.float64)
            w = np.frombuffer(self._p_weight, dtype=np.int64)
            self._counts += np.bincount(self._bins(v), weights=w, minlength=size).astype(np.int64)
            self._count += int(w.sum())
            self._sum += float(np.dot(v, w))
            self._min = min(self._min, float(v.min()))
            self._max = max(self._max, float(v.max()))
            self._p_value, self._p_weight = array("d"), array("q")
        if self._a_n:
            first = np.frombuffer(self._a_first, dtype=np.float64)
            step = np.frombuffer(self._a_step, dtype=np.float64)
            n = np.frombuffer(self._a_n, dtype=np.int64)
            w = np.frombuffer(self._a_weight, dtype=np.int64)
            last = first + step * (n - 1)
            lo, hi = np.minimum(first, last), np.maximum(first, last)
            self._count += int((n * w).sum())
            self._sum += float(np.sum(w * (n * first + step * (n * (n - 1) // 2))))
            self._min = min(self._min, float(lo.min()))
            self._max = max(self._max, float(hi.max()))
            b_lo, b_hi = self._bins(lo), self._bins(hi)
            one = b_lo == b_hi
            self._counts += np.bincount(b_lo[one], weights=(n * w)[one], minlength=size).astype(
                np.int64
            )
            for i in np.flatnonzero(~one).tolist():
                self._spread(float(lo[i]), abs(float(step[i])), int(n[i]), int(w[i]))
            self._a_first, self._a_step = array("d"), array("d")
            self._a_n, self._a_weight = array("q"), array("q")

    def _spread(self, first: float, step: float, n: int, weight: int) -> None:
        """Bin an increasing sequence spanning several bins, one bin at a time."""
        counts = self._counts
        i = 0
        while i < n:
            b = int(self._bins(np.array([first + step * i]))[0])
            upper = self._upper(b)
            j = n if upper == math.inf else math.ceil((upper - first) / step)
            j = min(max(j, i + 1), n)
            counts[b] += (j - i) * weight
            i = j

    # -- reading -------------------------------------------------------------------

    @property
    def counts(self) -> np.ndarray:
        """Samples per bin (underflow first, overflow last)."""
        self._flush()
        return self._counts

    @property
    def count(self) -> int:
        self._flush()
        return self._count

    @property
    def sum(self) -> float:
        self._flush()
        return self._sum

    @property
    def min(self) -> float:
        self._flush()
        return self._min

    @property
    def max(self) -> float:
        self._flush()
        return self._max

    @property
    def mean(self) -> float:
        """Mean of the samples (NaN when empty)."""
        self._flush()
        return self._sum / self._count if self._count else math.nan

    def quantile(self, q: float) -> float:
        """The ``q``-quantile (``0 <= q <= 1``) to bin resolution; NaN when empty."""
        self._flush()
        if not self._count:
            return math.nan
        cum = np.cumsum(self._counts)
        rank = q * self._count
        index = int(np.searchsorted(cum, rank, side="left"))
        index = min(index, len(cum) - 1)
        if index == 0:
            return self._min
        if index > self._n_bins:
            return self._max
        c = int(self._counts[index])
        seen = int(cum[index]) - c
        lo_edge = self._upper(index - 1)
        frac = (rank - seen) / c if c else 1.0
        value = lo_edge * (self._upper(index) / lo_edge) ** frac
        return min(max(value, self._min), self._max)
