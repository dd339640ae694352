"""Mooncake JSONL loader: fields, 512-token prefix blocks, bucket jitter, malformed lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from traces.errors import ConfigError, TraceError, TraceFormatError
from traces.loaders import detect_format, load


def write(tmp_path: Path, records: list[object], name: str = "trace.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def rec(ts: int, n_in: int = 1000, n_out: int = 10, ids: list[int] | None = None) -> dict:
    """A row; ``ids`` defaults to one hash per 512-token block of ``n_in``."""
    ids = list(range(-(-n_in // 512))) if ids is None else ids
    return {"timestamp": ts, "input_length": n_in, "output_length": n_out, "hash_ids": ids}


def test_fields_and_prefix_blocks(tmp_path: Path) -> None:
    path = write(tmp_path, [rec(1000, 1100, 50, [0, 1, 2]), rec(4000, 600, 7, [0, 3])])
    assert detect_format(path) == "mooncake"
    trace = load(path)
    assert trace.origin_s == 1.0
    assert trace.arrival_s.tolist() == [0.0, 3.0]
    first, second = list(trace)
    assert (first.prompt_tokens, first.output_tokens) == (1100, 50)
    assert first.prefix_hashes == (0, 1, 2) and second.prefix_hashes == (0, 3)
    assert first.block_tokens == 512 and second.block_tokens == 512


def bucketed(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """Three 3-s buckets holding 4, 1 and 6 requests, like the released trace."""
    ts_ms = [0] * 4 + [3000] + [9000] * 6
    return write(tmp_path, [rec(t, 100 + i) for i, t in enumerate(ts_ms)]), np.array(ts_ms) / 1e3


def test_without_jitter_arrivals_stay_on_the_buckets(tmp_path: Path) -> None:
    path, raw_s = bucketed(tmp_path)
    assert load(path).arrival_s.tolist() == raw_s.tolist()


@pytest.mark.parametrize("bucket_s", [3.0, 1.0])
def test_jitter_spreads_each_bucket_and_keeps_file_order(tmp_path: Path, bucket_s: float) -> None:
    path, raw_s = bucketed(tmp_path)
    trace = load(path, jitter=True, bucket_s=bucket_s, seed=7)
    assert trace.arrival_s[0] == 0.0
    clock_s = trace.origin_s + trace.arrival_s
    ids = np.array([r.request_id for r in trace])
    bucket = raw_s[ids]
    assert np.all(clock_s >= bucket) and np.all(clock_s < bucket + bucket_s)
    # Inside a bucket the file order is kept: ids ascend along the arrivals.
    for t in np.unique(raw_s):
        in_bucket = ids[bucket == t]
        assert in_bucket.tolist() == sorted(in_bucket.tolist())
    assert len(np.unique(trace.arrival_s)) == len(trace)


def test_jitter_is_deterministic_per_seed(tmp_path: Path) -> None:
    path, _ = bucketed(tmp_path)
    a = load(path, jitter=True, seed=1)
    assert a.equals(load(path, jitter=True, seed=1))
    assert not np.array_equal(a.arrival_s, load(path, jitter=True, seed=2).arrival_s)


@pytest.mark.parametrize(
    ("options", "match"),
    [({"bucket_s": 0}, "bucket_s"), ({"bucket_s": "3"}, "bucket_s"), ({"seed": 1.5}, "seed")],
)
def test_bad_option_values(tmp_path: Path, options: dict, match: str) -> None:
    path, _ = bucketed(tmp_path)
    with pytest.raises(ConfigError, match=match):
        load(path, jitter=True, **options)


# Each case: (bad JSON line as text, field, offending value as repr'd in the message or None).
MALFORMED = [
    ('{"timestamp": 0, "input_length": 5', "<json>", None),
    ("[1, 2, 3]", "<json>", "[1, 2, 3]"),
    ('{"timestamp": 0, "output_length": 1, "hash_ids": []}', "input_length", None),
    (
        '{"timestamp": 0, "input_length": "12", "output_length": 1, "hash_ids": []}',
        "input_length",
        "'12'",
    ),
    (
        '{"timestamp": 0, "input_length": 0, "output_length": 1, "hash_ids": []}',
        "input_length",
        "0",
    ),
    (
        '{"timestamp": 0, "input_length": 2.5, "output_length": 1, "hash_ids": []}',
        "input_length",
        "2.5",
    ),
    (
        '{"timestamp": 0, "input_length": 9, "output_length": -1, "hash_ids": []}',
        "output_length",
        "-1",
    ),
    (
        '{"timestamp": 0, "input_length": 9, "output_length": true, "hash_ids": []}',
        "output_length",
        "True",
    ),
    (
        '{"timestamp": "soon", "input_length": 9, "output_length": 1, "hash_ids": []}',
        "timestamp",
        "'soon'",
    ),
    ('{"input_length": 9, "output_length": 1, "hash_ids": []}', "timestamp", None),
    ('{"timestamp": 0, "input_length": 9, "output_length": 1, "hash_ids": 4}', "hash_ids", "4"),
    (
        '{"timestamp": 0, "input_length": 9, "output_length": 1, "hash_ids": ["a"]}',
        "hash_ids",
        "['a']",
    ),
    ('{"timestamp": 0, "input_length": 9, "output_length": 1}', "hash_ids", None),
    (
        '{"timestamp": 0, "input_length": 9, "output_length": 1, "hash_ids": [' + str(2**64) + "]}",
        "hash_ids",
        "[18446744073709551616]",
    ),
    (
        '{"timestamp": 0, "input_length": ' + str(2**64) + ', "output_length": 1, "hash_ids": []}',
        "input_length",
        "18446744073709551616",
    ),
    # hash_ids must hold one hash per 512 tokens: none, too few, too many
    ('{"timestamp": 0, "input_length": 9, "output_length": 1, "hash_ids": []}', "hash_ids", None),
    (
        '{"timestamp": 0, "input_length": 1100, "output_length": 1, "hash_ids": [4, 5]}',
        "hash_ids",
        "'2 hash(es)'",
    ),
    (
        '{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [4, 5]}',
        "hash_ids",
        "'2 hash(es)'",
    ),
]


@pytest.mark.parametrize(("line", "field", "got"), MALFORMED)
def test_malformed_line_names_line_and_field(
    tmp_path: Path, line: str, field: str, got: str | None
) -> None:
    path = tmp_path / "bad.jsonl"
    # line 3 is the bad one; line 2 is blank and still counted
    path.write_text(json.dumps(rec(0)) + "\n\n" + line + "\n" + json.dumps(rec(5)) + "\n")
    with pytest.raises(TraceFormatError) as err:
        load(path, format="mooncake")
    assert (err.value.line, err.value.field) == (3, field)
    assert f"{path}:3" in str(err.value) and repr(field) in str(err.value)
    if got is not None:
        assert f"got {got}" in str(err.value)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(TraceError, match="no requests"):
        load(path, format="mooncake")


def test_hash_ids_message_says_how_many_blocks_the_length_needs(tmp_path: Path) -> None:
    path = write(tmp_path, [rec(0), rec(5, 1100, ids=[4, 5])])
    with pytest.raises(TraceFormatError, match=r"3 block hash\(es\) for input_length 1100"):
        load(path)


@pytest.mark.parametrize("ts_ms", [1e14, 1e300])
def test_an_absurd_span_is_refused_naming_the_line(tmp_path: Path, ts_ms: float) -> None:
    path = write(tmp_path, [rec(0), rec(1000), rec(ts_ms)])
    with pytest.raises(TraceFormatError) as err:
        load(path)
    assert (err.value.line, err.value.field) == (3, "timestamp")
    assert "within 1e+09 s" in str(err.value) and "on line 1" in str(err.value)
