"""Azure LLM inference trace loader (Azure/AzurePublicDataset, 2023 and 2024).

Columns, read by name: ``TIMESTAMP,ContextTokens,GeneratedTokens``.
``TIMESTAMP`` is a wall-clock datetime: the 2023 files write
``2023-11-16 18:17:03.9799600`` (7 fractional digits, no time zone), the 2024
files microseconds and ``+00:00``, with the fraction sometimes absent. Both
are parsed as ISO 8601; a timestamp without a zone is taken as UTC (the
dataset states none). ``arrival_s`` counts from the earliest request and the
trace's ``origin_s`` is that request's epoch seconds. ``ContextTokens`` is the
prompt, ``GeneratedTokens`` the output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from traces.errors import TraceFormatError
from traces.loaders._common import check_int_column, finish, read_csv_checked, shorten
from traces.trace import Trace

__all__ = ["REQUIRED_COLUMNS", "load_azure"]

REQUIRED_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def load_azure(path: str | Path) -> Trace:
    """Load an Azure LLM inference CSV as a Trace named after the file.

    Raises:
        TraceFormatError: a missing column; an unparsable ``TIMESTAMP``; a
            token count that is empty, non-integral or negative, or
            ``ContextTokens`` below 1 (line numbers count the header as 1).
        TraceError: the file is empty or has no data rows.
    """
    path = Path(path)
    df = read_csv_checked(
        path, required=REQUIRED_COLUMNS, dtype={"TIMESTAMP": str}, what="an Azure LLM trace CSV"
    )
    stamps = pd.to_datetime(df["TIMESTAMP"], format="ISO8601", utc=True, errors="coerce")
    bad = stamps.isna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        got = df["TIMESTAMP"].iloc[i]
        raise TraceFormatError(
            path,
            field="TIMESTAMP",
            expected="a datetime such as 2023-11-16 18:17:03.9799600",
            line=i + 2,
            got="" if pd.isna(got) else shorten(got),
        )
    prompt = check_int_column(
        df["ContextTokens"], path, "ContextTokens", minimum=1, first_line_no=2
    )
    output = check_int_column(
        df["GeneratedTokens"], path, "GeneratedTokens", minimum=0, first_line_no=2
    )
    # Integer nanoseconds since the epoch keep sub-microsecond gaps exact.
    ns = stamps.dt.tz_convert(None).dt.as_unit("ns").to_numpy().astype(np.int64)
    first_ns = int(ns.min())
    frame = pd.DataFrame(
        {
            "arrival_s": (ns - first_ns) / 1e9,
            "prompt_tokens": prompt,
            "output_tokens": output,
        }
    )
    lines = np.arange(len(frame)) + 2  # the header is line 1
    return finish(frame, path, origin_s=first_ns / 1e9, time_field="TIMESTAMP", lines=lines)
