"""BurstGPT CSV loader (HPMLL/BurstGPT, Azure OpenAI GPT service logs).

Two published schemas, read by column name:

* ``BurstGPT_1``/``_2`` (6 columns):
  ``Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type``
* ``BurstGPT_3`` (8 columns): ``Session ID,Elapsed time`` inserted after
  ``Timestamp``. ``Session ID`` is filled only on ``Conversation log`` rows.

``Timestamp`` is seconds on a shared clock (ints in the older files, whole
floats in ``_3``) that need not start at 0: ``arrival_s = ts - min(ts)`` and
the trace's ``origin_s = min(ts)``. A row with ``Response tokens == 0`` is a
request the service failed; it is kept with ``failed=True``. ``Total tokens``
and ``Elapsed time`` (end-to-end latency of the original service) are not
part of a request and are ignored.

Real files have 1.4M-5.3M rows, so parsing and every check is vectorized.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from traces.loaders._common import (
    check_int_column,
    check_number_column,
    check_text_column,
    finish,
    read_csv_checked,
)
from traces.trace import Trace

__all__ = ["REQUIRED_COLUMNS", "load_burstgpt", "save_burstgpt"]

#: Columns the loader needs; ``Session ID`` is read when present.
REQUIRED_COLUMNS = ("Timestamp", "Model", "Request tokens", "Response tokens", "Log Type")
_SESSION = "Session ID"


def load_burstgpt(path: str | Path) -> Trace:
    """Load a BurstGPT CSV (either schema) as a Trace named after the file.

    Raises:
        TraceFormatError: a required column is missing; a row has too many
            or too few fields; a cell is empty, non-numeric, non-integral or
            negative, or ``Request tokens`` is below 1; the timestamps span
            more than :data:`~traces.trace.MAX_SPAN_S` (the message names the
            line, counting the header as line 1, and the column).
        TraceError: the file is empty or has no data rows.
    """
    path = Path(path)
    df = read_csv_checked(
        path,
        required=REQUIRED_COLUMNS,
        dtype={"Model": "category", "Log Type": "category", _SESSION: object},
        what="a BurstGPT CSV",
    )
    ts = check_number_column(df["Timestamp"], path, "Timestamp", first_line_no=2)
    prompt = check_int_column(
        df["Request tokens"], path, "Request tokens", minimum=1, first_line_no=2
    )
    output = check_int_column(
        df["Response tokens"], path, "Response tokens", minimum=0, first_line_no=2
    )
    for column, example in (("Model", "ChatGPT"), ("Log Type", "API log")):
        check_text_column(
            df[column], path, column, expected=f"a name such as {example!r}", first_line_no=2
        )
    origin_s = float(ts.min())
    frame = pd.DataFrame(
        {
            "arrival_s": ts - origin_s,
            "prompt_tokens": prompt,
            "output_tokens": output,
            "model": df["Model"].array,
            "log_type": df["Log Type"].array,
            "failed": output == 0,
        }
    )
    if _SESSION in df.columns:
        sessions = df[_SESSION].to_numpy(dtype=object, copy=True)
        # API-log rows have no session: an empty cell becomes None, not NaN.
        sessions[pd.isna(sessions)] = None
        frame["session_id"] = sessions
    lines = np.arange(len(frame)) + 2  # the header is line 1
    return finish(frame, path, origin_s=origin_s, time_field="Timestamp", lines=lines)


def save_burstgpt(trace: Trace, path: str | Path) -> None:
    """Write ``trace`` as an 8-column BurstGPT CSV (the ``BurstGPT_3`` schema).

    Timestamps are ``origin_s + arrival_s`` with three decimals; ``Elapsed
    time`` (a measured latency the trace does not have) is left empty. Prefix
    hashes and SLOs have no BurstGPT column and are not written.
    """
    f = trace.frame
    prompt = f["prompt_tokens"].to_numpy()
    output = np.where(f["failed"].to_numpy(), 0, f["output_tokens"].to_numpy())
    table = pd.DataFrame(
        {
            "Timestamp": np.round(trace.origin_s + f["arrival_s"].to_numpy(), 3),
            "Session ID": f["session_id"],
            "Elapsed time": "",
            "Model": f["model"].astype(object).fillna("ChatGPT"),
            "Request tokens": prompt,
            "Response tokens": output,
            "Total tokens": prompt + output,
            "Log Type": f["log_type"].astype(object).fillna("API log"),
        }
    )
    table.to_csv(path, index=False)
