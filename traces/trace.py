"""Trace: a workload held as columns, one row per :class:`Request`.

A full BurstGPT file has millions of rows, so a trace is a pandas DataFrame
with a fixed schema rather than a list of objects; :class:`Request` records
are built on demand when a driver iterates.

Schema (column: dtype):

===============  ==========================================================
request_id       int64, unique
arrival_s        float64, seconds from the trace start, sorted ascending
prompt_tokens    int64, > 0
output_tokens    int64, >= 0 (0 only on failed requests)
session_id       object: str or None
prefix_hashes    object: numpy int64 array or None
block_tokens     Int64 (nullable): tokens per prefix block
model            category
log_type         category
failed           bool
slo_ttft_s       float64, NaN when unset
slo_tpot_s       float64, NaN when unset
===============  ==========================================================
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pandas as pd

from traces.errors import TraceError
from traces.request import Request

__all__ = ["COLUMNS", "MAX_SPAN_S", "Trace"]

#: Column name -> pandas dtype of the canonical schema, in order.
COLUMNS: dict[str, str] = {
    "request_id": "int64",
    "arrival_s": "float64",
    "prompt_tokens": "int64",
    "output_tokens": "int64",
    "session_id": "object",
    "prefix_hashes": "object",
    "block_tokens": "Int64",
    "model": "category",
    "log_type": "category",
    "failed": "bool",
    "slo_ttft_s": "float64",
    "slo_tpot_s": "float64",
}

#: The longest span a trace may have, s (about 31.7 years). Beyond it a float
#: clock counts in steps coarser than a microsecond and a simulated engine
#: step would no longer move time forward; no real trace comes near it.
MAX_SPAN_S = 1e9


def _default_column(column: str, n: int) -> Any:
    """The value of an absent column for ``n`` rows, already in its canonical dtype."""
    if column in ("session_id", "prefix_hashes"):
        return np.full(n, None, dtype=object)
    if column == "block_tokens":
        return pd.arrays.IntegerArray(np.zeros(n, dtype=np.int64), np.ones(n, dtype=bool))
    if column in ("model", "log_type"):
        return pd.Categorical.from_codes(np.full(n, -1, dtype=np.int8), categories=[])
    if column == "failed":
        return np.zeros(n, dtype=bool)
    return np.full(n, np.nan)  # the SLO columns


class Trace:
    """A workload: requests in arrival order, stored column-wise.

    Args:
        frame: a DataFrame with at least ``arrival_s``, ``prompt_tokens``
            and ``output_tokens``; the other canonical columns are added with
            their defaults, ``request_id`` as the row position. Rows are
            sorted by arrival (stably, with a warning when they were not).
        name: a short label for reports (usually the file name).
        origin_s: absolute time of ``arrival_s == 0`` in the source's clock
            (epoch seconds for datetime traces, the raw first timestamp
            otherwise), so statistics can bin on the source's clock.
    """

    __slots__ = ("frame", "name", "origin_s")

    def __init__(self, frame: pd.DataFrame, *, name: str = "trace", origin_s: float = 0.0):
        self.frame = _canonical(frame, name)
        self.name = name
        self.origin_s = float(origin_s)

    # -- construction -------------------------------------------------------

    @classmethod
    def from_requests(cls, requests: Iterable[Request], *, name: str = "trace") -> Trace:
        """Build a trace from Request records (tests, small hand-made workloads)."""
        rows = []
        for r in requests:
            rows.append(
                {
                    "request_id": r.request_id,
                    "arrival_s": r.arrival_s,
                    "prompt_tokens": r.prompt_tokens,
                    "output_tokens": r.output_tokens,
                    "session_id": r.session_id,
                    "prefix_hashes": None
                    if r.prefix_hashes is None
                    else np.asarray(r.prefix_hashes, dtype=np.int64),
                    "block_tokens": pd.NA if r.block_tokens is None else r.block_tokens,
                    "model": r.model,
                    "log_type": r.log_type,
                    "failed": r.failed,
                    "slo_ttft_s": np.nan if r.slo_ttft_s is None else r.slo_ttft_s,
                    "slo_tpot_s": np.nan if r.slo_tpot_s is None else r.slo_tpot_s,
                }
            )
        frame = pd.DataFrame(rows, columns=list(COLUMNS)) if rows else _empty_frame()
        return cls(frame, name=name)

    def replace(self, frame: pd.DataFrame, **meta: Any) -> Trace:
        """A new trace with this one's name and origin (unless overridden)."""
        return Trace(
            frame,
            name=meta.get("name", self.name),
            origin_s=meta.get("origin_s", self.origin_s),
        )

    # -- access -------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.frame)

    def __iter__(self) -> Iterator[Request]:
        return self.requests()

    def __getitem__(self, index: int) -> Request:
        return _row_to_request(self.frame.iloc[index].to_dict())

    def __repr__(self) -> str:
        span = self.span_s
        return f"Trace({self.name!r}, {len(self)} requests, {span:.1f} s)"

    def requests(self) -> Iterator[Request]:
        """Yield the Request records in arrival order."""
        f = self.frame
        cols = [f[c].to_numpy(dtype=object) for c in COLUMNS]
        for values in zip(*cols, strict=True):
            yield _row_to_request(dict(zip(COLUMNS, values, strict=True)))

    @property
    def arrival_s(self) -> np.ndarray:
        return self.frame["arrival_s"].to_numpy()

    @property
    def prompt_tokens(self) -> np.ndarray:
        return self.frame["prompt_tokens"].to_numpy()

    @property
    def output_tokens(self) -> np.ndarray:
        return self.frame["output_tokens"].to_numpy()

    @property
    def span_s(self) -> float:
        a = self.arrival_s
        return float(a[-1] - a[0]) if len(a) else 0.0

    def equals(self, other: Trace) -> bool:
        """Same requests, field by field (prefix hashes compared by value)."""
        if len(self) != len(other):
            return False
        return all(a == b for a, b in zip(self.requests(), other.requests(), strict=True))


def _empty_frame() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=d) for c, d in COLUMNS.items()})


def _row_to_request(row: dict[str, Any]) -> Request:
    hashes = row["prefix_hashes"]
    block = row["block_tokens"]
    ttft = row["slo_ttft_s"]
    tpot = row["slo_tpot_s"]
    model = row["model"]
    log_type = row["log_type"]
    session = row["session_id"]
    return Request(
        request_id=int(row["request_id"]),
        arrival_s=float(row["arrival_s"]),
        prompt_tokens=int(row["prompt_tokens"]),
        output_tokens=int(row["output_tokens"]),
        session_id=None if _missing(session) else str(session),
        prefix_hashes=None if hashes is None else tuple(int(h) for h in hashes),
        block_tokens=None if _missing(block) else int(block),
        model=None if _missing(model) else str(model),
        log_type=None if _missing(log_type) else str(log_type),
        failed=bool(row["failed"]),
        slo_ttft_s=None if _missing(ttft) else float(ttft),
        slo_tpot_s=None if _missing(tpot) else float(tpot),
    )


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))


def _canonical(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    """Complete, type and sort a frame into the canonical schema."""
    for required in ("arrival_s", "prompt_tokens", "output_tokens"):
        if required not in frame.columns:
            raise TraceError(f"{name}: trace frame lacks column {required!r}")
    unknown = set(frame.columns) - set(COLUMNS)
    if unknown:
        raise TraceError(f"{name}: unknown trace columns {sorted(unknown)}")
    n = len(frame)
    columns: dict[str, Any] = {}
    for col, dtype in COLUMNS.items():
        if col not in frame.columns:
            columns[col] = (
                np.arange(n, dtype=np.int64) if col == "request_id" else _default_column(col, n)
            )
            continue
        series = frame[col]
        if dtype == "object":
            # Strings (pandas' own string dtype included) become Python objects
            # and every missing value becomes None.
            values = series.to_numpy(dtype=object, na_value=None)
        elif str(series.dtype) == dtype:
            values = series.array if dtype in ("category", "Int64") else series.to_numpy()
        else:
            values = series.astype(dtype)
            values = values.array if dtype in ("category", "Int64") else values.to_numpy()
        columns[col] = values
    index = pd.RangeIndex(n)
    # Explicit Series keep object columns as objects (pandas would infer strings).
    out = pd.DataFrame(
        {c: pd.Series(v, index=index, dtype=COLUMNS[c], copy=False) for c, v in columns.items()}
    )
    if len(out):
        arrivals = out["arrival_s"].to_numpy()
        if np.any(np.diff(arrivals) < 0):
            n_back = int(np.count_nonzero(np.diff(arrivals) < 0))
            warnings.warn(
                f"{name}: {n_back} arrival(s) out of order; sorted stably by arrival time",
                stacklevel=3,
            )
            out = out.iloc[np.argsort(arrivals, kind="stable")].reset_index(drop=True)
        if out["request_id"].duplicated().any():
            dup = out["request_id"][out["request_id"].duplicated()].iloc[0]
            raise TraceError(f"{name}: request_id {dup} appears more than once")
    return out
