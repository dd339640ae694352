"""The loaders' public API: format names, detection, options, gzip, save by extension."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

import traces.loaders as loaders
from traces.errors import ConfigError, TraceError
from traces.loaders import FORMATS, detect_format, load, save

SAMPLES = {
    "burstgpt": (
        "b.csv",
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,10,2,12,API log\n6,GPT-4,20,0,20,API log\n",
    ),
    "azure": (
        "a.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:17:03.9799600,4808,10\n2023-11-16 18:17:04.0319600,3180,8\n",
    ),
    "mooncake": (
        "m.jsonl",
        '{"timestamp": 0, "input_length": 700, "output_length": 5, "hash_ids": [0, 1]}\n'
        '{"timestamp": 3000, "input_length": 90, "output_length": 1, "hash_ids": [2]}\n',
    ),
    "ragpulse": (
        "r.jsonl",
        json.dumps(
            {
                "timestamp": "4",
                "input_length": 50,
                "output_length": 5,
                "session_id": "s",
                "hash_ids": {
                    "sys_prompt": [],
                    "passages_ids": [],
                    "history": [],
                    "web_search": [],
                    "user_input": [],
                },
            }
        )
        + "\n",
    ),
    "jsonl": ("c.jsonl", '{"arrival_s": 0.0, "prompt_tokens": 3, "output_tokens": 1}\n'),
}


def test_public_names() -> None:
    assert set(loaders.__all__) == {"FORMATS", "detect_format", "load", "save"}
    assert FORMATS == ("burstgpt", "azure", "mooncake", "ragpulse", "parquet", "jsonl")


@pytest.mark.parametrize("fmt", sorted(SAMPLES))
def test_text_formats_are_detected_plain_and_gzipped(tmp_path: Path, fmt: str) -> None:
    name, text = SAMPLES[fmt]
    plain = tmp_path / name
    plain.write_text(text)
    zipped = tmp_path / f"{name}.gz"
    zipped.write_bytes(gzip.compress(text.encode()))
    assert detect_format(plain) == fmt
    assert detect_format(zipped) == fmt
    options = {"prefix": False} if fmt == "ragpulse" else {}
    assert load(zipped, **options).equals(load(plain, **options))
    assert load(zipped, **options).name == f"{name}.gz"


def test_undetectable_file_lists_the_known_formats(tmp_path: Path) -> None:
    path = tmp_path / "odd.csv"
    path.write_text("when,what\n1,2\n")
    with pytest.raises(TraceError, match="cannot tell") as err:
        load(path)
    assert all(fmt in str(err.value) for fmt in FORMATS)
    odd_json = tmp_path / "odd.jsonl"
    odd_json.write_text('{"when": 1}\n')
    with pytest.raises(TraceError, match="known formats"):
        detect_format(odd_json)


def test_unknown_format_name_lists_the_known_formats(tmp_path: Path) -> None:
    name, text = SAMPLES["azure"]
    (tmp_path / name).write_text(text)
    with pytest.raises(TraceError, match="unknown trace format 'splitwise'") as err:
        load(tmp_path / name, format="splitwise")
    assert all(fmt in str(err.value) for fmt in FORMATS)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no such file"):
        load(tmp_path / "nothing.csv")
    with pytest.raises(TraceError, match="no such file"):
        load(tmp_path / "nothing.csv", format="azure")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(TraceError, match="empty") as err:
        load(tmp_path / "empty.csv")
    assert "burstgpt" in str(err.value)
    (tmp_path / "blank.jsonl.gz").write_bytes(gzip.compress(b"\n\n"))
    with pytest.raises(TraceError, match="no text lines"):
        load(tmp_path / "blank.jsonl.gz")


def test_an_option_the_format_does_not_take(tmp_path: Path) -> None:
    name, text = SAMPLES["azure"]
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=r"'azure' has no option 'jitter' \(it takes: no options"):
        load(tmp_path / name, jitter=True)
    name, text = SAMPLES["mooncake"]
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match="it takes: jitter, bucket_s, seed"):
        load(tmp_path / name, block_tokens=16)


def test_options_reach_the_loader(tmp_path: Path) -> None:
    name, text = SAMPLES["mooncake"]
    (tmp_path / name).write_text(text)
    plain = load(tmp_path / name)
    jittered = load(tmp_path / name, jitter=True, seed=3)
    assert plain.arrival_s.tolist() == [0.0, 3.0]
    assert jittered.arrival_s.tolist() != [0.0, 3.0]


@pytest.mark.parametrize(("value", "jittered"), [("False", False), ("TRUE", True), (False, False)])
def test_a_switch_option_takes_true_or_false_in_any_case(
    tmp_path: Path, value: object, jittered: bool
) -> None:
    name, text = SAMPLES["mooncake"]
    (tmp_path / name).write_text(text)
    arrivals = load(tmp_path / name, jitter=value, seed=3).arrival_s.tolist()
    assert (arrivals != [0.0, 3.0]) is jittered


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("jitter", "maybe", "true or false"),
        ("jitter", 1, "true or false"),
        ("bucket_s", "abc", "a number"),
        ("bucket_s", True, "a number"),
        ("seed", 1.5, "an integer"),
        ("seed", "7", "an integer"),
    ],
)
def test_an_option_value_of_the_wrong_type_is_refused(
    tmp_path: Path, option: str, value: object, expected: str
) -> None:
    name, text = SAMPLES["mooncake"]
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=f"'mooncake' option {option}: expected {expected}"):
        load(tmp_path / name, **{option: value})


def test_explicit_format_overrides_detection(tmp_path: Path) -> None:
    name, text = SAMPLES["azure"]
    (tmp_path / name).write_text(text)
    # An Azure file read as BurstGPT fails on the first column BurstGPT needs.
    with pytest.raises(TraceError, match="'Timestamp'"):
        load(tmp_path / name, format="burstgpt")


@pytest.mark.parametrize("name", ["t.json", "t.parquet.gz", "t"])
def test_save_refuses_other_extensions(tmp_path: Path, name: str) -> None:
    trace = load(_write(tmp_path, "jsonl"))
    with pytest.raises(TraceError, match=r"\.parquet, \.jsonl, \.jsonl\.gz or \.csv"):
        save(trace, tmp_path / name)


def _write(tmp_path: Path, fmt: str) -> Path:
    name, text = SAMPLES[fmt]
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("fmt", ["burstgpt", "azure", "mooncake", "ragpulse", "jsonl"])
def test_binary_and_damaged_gzip_files_are_one_clean_error(tmp_path: Path, fmt: str) -> None:
    name, text = SAMPLES[fmt]
    options = {"prefix": False} if fmt == "ragpulse" else {}
    binary = tmp_path / name
    binary.write_bytes(text.encode()[:20] + b"\x80\xff\xfe" + text.encode()[20:])
    with pytest.raises(TraceError, match=f"not UTF-8 text .*; expected a {fmt} trace"):
        load(binary, format=fmt, **options)
    damaged = tmp_path / f"{name}.gz"
    damaged.write_bytes(gzip.compress(text.encode())[:-12])
    with pytest.raises(TraceError, match="a damaged gzip file"):
        load(damaged, format=fmt, **options)


def test_a_directory_and_a_missing_output_folder_are_named(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="is a directory, expected a trace file"):
        load(tmp_path)
    name, text = SAMPLES["jsonl"]
    (tmp_path / name).write_text(text)
    target = tmp_path / "absent" / "out.parquet"
    with pytest.raises(TraceError, match=f"cannot write here: no folder {tmp_path / 'absent'}"):
        save(load(tmp_path / name), target)
