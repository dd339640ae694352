"""Azure LLM inference trace loader: 2023 and 2024 timestamp styles, malformed rows."""

from __future__ import annotations

import gzip
from datetime import UTC, datetime
from pathlib import Path

import pytest

from traces.errors import TraceError, TraceFormatError
from traces.loaders import detect_format, load

HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"


def write(tmp_path: Path, lines: list[str], name: str = "AzureLLMInferenceTrace_x.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_2023_timestamps_with_seven_fractional_digits(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            HEADER,
            "2023-11-16 18:17:03.9799600,4808,10",
            "2023-11-16 18:17:04.0319601,3180,8",
            "2023-11-16 18:18:03.9799600,120,0",
        ],
    )
    assert detect_format(path) == "azure"
    trace = load(path)
    first = datetime(2023, 11, 16, 18, 17, 3, 979960, tzinfo=UTC).timestamp()
    assert trace.origin_s == pytest.approx(first, abs=1e-6)
    # 100 ns resolution survives: the 7th digit is kept.
    assert trace.arrival_s[1] == pytest.approx(0.0520001, abs=1e-9)
    assert trace.arrival_s[2] == pytest.approx(60.0, abs=1e-9)
    assert trace.prompt_tokens.tolist() == [4808, 3180, 120]
    assert trace.output_tokens.tolist() == [10, 8, 0]


def test_2024_timestamps_with_offset_and_mixed_precision(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            HEADER,
            "2024-05-10 00:00:00+00:00,100,5",
            "2024-05-10 00:00:00.250000+00:00,200,6",
            "2024-05-10 00:00:02.5+00:00,300,7",
        ],
    )
    trace = load(path)
    assert trace.origin_s == datetime(2024, 5, 10, tzinfo=UTC).timestamp()
    assert trace.arrival_s.tolist() == [0.0, 0.25, 2.5]


def test_gzip_and_unsorted_rows(tmp_path: Path) -> None:
    text = f"{HEADER}\n2023-11-16 18:00:05.0,10,1\n2023-11-16 18:00:01.0,20,2\n"
    path = tmp_path / "azure.csv.gz"
    path.write_bytes(gzip.compress(text.encode()))
    with pytest.warns(UserWarning, match=r"azure\.csv\.gz: 1 pair"):
        trace = load(path)
    assert trace.prompt_tokens.tolist() == [20, 10]
    assert trace.arrival_s.tolist() == [0.0, 4.0]


MALFORMED = [
    ("2023-13-45 99:00:00.0,10,1", "TIMESTAMP", "'2023-13-45 99:00:00.0'"),
    ("not a time,10,1", "TIMESTAMP", "'not a time'"),
    (",10,1", "TIMESTAMP", "''"),
    ("2023-11-16 18:00:02.0,0,1", "ContextTokens", "0"),
    ("2023-11-16 18:00:02.0,ten,1", "ContextTokens", "'ten'"),
    ("2023-11-16 18:00:02.0,10,-1", "GeneratedTokens", "-1"),
    ("2023-11-16 18:00:02.0,10,1.5", "GeneratedTokens", "1.5"),
    ("2023-11-16 18:00:02.0,10,", "GeneratedTokens", "''"),
]


@pytest.mark.parametrize(("row", "field", "got"), MALFORMED)
def test_malformed_cell_names_line_field_and_value(
    tmp_path: Path, row: str, field: str, got: str
) -> None:
    path = write(tmp_path, [HEADER, "2023-11-16 18:00:01.0,10,1", row])
    with pytest.raises(TraceFormatError) as err:
        load(path)
    assert (err.value.line, err.value.field) == (3, field)
    assert f"{path}:3" in str(err.value) and f"got {got}" in str(err.value)


def test_missing_column_and_empty_files(tmp_path: Path) -> None:
    path = write(tmp_path, ["TIMESTAMP,ContextTokens", "2023-11-16 18:00:01.0,10"])
    with pytest.raises(TraceFormatError, match="'GeneratedTokens'"):
        load(path, format="azure")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(TraceError, match="empty"):
        load(empty, format="azure")
    with pytest.raises(TraceError, match="no requests"):
        load(write(tmp_path, [HEADER], name="header.csv"))
