"""Helpers shared by the trace loaders: opening files, checking values, finishing a Trace.

Every check here raises :class:`~traces.errors.TraceFormatError` with the
file, the 1-based line, the field, what was expected and the offending value.
Column checks are vectorized (a BurstGPT file has millions of rows); the JSON
helpers check one decoded object at a time.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

from traces.bundled import DATA_DIR
from traces.errors import TraceError, TraceFormatError
from traces.trace import MAX_SPAN_S, Trace

__all__ = [
    "GZIP_MAGIC",
    "PARQUET_MAGIC",
    "check_int_column",
    "check_number_column",
    "check_text_column",
    "finish",
    "first_line",
    "get_int",
    "get_int_list",
    "get_number",
    "get_optional_str",
    "is_gzip",
    "iter_json_objects",
    "object_column",
    "open_text",
    "read_csv_checked",
    "shorten",
]

GZIP_MAGIC = b"\x1f\x8b"
PARQUET_MAGIC = b"PAR1"

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

# Offending values are quoted in messages; a whole JSON line can be huge.
_MAX_GOT_CHARS = 80


def shorten(value: Any) -> Any:
    """The value itself, or a truncated string when its repr is long."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= _MAX_GOT_CHARS:
        return value
    return text[: _MAX_GOT_CHARS - 3] + "..."


def _magic(path: Path, size: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except FileNotFoundError:
        raise TraceError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise TraceError(f"{path}: is a directory, expected a trace file") from None


def is_gzip(path: Path) -> bool:
    """Whether the file is gzip-compressed (by its magic bytes, not its name)."""
    return _magic(path, 2) == GZIP_MAGIC


def open_text(path: Path) -> IO[str]:
    """Open a text trace for reading, decompressing gzip transparently."""
    if is_gzip(path):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def first_line(path: Path) -> str | None:
    """The first non-blank line of a text file (newline stripped), or None if there is none."""
    try:
        with open_text(path) as f:
            for line in f:
                if line.strip():
                    return line.rstrip("\r\n")
    except (OSError, UnicodeDecodeError, EOFError):
        return None
    return None


def _caller_stacklevel() -> int:
    """Stack level of the first frame outside this package, so warnings point at the user."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("traces.loaders"):
        frame = frame.f_back
        level += 1
    return level


def finish(
    frame: pd.DataFrame,
    path: Path,
    *,
    origin_s: float,
    time_field: str,
    lines: np.ndarray,
    name: str | None = None,
) -> Trace:
    """Check the span, sort rows stably by arrival (warning once, naming the file), build the Trace.

    A bundled trace (:data:`traces.bundled.DATA_DIR`) is sorted without the
    warning: its order is the published file's, documented with it.

    Args:
        frame: the rows in file order, ``arrival_s`` in seconds.
        path: the file, for messages.
        origin_s: where ``arrival_s`` 0 lies on the source's clock.
        time_field: the file's name for the arrival time, for messages.
        lines: the 1-based line (or row) of each row in the file, for messages.
        name: the trace's name (default: the file's name).

    Raises:
        TraceFormatError: arrivals span more than :data:`~traces.trace.MAX_SPAN_S`
            (naming the line of the latest one).

    The Trace constructor would also sort and warn, but it only knows the
    trace's name; sorting here first names the path and keeps it to one warning.
    """
    if "request_id" not in frame.columns:
        # Ids follow file order, so a request can be traced back to its line after sorting.
        frame = frame.assign(request_id=np.arange(len(frame), dtype=np.int64))
    arrivals = frame["arrival_s"].to_numpy()
    if len(arrivals) and float(arrivals.max() - arrivals.min()) > MAX_SPAN_S:
        first, last = int(np.argmin(arrivals)), int(np.argmax(arrivals))
        raise TraceFormatError(
            path,
            field=time_field,
            expected=(
                f"an arrival within {MAX_SPAN_S:.0e} s (about 31 years) of the earliest, "
                f"on line {int(lines[first])}; this one is "
                f"{float(arrivals[last] - arrivals[first]):.3g} s after it"
            ),
            line=int(lines[last]),
        )
    backwards = np.diff(arrivals) < 0
    if backwards.any():
        # A bundled file's order is the published one (traces/data/README.md): no news.
        if not path.resolve().is_relative_to(DATA_DIR):
            n_pairs = int(np.count_nonzero(backwards))
            warnings.warn(
                f"{path}: {n_pairs} pair(s) of consecutive requests arrive out of order; "
                "sorted stably by arrival time",
                UserWarning,
                stacklevel=_caller_stacklevel(),
            )
        frame = frame.iloc[np.argsort(arrivals, kind="stable")].reset_index(drop=True)
    return Trace(frame, name=path.name if name is None else name, origin_s=origin_s)


def _int_expected(minimum: int | None) -> str:
    if minimum is None:
        return "an integer"
    if minimum == 1:
        return "a positive integer"
    if minimum == 0:
        return "a non-negative integer"
    return f"an integer >= {minimum}"


# -- CSV ---------------------------------------------------------------------

# The C parser reports ragged rows as "Expected 6 fields in line 4, saw 7".
_RAGGED = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")


def read_csv_checked(
    path: Path, *, required: tuple[str, ...], dtype: dict[str, Any], what: str
) -> pd.DataFrame:
    """Read a headed CSV whose ``required`` columns must exist, keeping line numbers exact.

    Data row i (0-based) of the result is line i + 2 of the file: blank lines
    are kept as empty rows (a trailing run of them is dropped), so the checks
    that follow can name the line of a bad cell.

    Raises:
        TraceError: an empty file, or a header without data rows.
        TraceFormatError: a missing column (line 1) or a row with too many or too
            few fields.
    """
    with open_text(path) as f:
        header = next(csv.reader(f), None)
    if header is None:
        raise TraceError(f"{path}: the file is empty; expected {what} with a header line")
    missing = [c for c in required if c not in header]
    if missing:
        raise TraceFormatError(
            path,
            field=missing[0],
            expected=f"{what} whose header has a column {missing[0]!r} (found {header})",
            line=1,
        )
    try:
        df = pd.read_csv(
            path,
            dtype=dtype,
            # Every column is parsed (no usecols) so that a row with too many
            # fields is an error rather than silently truncated.
            skip_blank_lines=False,
            compression="gzip" if is_gzip(path) else None,
            encoding="utf-8-sig",
            engine="c",
            low_memory=False,
        )
    except pd.errors.ParserError as exc:
        match = _RAGGED.search(str(exc))
        if match is None:
            raise TraceError(f"{path}: not a readable CSV: {exc}") from None
        raise TraceFormatError(
            path,
            field="<row>",
            expected=f"{match.group(1)} comma-separated fields",
            line=int(match.group(2)),
            got=f"{match.group(3)} fields",
        ) from None
    # A trailing run of blank lines is an editor artefact, not missing data.
    filled = df.notna().any(axis=1).to_numpy()
    if not filled.any():
        raise TraceError(f"{path}: no requests (the CSV has a header but no data rows)")
    # pandas pads a short row with empty cells; only such rows can be short.
    padded = filled & df.iloc[:, -1].isna().to_numpy()
    if padded.any():
        _check_short_rows(path, np.flatnonzero(padded), len(header))
    return df.iloc[: int(np.flatnonzero(filled)[-1]) + 1]


def _check_short_rows(path: Path, rows: np.ndarray, n_fields: int) -> None:
    """Raise for the first of ``rows`` (0-based data rows) with fewer than ``n_fields`` fields.

    Read again with :mod:`csv`, which keeps the fields a row has, and only
    when some row ends in an empty cell; a row that merely leaves its last
    cell empty passes here and meets the loader's checks of that column.
    """
    wanted = set(rows.tolist())
    last = int(rows[-1])
    with open_text(path) as f:
        reader = csv.reader(f)
        next(reader, None)  # the header
        for i, fields in enumerate(reader):
            if i in wanted and len(fields) < n_fields:
                raise TraceFormatError(
                    path,
                    field="<row>",
                    expected=f"{n_fields} comma-separated fields, as in the header",
                    line=i + 2,
                    got=f"{len(fields)} fields",
                )
            if i >= last:
                return


# -- vectorized column checks (CSV) ------------------------------------------


def _first_bad(
    series: pd.Series, bad: np.ndarray, path: Path, field: str, expected: str, first_line_no: int
) -> TraceFormatError:
    i = int(np.flatnonzero(bad)[0])
    got = series.iloc[i]
    if got is None or (isinstance(got, float) and math.isnan(got)) or got is pd.NA:
        got = ""  # an empty cell: show it as '' rather than as nan
    elif isinstance(got, np.generic):
        got = got.item()
    return TraceFormatError(
        path, field=field, expected=expected, line=i + first_line_no, got=shorten(got)
    )


def check_number_column(
    series: pd.Series, path: Path, field: str, *, first_line_no: int
) -> np.ndarray:
    """The column as finite float64; the first empty or non-numeric cell raises."""
    if pd.api.types.is_integer_dtype(series.dtype):
        return series.to_numpy(dtype=np.float64)
    numbers = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(numbers)
    if bad.any():
        raise _first_bad(series, bad, path, field, "a number (seconds)", first_line_no)
    return numbers


def check_text_column(
    series: pd.Series, path: Path, field: str, *, expected: str, first_line_no: int
) -> None:
    """Raise for the first empty cell of a text column, naming its line."""
    empty = series.isna().to_numpy()
    if empty.any():
        raise _first_bad(series, empty, path, field, expected, first_line_no)


def check_int_column(
    series: pd.Series, path: Path, field: str, *, minimum: int, first_line_no: int
) -> np.ndarray:
    """The column as int64 >= ``minimum``; the first bad cell raises, naming its line."""
    expected = _int_expected(minimum)
    if pd.api.types.is_integer_dtype(series.dtype) and not series.hasnans:
        values = series.to_numpy(dtype=np.int64)
    else:
        numbers = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(numbers) | (numbers != np.floor(numbers))
        if bad.any():
            raise _first_bad(series, bad, path, field, expected, first_line_no)
        values = numbers.astype(np.int64)
    low = values < minimum
    if low.any():
        raise _first_bad(series, low, path, field, expected, first_line_no)
    return values


# -- JSON Lines ---------------------------------------------------------------


def iter_json_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based line, object) for each non-blank line; bad JSON or a non-object raises."""
    with open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceFormatError(
                    path,
                    field="<json>",
                    expected=f"a valid JSON object ({exc.msg})",
                    line=line_no,
                    got=shorten(line.rstrip("\r\n")),
                ) from None
            if not isinstance(obj, dict):
                raise TraceFormatError(
                    path,
                    field="<json>",
                    expected="a JSON object per line",
                    line=line_no,
                    got=shorten(obj),
                )
            yield line_no, obj


def _field(obj: dict[str, Any], key: str, path: Path, line: int, expected: str) -> Any:
    if key not in obj:
        raise TraceFormatError(path, field=key, expected=expected + " (field missing)", line=line)
    return obj[key]


def get_int(obj: dict[str, Any], key: str, path: Path, line: int, *, minimum: int | None) -> int:
    """An integer field (an integral float such as 12.0 is accepted), >= ``minimum`` if given."""
    expected = _int_expected(minimum)
    value = _field(obj, key, path, line, expected)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TraceFormatError(path, field=key, expected=expected, line=line, got=shorten(value))
    if isinstance(value, float):
        if not value.is_integer():
            raise TraceFormatError(path, field=key, expected=expected, line=line, got=value)
        value = int(value)
    too_low = value < (_INT64_MIN if minimum is None else minimum)
    if too_low or value > _INT64_MAX:
        raise TraceFormatError(path, field=key, expected=expected, line=line, got=value)
    return value


def get_number(obj: dict[str, Any], key: str, path: Path, line: int, *, expected: str) -> float:
    """A finite JSON number."""
    value = _field(obj, key, path, line, expected)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TraceFormatError(path, field=key, expected=expected, line=line, got=shorten(value))
    return float(value)


def get_optional_str(obj: dict[str, Any], key: str, path: Path, line: int) -> str | None:
    """A string field; null, an empty string or an absent key give None."""
    value = obj.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise TraceFormatError(
            path, field=key, expected="a string or null", line=line, got=shorten(value)
        )
    return value


def get_int_list(
    obj: dict[str, Any], key: str, path: Path, line: int, *, field: str | None = None
) -> list[int]:
    """A JSON list of integers (hash ids); ``field`` names it in errors (default ``key``)."""
    name = key if field is None else field
    if key not in obj:
        raise TraceFormatError(
            path, field=name, expected="a list of integers (field missing)", line=line
        )
    value = obj[key]
    if not isinstance(value, list) or not all(
        type(v) is int and _INT64_MIN <= v <= _INT64_MAX for v in value
    ):
        raise TraceFormatError(
            path, field=name, expected="a list of 64-bit integers", line=line, got=shorten(value)
        )
    return value


def object_column(values: list[Any]) -> np.ndarray:
    """A 1-D object array holding ``values`` as they are (arrays stay elements)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out
