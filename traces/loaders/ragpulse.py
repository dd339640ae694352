"""RAGPulse trace loader (flashserve/RAGPulse, arXiv 2511.12979).

``0_trace.jsonl`` holds one request per line, fields read by name::

    {"timestamp": "82", "input_length": 3112, "output_length": 192,
     "hash_ids": {"sys_prompt": [...], "passages_ids": [...], "history": [...],
                  "web_search": [...], "user_input": [...]},
     "session_id": "1757476916095-afhwfadnh5ew"}

``timestamp`` is whole seconds from the trace start, written as a string.
Each ``hash_ids`` part lists content ids whose token lengths are in sibling
tables in the same directory (a ``.gz`` copy of a table is read as well):

=============  ======================  ===============
part           table                   id field
=============  ======================  ===============
sys_prompt     ``1_sys_prompt.jsonl``  sys_prompt_id
passages_ids   ``2_passages.jsonl``    passage_id
history        ``3_history.jsonl``     history_id
web_search     ``5_web_search.jsonl``  web_search_id
user_input     ``4_user_input.jsonl``  user_input_id
=============  ======================  ===============

Prefix hashes. The prompt is taken to be the parts concatenated in the order
of the table above: system prompt, retrieved passages, chat history, web
search results, user question. That is the order of the ``hash_ids`` keys in
the file and the order in which the dataset's own replay tool
(``example/single_online_instance/preprocess_data.py``) concatenates them, and
it puts the most widely shared content (the system prompt) first, as a RAG
prompt does. Token ``k`` of content id ``i`` of part ``p`` is identified by
``(p, i, k)``; every full block of ``block_tokens`` tokens is hashed with
BLAKE2b (8-byte digest, read as a little-endian signed int64) over the
previous block's digest followed by the block's content, packed as one
``(part, id, first offset, token count)`` record per run of one content id.
Two requests thus share their first k hashes exactly when their first
``k * block_tokens`` tokens are the same content. ``input_length`` exceeds the
parts' sum by 6-12 template tokens; those, with any partial last block, are
the unhashed tail, and ``prompt_tokens = input_length``.
"""

from __future__ import annotations

import hashlib
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from traces.errors import ConfigError, TraceError, TraceFormatError
from traces.loaders._common import (
    finish,
    get_int,
    get_int_list,
    get_optional_str,
    iter_json_objects,
    object_column,
    shorten,
)
from traces.trace import Trace

__all__ = ["PARTS", "load_ragpulse"]

#: (hash_ids key, table file, id field) in prompt order.
PARTS: tuple[tuple[str, str, str], ...] = (
    ("sys_prompt", "1_sys_prompt.jsonl", "sys_prompt_id"),
    ("passages_ids", "2_passages.jsonl", "passage_id"),
    ("history", "3_history.jsonl", "history_id"),
    ("web_search", "5_web_search.jsonl", "web_search_id"),
    ("user_input", "4_user_input.jsonl", "user_input_id"),
)
_PART_KEYS = tuple(key for key, _, _ in PARTS)
_RUN = struct.Struct("<Bqqq")  # part index, content id, first offset, token count
_SECONDS = re.compile(r"\d+(\.\d+)?")


def _table_path(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_table(path: Path, id_field: str) -> dict[int, int]:
    lengths: dict[int, int] = {}
    for line, obj in iter_json_objects(path):
        content_id = get_int(obj, id_field, path, line, minimum=None)
        if content_id in lengths:
            raise TraceFormatError(
                path, field=id_field, expected="an id listed once", line=line, got=content_id
            )
        lengths[content_id] = get_int(obj, "token_length", path, line, minimum=0)
    return lengths


def _load_tables(directory: Path) -> list[dict[int, int]]:
    tables = []
    for _, name, id_field in PARTS:
        table = _table_path(directory, name)
        if table is None:
            raise TraceError(
                f"{directory / name}: RAGPulse token-length table not found beside the trace; "
                "it is needed for prefix hashes (load with prefix=False to skip them)"
            )
        tables.append(_load_table(table, id_field))
    return tables


# A chain's state between runs: last digest, packed runs of the unfinished block, its tokens.
_State = tuple[bytes, bytes, int]


class _BlockHasher:
    """Chained block hashes of prompts given as (part, id, length) runs.

    Prompts share long leading runs (the system prompt), so the effect of a
    run on a chain state is memoized: a shared prefix is hashed once per load.
    """

    def __init__(self, block_tokens: int) -> None:
        self.block_tokens = block_tokens
        self._memo: dict[tuple[_State, tuple[int, int, int]], tuple[_State, bytes]] = {}

    def hashes(self, runs: list[tuple[int, int, int]]) -> np.ndarray:
        state: _State = (b"", b"", 0)
        digests = []
        for run in runs:
            key = (state, run)
            hit = self._memo.get(key)
            if hit is None:
                hit = self._memo[key] = self._extend(state, run)
            state, emitted = hit
            digests.append(emitted)
        return np.frombuffer(b"".join(digests), dtype="<i8").astype(np.int64)

    def _extend(self, state: _State, run: tuple[int, int, int]) -> tuple[_State, bytes]:
        block = self.block_tokens
        previous, pending, filled = state
        part, content_id, length = run
        out = []
        offset = 0
        if filled:  # complete the unfinished block first
            offset = min(length, block - filled)
            pending += _RUN.pack(part, content_id, 0, offset)
            filled += offset
            if filled == block:
                previous = hashlib.blake2b(previous + pending, digest_size=8).digest()
                out.append(previous)
                pending, filled = b"", 0
        while length - offset >= block:  # here the block is empty: one run per block
            record = _RUN.pack(part, content_id, offset, block)
            previous = hashlib.blake2b(previous + record, digest_size=8).digest()
            out.append(previous)
            offset += block
        if offset < length:
            pending = _RUN.pack(part, content_id, offset, length - offset)
            filled = length - offset
        return (previous, pending, filled), b"".join(out)


def _timestamp(obj: dict[str, Any], path: Path, line: int) -> float:
    expected = 'seconds as a string, e.g. "82"'
    if "timestamp" not in obj:
        raise TraceFormatError(
            path, field="timestamp", expected=expected + " (field missing)", line=line
        )
    value = obj["timestamp"]
    if isinstance(value, str) and _SECONDS.fullmatch(value):
        return float(value)
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    raise TraceFormatError(
        path, field="timestamp", expected=expected, line=line, got=shorten(value)
    )


def _runs(
    obj: dict[str, Any], tables: list[dict[int, int]], path: Path, line: int
) -> list[tuple[int, int, int]]:
    """The prompt's (part, id, token length) runs in prompt order."""
    parts = obj.get("hash_ids")
    expected = f"an object with id lists {', '.join(_PART_KEYS)}"
    if not isinstance(parts, dict):
        raise TraceFormatError(
            path,
            field="hash_ids",
            expected=expected + (" (field missing)" if "hash_ids" not in obj else ""),
            line=line,
            got=shorten(parts),
        )
    unknown = sorted(set(parts) - set(_PART_KEYS))
    if unknown:
        raise TraceFormatError(
            path,
            field=f"hash_ids.{unknown[0]}",
            expected=f"only the parts {', '.join(_PART_KEYS)}",
            line=line,
        )
    runs = []
    for index, ((key, table_name, _), table) in enumerate(zip(PARTS, tables, strict=True)):
        field = f"hash_ids.{key}"
        for content_id in get_int_list(parts, key, path, line, field=field):
            length = table.get(content_id)
            if length is None:
                raise TraceFormatError(
                    path,
                    field=field,
                    expected=f"an id listed in {table_name}",
                    line=line,
                    got=content_id,
                )
            if length:
                runs.append((index, content_id, length))
    return runs


def load_ragpulse(path: str | Path, *, block_tokens: int = 16, prefix: bool = True) -> Trace:
    """Load a RAGPulse ``0_trace.jsonl`` as a Trace named after the file.

    Args:
        path: the trace file; with ``prefix`` its five token-length tables
            must sit in the same directory.
        block_tokens: tokens per prefix-hash block.
        prefix: compute ``prefix_hashes``; ``False`` skips ``hash_ids`` and
            the tables entirely.

    Raises:
        TraceFormatError: invalid JSON, a missing field, a wrong type, a bad
            timestamp or token count, an id absent from its table (naming the
            table and the id), ``input_length`` below the parts' token sum.
        TraceError: no requests, or a table is missing (with ``prefix``).
        ConfigError: ``block_tokens`` is not a positive integer.
    """
    path = Path(path)
    if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < 1:
        raise ConfigError(
            f"ragpulse option block_tokens: expected a positive integer, got {block_tokens!r}"
        )
    if not isinstance(prefix, bool):
        raise ConfigError(f"ragpulse option prefix: expected True or False, got {prefix!r}")
    tables = _load_tables(path.parent) if prefix else []
    hasher = _BlockHasher(block_tokens)
    ts: list[float] = []
    prompt: list[int] = []
    output: list[int] = []
    sessions: list[str | None] = []
    hashes: list[np.ndarray] = []
    lines: list[int] = []
    for line, obj in iter_json_objects(path):
        lines.append(line)
        ts.append(_timestamp(obj, path, line))
        input_length = get_int(obj, "input_length", path, line, minimum=1)
        prompt.append(input_length)
        output.append(get_int(obj, "output_length", path, line, minimum=0))
        if "session_id" not in obj:
            raise TraceFormatError(
                path, field="session_id", expected="a string (field missing)", line=line
            )
        sessions.append(get_optional_str(obj, "session_id", path, line))
        if prefix:
            runs = _runs(obj, tables, path, line)
            parts_tokens = sum(length for _, _, length in runs)
            if input_length < parts_tokens:
                raise TraceFormatError(
                    path,
                    field="input_length",
                    expected=f"at least the hash_ids parts' {parts_tokens} tokens",
                    line=line,
                    got=input_length,
                )
            hashes.append(hasher.hashes(runs))
    if not ts:
        raise TraceError(f"{path}: no requests (the file is empty)")

    t_s = np.asarray(ts, dtype=np.float64)
    origin_s = float(t_s.min())
    frame = pd.DataFrame(
        {
            "arrival_s": t_s - origin_s,
            "prompt_tokens": np.asarray(prompt, dtype=np.int64),
            "output_tokens": np.asarray(output, dtype=np.int64),
            "session_id": object_column(sessions),
        }
    )
    if prefix:
        frame["prefix_hashes"] = object_column(hashes)
        frame["block_tokens"] = pd.array([block_tokens] * len(t_s), dtype="Int64")
    return finish(frame, path, origin_s=origin_s, time_field="timestamp", lines=np.asarray(lines))
