"""RAGPulse loader: token-length tables, chained block hashes, prefix=False, malformed input."""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
from pathlib import Path

import pytest

from traces.errors import ConfigError, TraceError, TraceFormatError
from traces.loaders import detect_format, load

# token lengths per part: file -> (id field, {id: tokens})
TABLES = {
    "1_sys_prompt.jsonl": ("sys_prompt_id", {1: 20, 2: 12}),
    "2_passages.jsonl": ("passage_id", {10: 8, 11: 30, 12: 9}),
    "3_history.jsonl": ("history_id", {20: 5}),
    "4_user_input.jsonl": ("user_input_id", {30: 3, 31: 4}),
    "5_web_search.jsonl": ("web_search_id", {40: 16}),
}


def parts(sys=(), passages=(), history=(), web=(), user=()) -> dict:
    return {
        "sys_prompt": list(sys),
        "passages_ids": list(passages),
        "history": list(history),
        "web_search": list(web),
        "user_input": list(user),
    }


def rec(ts: str, hash_ids: dict, input_length: int, session: str = "s1", out: int = 9) -> dict:
    return {
        "timestamp": ts,
        "input_length": input_length,
        "output_length": out,
        "hash_ids": hash_ids,
        "session_id": session,
    }


# A and B share system prompt 1 and passage 10 (28 tokens), then differ.
A = rec("100", parts([1], [10, 11], [20], [], [30]), 66 + 9)
B = rec("103", parts([1], [10], [], [40], [30]), 47 + 7, session="s2")


def write_dir(tmp_path: Path, records: list, tables: dict = TABLES, gz: bool = False) -> Path:
    for name, (id_field, lengths) in tables.items():
        text = "".join(
            json.dumps({id_field: i, "token_length": n}) + "\n" for i, n in lengths.items()
        )
        if gz:
            (tmp_path / f"{name}.gz").write_bytes(gzip.compress(text.encode()))
        else:
            (tmp_path / name).write_text(text)
    path = tmp_path / "0_trace.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def common_prefix(a: tuple, b: tuple) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def test_fields_sessions_and_lengths(tmp_path: Path) -> None:
    path = write_dir(tmp_path, [A, B])
    assert detect_format(path) == "ragpulse"
    trace = load(path)
    assert trace.origin_s == 100.0 and trace.arrival_s.tolist() == [0.0, 3.0]
    a, b = list(trace)
    assert (a.prompt_tokens, a.output_tokens, a.session_id) == (75, 9, "s1")
    assert b.session_id == "s2"
    # only full 16-token blocks of the parts are hashed; the template tail is not
    assert len(a.prefix_hashes) == 66 // 16 and len(b.prefix_hashes) == 47 // 16
    assert a.block_tokens == 16


@pytest.mark.parametrize("block_tokens", [1, 4, 7, 16, 28, 29])
def test_requests_share_hashes_exactly_over_their_shared_tokens(
    tmp_path: Path, block_tokens: int
) -> None:
    a, b = list(load(write_dir(tmp_path, [A, B]), block_tokens=block_tokens))
    assert common_prefix(a.prefix_hashes, b.prefix_hashes) == 28 // block_tokens
    assert a.block_tokens == block_tokens


def test_parts_are_concatenated_sys_passages_history_web_user(tmp_path: Path) -> None:
    # Same system prompt, passages and history; different web search: the
    # shared prefix is sys + passages + history (20 + 9 + 5 = 34 tokens).
    c = rec("1", parts([1], [12], [20], [40], [30]), 60)
    d = rec("2", parts([1], [12], [20], [], [31]), 60)
    c_req, d_req = list(load(write_dir(tmp_path, [c, d]), block_tokens=2))
    assert common_prefix(c_req.prefix_hashes, d_req.prefix_hashes) == 34 // 2


def test_hash_is_the_documented_stable_blake2b_chain(tmp_path: Path) -> None:
    # Block 1 = tokens 0..15 of system prompt 1 (part 0); block 2 = its tokens
    # 16..19, then passage 10 (part 1) tokens 0..7, then passage 11 tokens 0..3.
    first = hashlib.blake2b(struct.pack("<Bqqq", 0, 1, 0, 16), digest_size=8).digest()
    second_content = b"".join(
        [
            struct.pack("<Bqqq", 0, 1, 16, 4),
            struct.pack("<Bqqq", 1, 10, 0, 8),
            struct.pack("<Bqqq", 1, 11, 0, 4),
        ]
    )
    second = hashlib.blake2b(first + second_content, digest_size=8).digest()
    a = load(write_dir(tmp_path, [A]))[0]
    assert a.prefix_hashes[:2] == (
        int.from_bytes(first, "little", signed=True),
        int.from_bytes(second, "little", signed=True),
    )


def test_gzipped_tables_and_unsorted_trace(tmp_path: Path) -> None:
    path = write_dir(tmp_path, [B, A], gz=True)
    with pytest.warns(UserWarning, match=r"0_trace\.jsonl: 1 pair"):
        trace = load(path)
    assert [r.session_id for r in trace] == ["s1", "s2"]


def test_prefix_false_needs_no_tables(tmp_path: Path) -> None:
    path = tmp_path / "0_trace.jsonl"
    path.write_text(json.dumps(A) + "\n" + json.dumps(B) + "\n")
    with pytest.raises(TraceError, match=r"1_sys_prompt\.jsonl.*prefix=False"):
        load(path)
    a, b = list(load(path, prefix=False))
    assert a.prefix_hashes is None and a.block_tokens is None
    assert (a.prompt_tokens, b.session_id) == (75, "s2")


def test_missing_table_is_named(tmp_path: Path) -> None:
    path = write_dir(tmp_path, [A])
    (tmp_path / "3_history.jsonl").unlink()
    with pytest.raises(TraceError, match=r"3_history\.jsonl"):
        load(path)


@pytest.mark.parametrize("block_tokens", [0, -16, 2.5, True])
def test_bad_block_tokens_option(tmp_path: Path, block_tokens: object) -> None:
    with pytest.raises(ConfigError, match="block_tokens"):
        load(write_dir(tmp_path, [A]), block_tokens=block_tokens)


# Each case: (record fields to change, field named in the error, offending value repr or None).
MALFORMED = [
    ({"timestamp": "12a"}, "timestamp", "'12a'"),
    ({"timestamp": None}, "timestamp", None),
    ({"timestamp": "-5"}, "timestamp", "'-5'"),
    ({"input_length": "3000"}, "input_length", "'3000'"),
    ({"input_length": 0}, "input_length", "0"),
    ({"input_length": 50}, "input_length", "50"),  # below the parts' 66 tokens
    ({"output_length": -2}, "output_length", "-2"),
    ({"output_length": 2.5}, "output_length", "2.5"),
    ({"session_id": 17}, "session_id", "17"),
    ({"hash_ids": [1, 2]}, "hash_ids", "[1, 2]"),
    ({"hash_ids": {**A["hash_ids"], "images": [1]}}, "hash_ids.images", None),
    (
        {"hash_ids": {k: v for k, v in A["hash_ids"].items() if k != "history"}},
        "hash_ids.history",
        None,
    ),
    ({"hash_ids": {**A["hash_ids"], "user_input": ["30"]}}, "hash_ids.user_input", "['30']"),
    ({"hash_ids": {**A["hash_ids"], "passages_ids": [10, 999]}}, "hash_ids.passages_ids", "999"),
]


@pytest.mark.parametrize(("change", "field", "got"), MALFORMED)
def test_malformed_record_names_line_and_field(
    tmp_path: Path, change: dict, field: str, got: str | None
) -> None:
    path = write_dir(tmp_path, [B, {**A, **change}])
    with pytest.raises(TraceFormatError) as err:
        load(path)
    assert (err.value.line, err.value.field) == (2, field)
    assert f"{path}:2" in str(err.value)
    if got is not None:
        assert f"got {got}" in str(err.value)


@pytest.mark.parametrize("text", ['{"timestamp": "5", "input_length":', '["not", "an object"]'])
def test_invalid_json_line(tmp_path: Path, text: str) -> None:
    path = write_dir(tmp_path, [A])
    path.write_text(path.read_text() + text + "\n")
    with pytest.raises(TraceFormatError, match=r"0_trace\.jsonl:2: field '<json>'"):
        load(path)


def test_unknown_id_error_names_the_table(tmp_path: Path) -> None:
    bad = {**A, "hash_ids": {**A["hash_ids"], "passages_ids": [10, 999]}}
    with pytest.raises(TraceFormatError, match=r"an id listed in 2_passages\.jsonl; got 999"):
        load(write_dir(tmp_path, [bad]))


def test_missing_field_is_named(tmp_path: Path) -> None:
    for key in ("session_id", "input_length", "output_length", "hash_ids", "timestamp"):
        record = {k: v for k, v in A.items() if k != key}
        with pytest.raises(TraceFormatError, match=f"'{key}'.*missing") as err:
            load(write_dir(tmp_path, [record]))
        assert err.value.line == 1


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"passage_id": 13, "token_length": -1}, "token_length"),
        ({"passage_id": "10", "token_length": 8}, "passage_id"),
        ({"token_length": 8}, "passage_id"),
        ({"passage_id": 10, "token_length": 8}, "passage_id"),  # listed twice
    ],
)
def test_malformed_table_row_names_table_file_and_line(
    tmp_path: Path, row: dict, field: str
) -> None:
    path = write_dir(tmp_path, [A])
    table = tmp_path / "2_passages.jsonl"
    table.write_text(table.read_text() + json.dumps(row) + "\n")
    with pytest.raises(TraceFormatError) as err:
        load(path)
    assert err.value.path == str(table)
    assert (err.value.line, err.value.field) == (4, field)


def test_empty_trace_file(tmp_path: Path) -> None:
    path = write_dir(tmp_path, [])
    with pytest.raises(TraceError, match="no requests"):
        load(path, format="ragpulse")
