"""BurstGPT CSV loader: both published schemas, failures, sessions, malformed rows."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from traces.errors import TraceError, TraceFormatError
from traces.loaders import detect_format, load

SIX = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type"
EIGHT = (
    "Timestamp,Session ID,Elapsed time,Model,Request tokens,Response tokens,Total tokens,Log Type"
)


def write(tmp_path: Path, lines: list[str], name: str = "BurstGPT_1.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_six_column_schema_reads_columns_by_name(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            SIX,
            "5,ChatGPT,472,18,490,Conversation log",
            "5,GPT-4,1200,0,1200,API log",
            "9,ChatGPT,35,410,445,API log",
        ],
    )
    assert detect_format(path) == "burstgpt"
    trace = load(path)
    assert trace.name == "BurstGPT_1.csv"
    assert trace.origin_s == 5.0
    assert trace.arrival_s.tolist() == [0.0, 0.0, 4.0]
    assert trace.prompt_tokens.tolist() == [472, 1200, 35]
    assert trace.output_tokens.tolist() == [18, 0, 410]
    reqs = list(trace)
    assert [r.failed for r in reqs] == [False, True, False]
    assert [r.model for r in reqs] == ["ChatGPT", "GPT-4", "ChatGPT"]
    assert [r.log_type for r in reqs] == ["Conversation log", "API log", "API log"]
    assert all(r.session_id is None for r in reqs)


def test_eight_column_schema_with_sessions_and_float_timestamps(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            EIGHT,
            "19440110.0,6f1c9a0e-1,3.2,ChatGPT,100,20,120,Conversation log",
            "19440112.0,,1.5,GPT-4,50,0,50,API log",
            "19440115.0,6f1c9a0e-1,7.0,ChatGPT,180,44,224,Conversation log",
        ],
        name="BurstGPT_3.csv",
    )
    trace = load(path)
    assert trace.origin_s == 19440110.0
    assert trace.arrival_s.tolist() == [0.0, 2.0, 5.0]
    reqs = list(trace)
    assert [r.session_id for r in reqs] == ["6f1c9a0e-1", None, "6f1c9a0e-1"]
    assert [r.failed for r in reqs] == [False, True, False]
    assert reqs[2].model == "ChatGPT" and reqs[1].log_type == "API log"


def test_columns_in_any_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            "Log Type,Response tokens,Request tokens,Model,Timestamp",
            "API log,7,300,GPT-4,12",
        ],
    )
    r = load(path, format="burstgpt")[0]
    assert (r.prompt_tokens, r.output_tokens, r.model, r.log_type) == (300, 7, "GPT-4", "API log")


def test_gzip_and_trailing_blank_lines(tmp_path: Path) -> None:
    text = f"{SIX}\n3,ChatGPT,10,2,12,API log\n4,ChatGPT,11,3,14,API log\n\n\n"
    path = tmp_path / "b.csv.gz"
    path.write_bytes(gzip.compress(text.encode()))
    trace = load(path)
    assert len(trace) == 2
    assert trace.prompt_tokens.tolist() == [10, 11]


def test_out_of_order_rows_are_sorted_with_one_warning_naming_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [SIX, "10,ChatGPT,1,1,2,API log", "8,ChatGPT,2,1,3,API log", "9,ChatGPT,3,1,4,API log"],
    )
    with pytest.warns(UserWarning) as record:
        trace = load(path)
    assert len(record) == 1
    assert str(path) in str(record[0].message)
    assert "1 pair" in str(record[0].message)
    assert record[0].filename == __file__  # points at the caller, not the loader
    assert trace.prompt_tokens.tolist() == [2, 3, 1]
    # ids keep file order, so a request leads back to its line
    assert [r.request_id for r in trace] == [1, 2, 0]


# Each case: (bad data row, field, line, offending value as repr'd in the message).
MALFORMED = [
    ("7,GPT-4,abc,5,5,API log", "Request tokens", "'abc'"),
    ("7,GPT-4,12.5,5,17.5,API log", "Request tokens", "12.5"),
    ("7,GPT-4,0,5,5,API log", "Request tokens", "0"),
    ("7,GPT-4,-4,5,1,API log", "Request tokens", "-4"),
    ("7,GPT-4,10,-3,7,API log", "Response tokens", "-3"),
    ("7,GPT-4,10,,10,API log", "Response tokens", "''"),
    ("7,GPT-4,10,many,10,API log", "Response tokens", "'many'"),
    ("yesterday,GPT-4,10,5,15,API log", "Timestamp", "'yesterday'"),
    (",GPT-4,10,5,15,API log", "Timestamp", "''"),
    ("7,GPT-4,10,5,15,", "Log Type", "''"),
    ("7,,10,5,15,API log", "Model", "''"),
    ("7,GPT-4,10,5", "<row>", "'4 fields'"),
    ("7,GPT-4,10,5,15", "<row>", "'5 fields'"),
    ("1e11,GPT-4,10,5,15,API log", "Timestamp", None),
    ("1e300,GPT-4,10,5,15,API log", "Timestamp", None),
]


@pytest.mark.parametrize(("row", "field", "got"), MALFORMED)
def test_malformed_cell_names_line_field_and_value(
    tmp_path: Path, row: str, field: str, got: str
) -> None:
    path = write(tmp_path, [SIX, "5,ChatGPT,100,20,120,API log", row, "9,ChatGPT,1,1,2,API log"])
    with pytest.raises(TraceFormatError) as err:
        load(path)
    assert err.value.line == 3
    assert err.value.field == field
    message = str(err.value)
    assert f"{path}:3" in message and repr(field) in message
    if got is not None:
        assert f"got {got}" in message


def test_a_short_row_among_rows_with_an_empty_last_cell_is_found(tmp_path: Path) -> None:
    lines = [SIX, "5,ChatGPT,100,20,120,", "6,ChatGPT,100,20,120,", "7,ChatGPT,1,2"]
    with pytest.raises(TraceFormatError, match=r":4: field '<row>'.*got '4 fields'"):
        load(write(tmp_path, lines))


def test_an_absurd_span_names_both_ends(tmp_path: Path) -> None:
    path = write(tmp_path, [SIX, "5,ChatGPT,100,20,120,API log", "1e11,ChatGPT,1,1,2,API log"])
    with pytest.raises(
        TraceFormatError, match=r"within 1e\+09 s .* on line 2; this one is 1e\+11 s"
    ):
        load(path)


def test_ragged_row_names_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, [SIX, "5,ChatGPT,100,20,120,API log", "6,ChatGPT,1,2,3,API log,extra"])
    with pytest.raises(TraceFormatError, match=r":3: .*expected 6 comma-separated fields"):
        load(path)


def test_missing_column_names_the_column(tmp_path: Path) -> None:
    path = write(tmp_path, ["Timestamp,Model,Request tokens,Total tokens,Log Type", "5,A,1,1,x"])
    with pytest.raises(TraceFormatError, match="'Response tokens'") as err:
        load(path, format="burstgpt")
    assert err.value.field == "Response tokens" and str(path) in str(err.value)


def test_empty_file_and_header_only(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(TraceError, match="empty"):
        load(empty, format="burstgpt")
    header_only = write(tmp_path, [SIX])
    with pytest.raises(TraceError, match="no requests"):
        load(header_only)


def test_many_rows_load_with_the_right_totals(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    n = 20_000
    ts = np.sort(rng.integers(100, 10_000, size=n))
    req = rng.integers(1, 4000, size=n)
    resp = rng.integers(0, 900, size=n)
    lines = [SIX] + [
        f"{t},ChatGPT,{a},{b},{a + b},API log" for t, a, b in zip(ts, req, resp, strict=True)
    ]
    trace = load(write(tmp_path, lines))
    assert len(trace) == n
    assert trace.prompt_tokens.sum() == req.sum()
    assert int(trace.frame["failed"].sum()) == int((resp == 0).sum())
    assert trace.span_s == float(ts.max() - ts.min())


def test_saved_burstgpt_csv_loads_back_with_every_burstgpt_field(tmp_path) -> None:
    from traces.loaders import detect_format, load, save
    from traces.request import Request
    from traces.trace import Trace

    original = Trace.from_requests(
        [
            Request(0, 0.0, 120, 40, session_id="s1", model="GPT-4", log_type="Conversation log"),
            Request(1, 1.5, 300, 0, model="ChatGPT", log_type="API log", failed=True),
            Request(2, 2.25, 80, 9, session_id="s1", model="GPT-4", log_type="Conversation log"),
        ]
    )
    path = tmp_path / "sample.csv"
    save(original, path)
    assert detect_format(path) == "burstgpt"
    assert path.read_text().splitlines()[0] == (
        "Timestamp,Session ID,Elapsed time,Model,Request tokens,Response tokens,"
        "Total tokens,Log Type"
    )
    back = load(path)
    assert back.equals(original)
