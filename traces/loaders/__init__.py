"""Trace loaders: read public LLM-serving traces and the project's own files as a Trace.

Formats (``FORMATS``):

============  ====================================================  =====================
name          source                                                options
============  ====================================================  =====================
burstgpt      BurstGPT CSV, 6- or 8-column schema                   —
azure         Azure LLM inference trace CSV (2023, 2024)            —
mooncake      Mooncake FAST'25 JSONL (512-token ``hash_ids``)       jitter, bucket_s, seed
ragpulse      RAGPulse ``0_trace.jsonl`` + its token-length tables  block_tokens, prefix
parquet       canonical Parquet (:mod:`traces.loaders.canonical`)   —
jsonl         canonical JSON Lines                                  —
============  ====================================================  =====================

Every text format may be gzip-compressed (detected by content, so the name
need not end in ``.gz``). Example::

    from traces.loaders import load, save

    trace = load("conversation_trace.jsonl", jitter=True, seed=1)
    save(trace, "conversation.parquet")

``bundled:NAME`` stands for a trace shipped with llmsched wherever a path
does. Options are checked against their loader's types (a switch takes
true or false, ``"False"`` included). A loader names the file, 1-based line
and field of any malformed value (:class:`~traces.errors.TraceFormatError`),
arrivals spanning more than :data:`~traces.trace.MAX_SPAN_S` included; a
file that is not text or a cut-off gzip is a
:class:`~traces.errors.TraceError`, never a decoder's own exception.

Arrivals count from the earliest request (``arrival_s`` 0) and
``Trace.origin_s`` keeps where that lies on the source's clock; rows out of
order are sorted stably, with one warning that names the file and how many
consecutive pairs were out of order (none for the bundled traces, whose
order is the published one).
"""

from __future__ import annotations

import csv
import gzip
import inspect
import json
import math
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from traces.bundled import BUNDLED_PREFIX, bundled_path
from traces.errors import ConfigError, TraceError
from traces.loaders._common import PARQUET_MAGIC, first_line, shorten
from traces.loaders.azure import load_azure
from traces.loaders.burstgpt import load_burstgpt, save_burstgpt
from traces.loaders.canonical import load_jsonl, load_parquet, save_jsonl, save_parquet
from traces.loaders.mooncake import load_mooncake
from traces.loaders.ragpulse import load_ragpulse
from traces.trace import Trace

__all__ = ["FORMATS", "detect_format", "load", "save"]

_LOADERS: dict[str, Callable[..., Trace]] = {
    "burstgpt": load_burstgpt,
    "azure": load_azure,
    "mooncake": load_mooncake,
    "ragpulse": load_ragpulse,
    "parquet": load_parquet,
    "jsonl": load_jsonl,
}

#: Names accepted by ``load(..., format=...)``.
FORMATS: tuple[str, ...] = tuple(_LOADERS)


def _known() -> str:
    return ", ".join(FORMATS)


def _options(fmt: str) -> dict[str, Any]:
    """Option name -> its type, from the keyword-only parameters of the format's loader."""
    params = inspect.signature(_LOADERS[fmt], eval_str=True).parameters.values()
    return {p.name: p.annotation for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _option_value(fmt: str, name: str, kind: Any, value: Any) -> Any:
    """``value`` checked against the option's type: a switch, an integer or a number.

    Values from the command line arrive read as JSON where they parse, so
    ``true`` is a bool and ``3`` an int; a switch also takes the words
    ``true`` and ``false`` in any case (``False``), and nothing else.

    Raises:
        ConfigError: a value of another type, naming the format and option.
    """
    if kind is bool:
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        ok, expected = isinstance(value, bool), "true or false"
    elif kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        ok, expected = type(value) is int, "an integer"
    elif kind is float:
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        ok, expected = is_number and math.isfinite(value), "a number"
    else:
        return value
    if not ok:
        raise ConfigError(f"trace format {fmt!r} option {name}: expected {expected}, got {value!r}")
    return value


def _not_a_file(path: Path) -> str:
    return "is a directory, expected a trace file" if path.is_dir() else "no such file"


def _sniff_json(line: str) -> str | None:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    if "llmsched_trace" in obj or {"arrival_s", "prompt_tokens"} <= obj.keys():
        return "jsonl"
    if isinstance(obj.get("hash_ids"), dict) or {"session_id", "input_length"} <= obj.keys():
        return "ragpulse"
    if {"timestamp", "input_length"} <= obj.keys():
        return "mooncake"
    return None


def _sniff_csv(line: str) -> str | None:
    header = next(csv.reader([line]), [])
    if {"Timestamp", "Request tokens"} <= set(header):
        return "burstgpt"
    if {"TIMESTAMP", "ContextTokens"} <= set(header):
        return "azure"
    return None


def detect_format(path: str | Path) -> str:
    """The format of a trace file, from its content (magic bytes, CSV header, first JSON line).

    Raises:
        TraceError: no such file, an empty file, or none of ``FORMATS`` matches
            (the message lists them).
    """
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: {_not_a_file(path)}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if not magic:
        raise TraceError(f"{path}: the file is empty; expected a trace in one of: {_known()}")
    if magic == PARQUET_MAGIC:
        return "parquet"
    line = first_line(path)
    if line is None:
        raise TraceError(f"{path}: no text lines; expected a trace in one of: {_known()}")
    fmt = _sniff_json(line) if line.lstrip().startswith("{") else _sniff_csv(line)
    if fmt is None:
        raise TraceError(
            f"{path}: cannot tell the trace format from its first line {shorten(line)!r}; "
            f"known formats: {_known()}; name one with --format "
            '(format = "..." in a scenario\'s [trace], format=... in Python)'
        )
    return fmt


def load(path: str | Path, format: str | None = None, **options: Any) -> Trace:
    """Load a trace file as a Trace (named after the file).

    Args:
        path: the file; gzip-compressed text is read transparently.
            ``bundled:NAME`` reads a trace shipped with llmsched
            (:data:`traces.bundled.BUNDLED`), and the trace is named NAME.
        format: one of ``FORMATS``; detected from the file when None.
        **options: options of that format (see the module docstring), such as
            ``jitter=True, seed=0`` for mooncake.

    Raises:
        TraceError: unknown or undetectable format, missing or empty file, no
            bundled trace of that name (the message lists them), a file that
            is not UTF-8 text or a damaged gzip file.
        TraceFormatError: a malformed value (file, line, field, expected, got).
        ConfigError: an option the format does not take, or a value not of the
            option's type (a switch takes true or false; ``"False"`` is false).
    """
    given = str(path)
    bundled = given.removeprefix(BUNDLED_PREFIX) if given.startswith(BUNDLED_PREFIX) else None
    path = Path(path) if bundled is None else bundled_path(bundled)
    if format is None:
        fmt = detect_format(path)
    elif format in _LOADERS:
        fmt = format
        if not path.is_file():
            raise TraceError(f"{path}: {_not_a_file(path)}")
    else:
        raise TraceError(f"unknown trace format {format!r}; known formats: {_known()}")
    accepted = _options(fmt)
    checked = {}
    for name, value in options.items():
        if name not in accepted:
            takes = ", ".join(accepted) if accepted else "no options"
            raise ConfigError(f"trace format {fmt!r} has no option {name!r} (it takes: {takes})")
        checked[name] = _option_value(fmt, name, accepted[name], value)
    try:
        trace = _LOADERS[fmt](path, **checked)
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path}: not UTF-8 text ({exc.reason}); expected a {fmt} trace") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise TraceError(f"{path}: a damaged gzip file ({exc}); expected a {fmt} trace") from None
    if bundled is not None:
        trace.name = bundled
    return trace


def save(trace: Trace, path: str | Path) -> None:
    """Write ``trace`` in the canonical format its name asks for.

    ``.parquet`` writes Parquet; ``.jsonl`` and ``.jsonl.gz`` write JSON Lines;
    ``.csv`` writes BurstGPT's 8-column schema (lossy: no prefix hashes or SLOs).

    Raises:
        TraceError: any other file name, or a folder that does not exist.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise TraceError(f"{path}: cannot write here: no folder {path.parent}")
    name = path.name.lower()
    if name.endswith(".parquet"):
        save_parquet(trace, path)
    elif name.endswith((".jsonl", ".jsonl.gz")):
        save_jsonl(trace, path)
    elif name.endswith(".csv"):
        save_burstgpt(trace, path)
    else:
        raise TraceError(
            f"{path}: cannot tell the format to write; use .parquet, .jsonl, .jsonl.gz or .csv (BurstGPT)"
        )
