"""The project's own trace files: Parquet and JSON Lines of Request records.

Both hold the fields of :class:`traces.Request`, by those names, and
round-trip a Trace exactly (``Trace.equals``), None included.

Parquet (``.parquet``): one column per field. ``request_id``,
``prompt_tokens``, ``output_tokens``, ``block_tokens``: int64;
``arrival_s``, ``slo_ttft_s``, ``slo_tpot_s``: float64 (null = unset);
``session_id``: string; ``prefix_hashes``: list<int64>; ``model``,
``log_type``: dictionary<string> (categories kept); ``failed``: bool. The
schema metadata key ``llmsched`` holds JSON ``{"version": 1, "name": ...,
"origin_s": ...}``. "Line" in an error about a Parquet file is the 1-based row.

JSON Lines (``.jsonl``, ``.jsonl.gz``): the first line is a header object
``{"llmsched_trace": 1, "name": ..., "origin_s": ...}``, then one Request per
line with every field (``null`` when unset). A file without the header is
read too (name = file name, ``origin_s`` 0), as is a header with no requests
(an empty trace). On reading, only ``arrival_s``, ``prompt_tokens`` and
``output_tokens`` are required; ``request_id`` defaults to the record's
position, ``failed`` to false, the rest to unset. Unknown fields are errors.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from traces.errors import TraceError, TraceFormatError
from traces.loaders._common import (
    finish,
    get_int,
    get_int_list,
    get_number,
    iter_json_objects,
    object_column,
    shorten,
)
from traces.request import Request
from traces.trace import COLUMNS, Trace

__all__ = ["FORMAT_VERSION", "load_jsonl", "load_parquet", "save_jsonl", "save_parquet"]

#: Version written in the Parquet metadata and the JSONL header.
FORMAT_VERSION = 1
_META_KEY = b"llmsched"
_HEADER_KEY = "llmsched_trace"
_REQUIRED = ("arrival_s", "prompt_tokens", "output_tokens")
_FIELDS = tuple(Request.__dataclass_fields__)


#: The kind of value each field holds (required fields first).
_KINDS = {
    "request_id": "int",
    "arrival_s": "number",
    "prompt_tokens": "int",
    "output_tokens": "int",
    "session_id": "str",
    "prefix_hashes": "ints",
    "block_tokens": "int",
    "model": "str",
    "log_type": "str",
    "failed": "bool",
    "slo_ttft_s": "number",
    "slo_tpot_s": "number",
}
_OPTIONAL = tuple(_KINDS)[4:]
_WHAT = {"int": "integers", "number": "numbers", "str": "strings", "ints": "lists of integers",
         "bool": "booleans"}  # fmt: skip


# -- Parquet ------------------------------------------------------------------


def _arrow_type_ok(col: str, t: pa.DataType) -> bool:
    if pa.types.is_null(t):  # a column of nulls only
        return col in _OPTIONAL and col != "failed"
    kind = _KINDS[col]
    if kind == "str" and pa.types.is_dictionary(t):
        t = t.value_type
    if kind == "ints":
        return (pa.types.is_list(t) or pa.types.is_large_list(t)) and (
            pa.types.is_integer(t.value_type) or pa.types.is_null(t.value_type)
        )
    checks = {
        "int": pa.types.is_integer,
        "number": lambda t: pa.types.is_floating(t) or pa.types.is_integer(t),
        "str": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
        "bool": pa.types.is_boolean,
    }
    return checks[kind](t)


def save_parquet(trace: Trace, path: str | Path) -> None:
    """Write ``trace`` as canonical Parquet."""
    f = trace.frame
    columns = {
        "request_id": pa.array(f["request_id"].to_numpy(), type=pa.int64()),
        "arrival_s": pa.array(f["arrival_s"].to_numpy(), type=pa.float64()),
        "prompt_tokens": pa.array(f["prompt_tokens"].to_numpy(), type=pa.int64()),
        "output_tokens": pa.array(f["output_tokens"].to_numpy(), type=pa.int64()),
        "session_id": pa.array(
            f["session_id"].to_numpy(dtype=object), type=pa.string(), from_pandas=True
        ),
        "prefix_hashes": pa.array(
            list(f["prefix_hashes"].to_numpy(dtype=object)), type=pa.list_(pa.int64())
        ),
        "block_tokens": pa.array(f["block_tokens"], type=pa.int64(), from_pandas=True),
        "model": pa.DictionaryArray.from_pandas(f["model"]),
        "log_type": pa.DictionaryArray.from_pandas(f["log_type"]),
        "failed": pa.array(f["failed"].to_numpy(), type=pa.bool_()),
        "slo_ttft_s": pa.array(f["slo_ttft_s"].to_numpy(), type=pa.float64(), from_pandas=True),
        "slo_tpot_s": pa.array(f["slo_tpot_s"].to_numpy(), type=pa.float64(), from_pandas=True),
    }
    meta = {"version": FORMAT_VERSION, "name": trace.name, "origin_s": trace.origin_s}
    table = pa.table(columns).replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    pq.write_table(table, path)


def _parquet_meta(table: pa.Table, path: Path) -> tuple[str, float]:
    raw = (table.schema.metadata or {}).get(_META_KEY)
    if raw is None:
        return path.name, 0.0
    try:
        meta = json.loads(raw)
        name, origin_s = meta["name"], float(meta["origin_s"])
        if meta["version"] != FORMAT_VERSION or not isinstance(name, str):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise TraceFormatError(
            path,
            field="llmsched",
            expected=f'metadata {{"version": {FORMAT_VERSION}, "name": str, "origin_s": float}}',
            got=shorten(raw.decode(errors="replace")),
        ) from None
    return name, origin_s


def load_parquet(path: str | Path) -> Trace:
    """Read a canonical Parquet trace, checking column types and values.

    Raises:
        TraceFormatError: a required column is missing, a column is unknown
            or of the wrong type, a required value is null, a token count is
            out of range, a prefix has no ``block_tokens``.
        TraceError: the file is not Parquet.
    """
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise TraceError(f"{path}: not a readable Parquet file: {exc}") from None
    name, origin_s = _parquet_meta(table, path)
    for col in table.column_names:
        if col not in COLUMNS:
            raise TraceFormatError(
                path, field=col, expected=f"only the columns {', '.join(COLUMNS)}"
            )
    for col in _REQUIRED:
        if col not in table.column_names:
            raise TraceFormatError(path, field=col, expected="a column of that name")
    frame: dict[str, Any] = {}
    for col in table.column_names:
        data = table.column(col)
        what = _WHAT[_KINDS[col]]
        if not _arrow_type_ok(col, data.type):
            raise TraceFormatError(
                path, field=col, expected=f"a column of {what}", got=str(data.type)
            )
        if (col not in _OPTIONAL or col == "failed") and data.null_count:
            row = int(np.flatnonzero(pc.is_null(data).to_numpy(zero_copy_only=False))[0])
            raise TraceFormatError(path, field=col, expected=f"{what}, not null", line=row + 1)
        frame[col] = _parquet_column(col, data)
    _check_values(frame, path)
    rows = np.arange(table.num_rows) + 1  # Parquet errors name 1-based rows
    return finish(
        pd.DataFrame(frame), path, origin_s=origin_s, time_field="arrival_s", lines=rows, name=name
    )


def _parquet_column(col: str, data: pa.ChunkedArray) -> Any:
    if col in ("model", "log_type"):
        if pa.types.is_dictionary(data.type):
            return data.to_pandas()  # categorical, categories kept
        return pd.Categorical(data.to_numpy(zero_copy_only=False))
    if col == "prefix_hashes":
        if pa.types.is_null(data.type):
            return object_column([None] * len(data))
        cast = data.cast(pa.large_list(pa.int64()))
        return object_column(list(cast.to_numpy(zero_copy_only=False)))
    if col == "session_id":
        return data.cast(pa.string()).to_numpy(zero_copy_only=False)
    if col == "block_tokens":
        return pd.array(data.cast(pa.int64()).to_pandas(types_mapper=pd.ArrowDtype), dtype="Int64")
    if col in ("arrival_s", "slo_ttft_s", "slo_tpot_s"):
        return data.cast(pa.float64()).to_numpy(zero_copy_only=False)
    return data.to_numpy()


def _check_values(frame: dict[str, Any], path: Path) -> None:
    """Vectorized range checks of a Parquet trace's columns (errors name the 1-based row)."""

    def bad(field: str, mask: np.ndarray, expected: str) -> None:
        if mask.any():
            i = int(np.flatnonzero(mask)[0])
            value = frame[field][i] if field in frame else None
            value = None if value is pd.NA else value
            raise TraceFormatError(
                path,
                field=field,
                expected=expected,
                line=i + 1,
                got=value.item() if isinstance(value, np.generic) else value,
            )

    bad("arrival_s", ~np.isfinite(np.asarray(frame["arrival_s"])), "a finite number (seconds)")
    bad("prompt_tokens", np.asarray(frame["prompt_tokens"]) < 1, "a positive integer")
    bad("output_tokens", np.asarray(frame["output_tokens"]) < 0, "a non-negative integer")
    n = len(frame["arrival_s"])
    blocks = frame.get("block_tokens", pd.array([None] * n, dtype="Int64"))
    bad("block_tokens", (blocks < 1).fillna(False).to_numpy(bool), "a positive integer or null")
    hashes = frame.get("prefix_hashes", [None] * n)
    has_prefix = np.array([h is not None for h in hashes], dtype=bool)
    bad("block_tokens", has_prefix & blocks.isna(), "a block size wherever prefix_hashes is set")


# -- JSON Lines -----------------------------------------------------------------


def save_jsonl(trace: Trace, path: str | Path) -> None:
    """Write ``trace`` as canonical JSON Lines (gzip-compressed if the name ends in ``.gz``)."""
    path = Path(path)
    if path.name.lower().endswith(".gz"):
        # Level 1: prefix hashes are random 64-bit ints that barely compress
        # (RAGPulse: 11.4 MB at level 1 against 9.8 MB at 9), while level 9 is
        # ~6x slower. Parquet is the compact format.
        def opener(p: Path, mode: str, encoding: str) -> Any:
            return gzip.open(p, mode, compresslevel=1, encoding=encoding)
    else:
        opener = open
    header = {_HEADER_KEY: FORMAT_VERSION, "name": trace.name, "origin_s": trace.origin_s}
    with opener(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps(header) + "\n")
        for r in trace.requests():
            f.write(json.dumps({k: getattr(r, k) for k in _FIELDS}) + "\n")


def _optional(obj: dict[str, Any], key: str, path: Path, line: int) -> Any:
    """A nullable field of the kind ``_KINDS`` gives; None when null or absent."""
    value = obj.get(key)
    kind = _KINDS[key]
    if value is None:
        return None
    if kind == "ints":
        return get_int_list(obj, key, path, line)
    if kind == "int":
        return get_int(obj, key, path, line, minimum=1)  # block_tokens
    if kind == "number":
        return get_number(obj, key, path, line, expected="a number (seconds) or null")
    if not isinstance(value, str if kind == "str" else bool):
        expected = "a string or null" if kind == "str" else "true or false"
        raise TraceFormatError(path, field=key, expected=expected, line=line, got=shorten(value))
    return value


def load_jsonl(path: str | Path) -> Trace:
    """Read a canonical JSON Lines trace, checking every record's fields and types.

    Raises:
        TraceFormatError: invalid JSON, an unknown or missing field, a wrong
            type, an out-of-range value, a repeated ``request_id``, a bad header.
        TraceError: the file is empty.
    """
    path = Path(path)
    name, origin_s = path.name, 0.0
    rows: dict[str, list[Any]] = {f: [] for f in _FIELDS}
    seen_ids: dict[int, int] = {}
    lines: list[int] = []
    records = iter_json_objects(path)
    first = True
    for line, obj in records:
        if first and _HEADER_KEY in obj:
            name, origin_s = _jsonl_header(obj, path, line)
            first = False
            continue
        first = False
        for key in obj:
            if key not in rows:
                raise TraceFormatError(
                    path,
                    field=key,
                    expected=f"only the Request fields {', '.join(_FIELDS)}",
                    line=line,
                )
        if "request_id" in obj:
            rid = get_int(obj, "request_id", path, line, minimum=None)
        else:
            rid = len(rows["request_id"])
        if rid in seen_ids:
            raise TraceFormatError(
                path,
                field="request_id",
                expected=f"an id not used before (line {seen_ids[rid]})",
                line=line,
                got=rid,
            )
        seen_ids[rid] = line
        lines.append(line)
        rows["request_id"].append(rid)
        rows["arrival_s"].append(
            get_number(obj, "arrival_s", path, line, expected="a number (seconds)")
        )
        rows["prompt_tokens"].append(get_int(obj, "prompt_tokens", path, line, minimum=1))
        rows["output_tokens"].append(get_int(obj, "output_tokens", path, line, minimum=0))
        for key in _OPTIONAL:
            rows[key].append(_optional(obj, key, path, line))
        if rows["prefix_hashes"][-1] is not None and rows["block_tokens"][-1] is None:
            raise TraceFormatError(
                path,
                field="block_tokens",
                expected="a block size wherever prefix_hashes is set",
                line=line,
            )
    if first:
        raise TraceError(f"{path}: the file is empty; expected a llmsched JSONL trace")
    frame = pd.DataFrame(
        {
            "request_id": np.asarray(rows["request_id"], dtype=np.int64),
            "arrival_s": np.asarray(rows["arrival_s"], dtype=np.float64),
            "prompt_tokens": np.asarray(rows["prompt_tokens"], dtype=np.int64),
            "output_tokens": np.asarray(rows["output_tokens"], dtype=np.int64),
            "session_id": object_column(rows["session_id"]),
            "prefix_hashes": object_column(
                [
                    None if h is None else np.asarray(h, dtype=np.int64)
                    for h in rows["prefix_hashes"]
                ]
            ),
            "block_tokens": pd.array(rows["block_tokens"], dtype="Int64"),
            "model": pd.Categorical(rows["model"]),
            "log_type": pd.Categorical(rows["log_type"]),
            "failed": np.asarray([bool(v) for v in rows["failed"]], dtype=bool),
            # numpy reads None as NaN in a float array
            "slo_ttft_s": np.asarray(rows["slo_ttft_s"], dtype=np.float64),
            "slo_tpot_s": np.asarray(rows["slo_tpot_s"], dtype=np.float64),
        }
    )
    return finish(
        frame, path, origin_s=origin_s, time_field="arrival_s", lines=np.asarray(lines), name=name
    )


def _jsonl_header(obj: dict[str, Any], path: Path, line: int) -> tuple[str, float]:
    if obj.get(_HEADER_KEY) != FORMAT_VERSION:
        raise TraceFormatError(
            path,
            field=_HEADER_KEY,
            expected=f"format version {FORMAT_VERSION}",
            line=line,
            got=shorten(obj.get(_HEADER_KEY)),
        )
    name = obj.get("name", path.name)
    if not isinstance(name, str):
        raise TraceFormatError(
            path, field="name", expected="a string", line=line, got=shorten(name)
        )
    origin_s = (
        get_number(obj, "origin_s", path, line, expected="a number (seconds)")
        if "origin_s" in obj
        else 0.0
    )
    return name, origin_s
