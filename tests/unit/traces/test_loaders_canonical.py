"""Canonical Parquet and JSONL: exact round trips and validation of what is read back."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from traces.errors import TraceError, TraceFormatError
from traces.loaders import detect_format, load, save
from traces.request import Request
from traces.trace import Trace


def rich_trace() -> Trace:
    """Every field set somewhere and unset somewhere else."""
    reqs = [
        Request(0, 0.0, 512, 30, session_id="conv-1", prefix_hashes=(7, -3, 2**62),
                block_tokens=16, model="ChatGPT", log_type="Conversation log",
                slo_ttft_s=0.25, slo_tpot_s=0.05),
        Request(1, 0.1 + 0.2, 1, 0, failed=True, model="GPT-4", log_type="API log"),
        Request(5, 1.0 / 3.0, 9000, 1, prefix_hashes=(), block_tokens=512, slo_ttft_s=2.0),
        Request(3, 7.5, 40, 2, session_id="", model="ChatGPT", slo_tpot_s=1e-3),
    ]  # fmt: skip
    trace = Trace.from_requests(reqs, name="rich")
    return trace.replace(trace.frame, origin_s=1_700_158_623.9799600)


@pytest.mark.parametrize("name", ["t.parquet", "t.jsonl", "t.jsonl.gz"])
def test_round_trip_is_exact(tmp_path: Path, name: str) -> None:
    trace = rich_trace()
    path = tmp_path / name
    save(trace, path)
    back = load(path)
    assert back.equals(trace)
    assert (back.name, back.origin_s) == ("rich", trace.origin_s)
    assert list(back)[3].session_id == ""  # an empty string stays a string
    assert list(back)[1].prefix_hashes is None and list(back)[2].prefix_hashes == ()


def test_parquet_keeps_category_lists_and_dtypes(tmp_path: Path) -> None:
    trace = rich_trace()
    frame = trace.frame.copy()
    frame["model"] = frame["model"].cat.add_categories(["unused"])
    trace = trace.replace(frame)
    save(trace, tmp_path / "t.parquet")
    back = load(tmp_path / "t.parquet")
    assert list(back.frame["model"].cat.categories) == ["ChatGPT", "GPT-4", "unused"]
    assert back.frame.dtypes.astype(str).to_dict() == trace.frame.dtypes.astype(str).to_dict()


def test_detects_both_canonical_formats_by_content(tmp_path: Path) -> None:
    trace = rich_trace()
    save(trace, tmp_path / "a.parquet")
    save(trace, tmp_path / "a.jsonl.gz")
    (tmp_path / "a.parquet").rename(tmp_path / "noext1")
    (tmp_path / "a.jsonl.gz").rename(tmp_path / "noext2")
    assert detect_format(tmp_path / "noext1") == "parquet"
    assert detect_format(tmp_path / "noext2") == "jsonl"
    assert load(tmp_path / "noext2").equals(trace)


def test_jsonl_header_is_first_line_and_optional(tmp_path: Path) -> None:
    save(rich_trace(), tmp_path / "t.jsonl")
    lines = (tmp_path / "t.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    assert header["llmsched_trace"] == 1 and header["name"] == "rich"
    (tmp_path / "bare.jsonl").write_text("\n".join(lines[1:]) + "\n")
    bare = load(tmp_path / "bare.jsonl")
    assert bare.equals(rich_trace())
    assert (bare.name, bare.origin_s) == ("bare.jsonl", 0.0)


def test_minimal_jsonl_records_get_defaults(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(
        '{"arrival_s": 0.5, "prompt_tokens": 10, "output_tokens": 3}\n'
        '{"arrival_s": 1.5, "prompt_tokens": 20, "output_tokens": 4}\n'
    )
    a, b = list(load(path))
    assert (a.request_id, b.request_id) == (0, 1)
    assert a.failed is False and a.session_id is None and a.slo_ttft_s is None


def test_empty_trace_round_trips_but_an_empty_file_does_not_load(tmp_path: Path) -> None:
    empty = Trace.from_requests([], name="none")
    for name in ("e.parquet", "e.jsonl"):
        save(empty, tmp_path / name)
        back = load(tmp_path / name)
        assert len(back) == 0 and back.name == "none"
    (tmp_path / "zero.jsonl").write_text("")
    with pytest.raises(TraceError, match="empty"):
        load(tmp_path / "zero.jsonl", format="jsonl")


def test_unsorted_canonical_file_warns_once(tmp_path: Path) -> None:
    path = tmp_path / "u.jsonl"
    path.write_text(
        '{"request_id": 4, "arrival_s": 2.0, "prompt_tokens": 10, "output_tokens": 3}\n'
        '{"request_id": 9, "arrival_s": 1.0, "prompt_tokens": 20, "output_tokens": 4}\n'
    )
    with pytest.warns(UserWarning, match=r"u\.jsonl: 1 pair") as record:
        trace = load(path)
    assert len(record) == 1
    assert [r.request_id for r in trace] == [9, 4]


def good(**change: object) -> str:
    record = {"request_id": 1, "arrival_s": 0.0, "prompt_tokens": 5, "output_tokens": 1}
    record.update(change)
    return json.dumps(record)


JSONL_MALFORMED = [
    (good(prompt_tokens=0), "prompt_tokens", "0"),
    (good(prompt_tokens="5"), "prompt_tokens", "'5'"),
    (good(output_tokens=-1), "output_tokens", "-1"),
    (good(output_tokens=2.5), "output_tokens", "2.5"),
    (good(arrival_s="0"), "arrival_s", "'0'"),
    (good(arrival_s=None), "arrival_s", None),
    (good(request_id=0), "request_id", "0"),  # used by line 1
    (good(failed="yes"), "failed", "'yes'"),
    (good(session_id=3), "session_id", "3"),
    (good(prefix_hashes=[1, 2]), "block_tokens", None),
    (good(prefix_hashes=[1, 2], block_tokens=0), "block_tokens", "0"),
    (good(prefix_hashes="12"), "prefix_hashes", "'12'"),
    (good(slo_ttft_s="fast"), "slo_ttft_s", "'fast'"),
    (good(priority=1), "priority", None),
    ('{"request_id": 1, "arrival_s": 0.0, "output_tokens": 1}', "prompt_tokens", None),
    ('{"arrival_s": 1.0,', "<json>", None),
    ('"just a string"', "<json>", "'just a string'"),
]


@pytest.mark.parametrize(("line", "field", "got"), JSONL_MALFORMED)
def test_jsonl_malformed_record_names_line_and_field(
    tmp_path: Path, line: str, field: str, got: str | None
) -> None:
    path = tmp_path / "bad.jsonl"
    header = '{"llmsched_trace": 1, "name": "x", "origin_s": 0}'
    first = '{"request_id": 0, "arrival_s": 0.0, "prompt_tokens": 5, "output_tokens": 1}'
    path.write_text(f"{header}\n{first}\n{line}\n")
    with pytest.raises(TraceFormatError) as err:
        load(path)
    assert (err.value.line, err.value.field) == (3, field)
    assert f"{path}:3" in str(err.value)
    if got is not None:
        assert f"got {got}" in str(err.value)


def test_jsonl_bad_header(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    path.write_text('{"llmsched_trace": 99, "name": "x"}\n' + good() + "\n")
    with pytest.raises(TraceFormatError, match=r"h\.jsonl:1: field 'llmsched_trace'"):
        load(path)


def parquet_with(tmp_path: Path, **columns: pa.Array) -> Path:
    base = {
        "arrival_s": pa.array([0.0, 1.0, 2.0]),
        "prompt_tokens": pa.array([5, 6, 7], type=pa.int64()),
        "output_tokens": pa.array([1, 1, 1], type=pa.int64()),
    }
    base.update(columns)
    table = pa.table({k: v for k, v in base.items() if v is not None})
    path = tmp_path / "p.parquet"
    pq.write_table(table, path)
    return path


PARQUET_MALFORMED = [
    ({"arrival_s": None}, "arrival_s", None, None),
    ({"prompt_tokens": pa.array(["5", "6", "7"])}, "prompt_tokens", None, "'string'"),
    ({"prompt_tokens": pa.array([5, 0, 7])}, "prompt_tokens", 2, "0"),
    ({"output_tokens": pa.array([1, None, 1], type=pa.int64())}, "output_tokens", 2, None),
    ({"output_tokens": pa.array([1, 1, -4])}, "output_tokens", 3, "-4"),
    ({"arrival_s": pa.array([0.0, float("nan"), 1.0])}, "arrival_s", 2, "nan"),
    ({"colour": pa.array(["r", "g", "b"])}, "colour", None, None),
    ({"failed": pa.array([1, 0, 0])}, "failed", None, "'int64'"),
    (
        {"prefix_hashes": pa.array([None, [1], None], type=pa.list_(pa.int64()))},
        "block_tokens",
        2,
        None,
    ),
    (
        {
            "prefix_hashes": pa.array([[1], None, None], type=pa.list_(pa.int64())),
            "block_tokens": pa.array([None, 16, None], type=pa.int64()),
        },
        "block_tokens",
        1,
        None,
    ),
]


@pytest.mark.parametrize(("columns", "field", "row", "got"), PARQUET_MALFORMED)
def test_parquet_malformed_names_field_and_row(
    tmp_path: Path, columns: dict, field: str, row: int | None, got: str | None
) -> None:
    path = parquet_with(tmp_path, **columns)
    with pytest.raises(TraceFormatError) as err:
        load(path)
    assert (err.value.field, err.value.line) == (field, row)
    assert repr(field) in str(err.value) and str(path) in str(err.value)
    if got is not None:
        assert f"got {got}" in str(err.value)


def test_parquet_from_other_tools_loads_with_defaults(tmp_path: Path) -> None:
    path = parquet_with(
        tmp_path,
        model=pa.array(["a", None, "b"]),
        block_tokens=pa.array([None, None, None], type=pa.int32()),
        prefix_hashes=pa.array([None, None, None], type=pa.list_(pa.int32())),
    )
    trace = load(path)
    assert (trace.name, trace.origin_s) == ("p.parquet", 0.0)
    assert [r.model for r in trace] == ["a", None, "b"]
    assert np.array_equal(trace.prompt_tokens, [5, 6, 7])


def test_not_a_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1 but not really")
    with pytest.raises(TraceError, match="not a readable Parquet file"):
        load(path)


def test_gzip_jsonl_written_compressed(tmp_path: Path) -> None:
    save(rich_trace(), tmp_path / "t.jsonl.gz")
    text = gzip.decompress((tmp_path / "t.jsonl.gz").read_bytes()).decode()
    assert len(text.splitlines()) == 1 + len(rich_trace())
