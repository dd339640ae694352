"""Malformed input never escapes as a traceback (hypothesis).

Random and mutated files go to every trace loader, the profile reader and
the scenario parser, and random values to the loader options and the trace
transforms. Each either reads the file or raises the project's own
error (:class:`~traces.errors.LlmschedError`, which the command line turns
into one line); any other exception fails the test. A trace that loads must
still be a well-formed trace.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tempfile
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.profile import load_profile
from sim.scenario import load_scenario
from traces.errors import LlmschedError
from traces.loaders import FORMATS, load
from traces.trace import Trace
from traces.transforms import TraceTransforms

#: Examples per test; raise it (LLMSCHED_FUZZ_EXAMPLES=5000) to search longer.
SETTINGS = settings(
    max_examples=int(os.environ.get("LLMSCHED_FUZZ_EXAMPLES", "80")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- valid seeds to mutate -----------------------------------------------------

RAGPULSE_ROW = {
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

#: A small valid file of each text format: the starting point of the mutations.
VALID_TEXT: dict[str, str] = {
    "burstgpt": (
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,10,2,12,API log\n6,GPT-4,20,0,20,Conversation log\n"
    ),
    "azure": (
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:17:03.9799600,4808,10\n2023-11-16 18:17:04.0319600,3180,8\n"
    ),
    "mooncake": (
        '{"timestamp": 0, "input_length": 700, "output_length": 5, "hash_ids": [0, 1]}\n'
        '{"timestamp": 3000, "input_length": 90, "output_length": 1, "hash_ids": [2]}\n'
    ),
    "ragpulse": json.dumps(RAGPULSE_ROW) + "\n",
    "jsonl": (
        '{"llmsched_trace": 1, "name": "t", "origin_s": 0.0}\n'
        '{"arrival_s": 0.0, "prompt_tokens": 3, "output_tokens": 1, "session_id": "a"}\n'
        '{"arrival_s": 1.5, "prompt_tokens": 9, "output_tokens": 0, "failed": true,'
        ' "prefix_hashes": [1, 2], "block_tokens": 4}\n'
    ),
}

#: Keys each JSON format reads, so random objects hit the checks behind them.
JSON_KEYS: dict[str, list[str]] = {
    "mooncake": ["timestamp", "input_length", "output_length", "hash_ids"],
    "ragpulse": ["timestamp", "input_length", "output_length", "session_id", "hash_ids"],
    "jsonl": [
        "llmsched_trace",
        "request_id",
        "arrival_s",
        "prompt_tokens",
        "output_tokens",
        "session_id",
        "prefix_hashes",
        "block_tokens",
        "model",
        "log_type",
        "failed",
        "slo_ttft_s",
        "slo_tpot_s",
    ],
}

CSV_HEADERS = {
    "burstgpt": VALID_TEXT["burstgpt"].splitlines()[0].split(","),
    "azure": VALID_TEXT["azure"].splitlines()[0].split(","),
}

# -- strategies ----------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0, -1, 1e300, 1e11, 0.5, "", "12", "nan", "inf", "1e300"])
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
cells = st.sampled_from(["", "0", "-3", "1e300", "1e11", "2.5", "nan", "x", '"', "a,b"]) | st.text(
    alphabet=st.characters(blacklist_categories=["Cs"]), max_size=10
)


def _mutate(text: str, data: st.DataObject) -> str:
    """A few random edits of ``text``: cut, insert, replace a line, truncate, repeat a line."""
    for _ in range(data.draw(st.integers(1, 3))):
        n = len(text)
        kind = data.draw(st.sampled_from(["cut", "insert", "line", "truncate", "repeat"]))
        i = data.draw(st.integers(0, n))
        if kind == "cut":
            j = data.draw(st.integers(i, n))
            text = text[:i] + text[j:]
        elif kind == "insert":
            text = text[:i] + data.draw(st.text(max_size=12) | cells) + text[i:]
        elif kind == "truncate":
            text = text[:i]
        else:
            lines = text.splitlines(keepends=True) or [""]
            k = data.draw(st.integers(0, len(lines) - 1))
            if kind == "line":
                lines[k] = data.draw(st.text(max_size=40)) + "\n"
            else:
                lines.insert(k, lines[k])
            text = "".join(lines)
    return text


def _json_file(fmt: str, data: st.DataObject) -> str:
    """Lines of objects holding the format's keys (some dropped) with random values."""
    keys = JSON_KEYS[fmt]
    rows = []
    for _ in range(data.draw(st.integers(1, 4))):
        chosen = data.draw(st.lists(st.sampled_from(keys), min_size=1, max_size=len(keys)))
        row = {k: data.draw(json_values) for k in chosen}
        rows.append(json.dumps(row))
    return "\n".join(rows) + "\n"


def _csv_file(fmt: str, data: st.DataObject) -> str:
    header = CSV_HEADERS[fmt]
    rows = [",".join(header)]
    for _ in range(data.draw(st.integers(1, 4))):
        width = data.draw(st.integers(0, len(header) + 2))
        rows.append(",".join(data.draw(cells) for _ in range(width)))
    return "\n".join(rows) + "\n"


def _content(fmt: str, data: st.DataObject) -> bytes:
    """A malformed (or, by chance, valid) file for format ``fmt``."""
    kinds = ["bytes", "mutated"] + (["fields"] if fmt in JSON_KEYS or fmt in CSV_HEADERS else [])
    kind = data.draw(st.sampled_from(kinds), label="kind")
    if kind == "bytes":
        raw = data.draw(st.binary(max_size=200))
    elif kind == "mutated":
        raw = _mutate(VALID_TEXT[fmt], data).encode("utf-8", "surrogatepass")
    elif fmt in JSON_KEYS:
        raw = _json_file(fmt, data).encode()
    else:
        raw = _csv_file(fmt, data).encode("utf-8", "surrogatepass")
    if data.draw(st.booleans(), label="gzip"):
        raw = gzip.compress(raw)
        if data.draw(st.booleans(), label="truncated"):
            raw = raw[: len(raw) // 2]
    return raw


def _parquet(data: st.DataObject) -> bytes:
    """A Parquet file with some canonical columns, random types and values, maybe corrupted."""
    n = data.draw(st.integers(0, 3))
    columns: dict[str, Any] = {}
    names = ["arrival_s", "prompt_tokens", "output_tokens", "session_id", "failed", "extra"]
    for name in data.draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names))):
        kind = data.draw(st.sampled_from(["int", "float", "str", "bool", "null"]))
        values: list[Any]
        if kind == "int":
            values = data.draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=n, max_size=n))
        elif kind == "float":
            values = data.draw(st.lists(st.floats(), min_size=n, max_size=n))
        elif kind == "str":
            values = data.draw(st.lists(st.text(max_size=5), min_size=n, max_size=n))
        elif kind == "bool":
            values = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
        else:
            values = [None] * n
        columns[name] = pa.array(values)
    table = pa.table(columns) if columns else pa.table({"x": pa.array([], pa.int64())})
    meta = data.draw(st.none() | st.just(b'{"version": 1}') | st.binary(max_size=20))
    if meta is not None:
        table = table.replace_schema_metadata({b"llmsched": meta})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    raw = buf.getvalue()
    if data.draw(st.booleans(), label="corrupt"):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + data.draw(st.binary(min_size=1, max_size=8)) + raw[i + 1 :]
    return raw


def _check_clean(read: Callable[[], Any]) -> Any:
    """Run ``read``; only the project's errors may come out (returns None for those)."""
    try:
        return read()
    except LlmschedError as exc:
        message = str(exc)
        assert message and "Traceback" not in message
        return None


def _assert_well_formed(trace: Trace) -> None:
    a = trace.arrival_s
    assert np.isfinite(a).all() and (np.diff(a) >= 0).all()
    assert (trace.prompt_tokens >= 1).all() and (trace.output_tokens >= 0).all()


# -- loaders -------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")  # rows out of order are sorted, with a warning
@SETTINGS
@given(fmt=st.sampled_from([f for f in FORMATS if f != "parquet"]), data=st.data())
def test_every_text_loader_reads_or_refuses_cleanly(fmt: str, data: st.DataObject) -> None:
    raw = _content(fmt, data)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.txt"
        path.write_bytes(raw)
        for options in ({"format": fmt}, {}):  # named, and detected from the content
            if fmt == "ragpulse" and options:
                options["prefix"] = data.draw(st.booleans(), label="prefix")
            trace = _check_clean(lambda: load(path, **options))  # noqa: B023
            if trace is not None:
                _assert_well_formed(trace)


@pytest.mark.filterwarnings("ignore::UserWarning")
@SETTINGS
@given(data=st.data())
def test_the_parquet_loader_reads_or_refuses_cleanly(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.parquet"
        path.write_bytes(_parquet(data))
        trace = _check_clean(lambda: load(path))
        if trace is not None:
            _assert_well_formed(trace)


@SETTINGS
@given(
    fmt=st.sampled_from(FORMATS),
    options=st.dictionaries(
        st.sampled_from(["jitter", "bucket_s", "seed", "block_tokens", "prefix", "x"]),
        json_values,
        max_size=3,
    ),
)
def test_loader_options_of_any_value_are_taken_or_refused_cleanly(fmt: str, options: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace"
        path.write_text(VALID_TEXT.get(fmt, VALID_TEXT["jsonl"]))
        _check_clean(lambda: load(path, format=fmt, **options))


@SETTINGS
@given(
    raw=st.binary(max_size=120)
    | st.builds(lambda v: json.dumps(v).encode(), json_values)
    | st.builds(
        lambda v: json.dumps({"model": "m", "gpu": "g", "coefficients": v}).encode(), json_values
    )
)
def test_the_profile_reader_reads_or_refuses_cleanly(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "profile.json"
        path.write_bytes(raw)
        _check_clean(lambda: load_profile(path))


TRANSFORM_KEYS = [
    "models",
    "log_types",
    "drop_failed",
    "window_s",
    "sample",
    "sample_seed",
    "sample_by_session",
    "time_scale",
    "rate_rps",
    "max_prompt_tokens",
    "max_requests",
]


@SETTINGS
@given(values=st.dictionaries(st.sampled_from(TRANSFORM_KEYS), json_values, max_size=4))
def test_transforms_of_any_value_apply_or_refuse_cleanly(values: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.csv"
        path.write_text(VALID_TEXT["burstgpt"])
        trace = load(path)
    transforms = _check_clean(lambda: TraceTransforms.parse(**values))
    if transforms is not None:
        out = _check_clean(lambda: transforms.apply(trace))
        if out is not None:
            _assert_well_formed(out)


# -- scenarios -----------------------------------------------------------------

VALID_SCENARIO_TOML = """\
name = "s"
loads = [0.5, 1.0]
seeds = [0]

[trace]
bundled = "azure-code"
[trace.transforms]
window_s = [0, 600]
sample = 0.5

[cluster]
model = "llama-3.1-8b"
gpu = "h100"
instances = 2
[cluster.limits]
max_running_requests = 64

[slo]
ttft_ms = 1000
tpot_ms = 100

[[policies]]
name = "least_load"
[[policies]]
name = "power_of_two"
label = "p2c"
params = { seed = 3 }

[report]
timeline_load = 1.0
"""

#: Keys a scenario has, at each level, so random documents reach the validators.
SCENARIO_KEYS = {
    "": ["name", "description", "loads", "seeds", "trace", "cluster", "policies", "slo", "report"],
    "trace": ["path", "bundled", "generator", "format", "options", "transforms"],
    "transforms": ["window_s", "sample", "rate_rps", "time_scale", "max_requests", "models"],
    "cluster": ["model", "gpu", "instances", "pd", "limits", "prefix_knowledge", "profile"],
    "policies": ["name", "label", "params", "decode"],
    "slo": ["ttft_ms", "tpot_ms"],
    "report": ["title", "timeline_load", "timeline_seed", "short_prompt_tokens"],
}
yaml_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.sampled_from(["0:600", "1:3", "azure-code", "fcfs", "laps", "h100", "", "-1"])
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def scenario_documents(draw: st.DrawFn, level: str = "") -> dict[str, Any]:
    """A mapping with some of the scenario's keys at ``level``, each holding anything plausible."""
    out: dict[str, Any] = {}
    for key in draw(st.lists(st.sampled_from(SCENARIO_KEYS[level]), unique=True)):
        sub = {"trace": "trace", "cluster": "cluster", "slo": "slo", "report": "report"}.get(key)
        if key == "transforms":
            sub = "transforms"
        if sub is not None and draw(st.booleans()):
            out[key] = draw(scenario_documents(sub))
        elif key == "policies" and draw(st.booleans()):
            out[key] = draw(st.lists(scenario_documents("policies"), max_size=3))
        else:
            out[key] = draw(yaml_values)
    return out


def _leaf_paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into ``tree`` (mappings and lists), inner nodes included."""
    out = [prefix] if prefix else []
    items = (
        tree.items()
        if isinstance(tree, dict)
        else enumerate(tree)
        if isinstance(tree, list)
        else []
    )
    for key, value in items:
        out += _leaf_paths(value, (*prefix, key))
    return out


@st.composite
def mutated_scenarios(draw: st.DrawFn) -> dict[str, Any]:
    """The valid scenario with one to three values replaced, deleted or added: deep checks run."""
    doc = tomllib.loads(VALID_SCENARIO_TOML)
    for _ in range(draw(st.integers(1, 3))):
        paths = _leaf_paths(doc)
        if not paths:
            break
        *parents, last = draw(st.sampled_from(paths))
        node = doc
        for key in parents:
            node = node[key]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete":
            del node[last]
        elif action == "add" and isinstance(node, dict):
            level = draw(st.sampled_from(list(SCENARIO_KEYS)))
            node[draw(st.sampled_from(SCENARIO_KEYS[level]))] = draw(yaml_values)
        else:
            node[last] = draw(yaml_values)
    return doc


def _scenario_result(path: Path) -> None:
    scenario = _check_clean(lambda: load_scenario(path))
    if scenario is not None:
        _check_clean(scenario.check_policies)
        assert scenario.runs()


@SETTINGS
@given(doc=scenario_documents() | mutated_scenarios())
def test_the_scenario_parser_takes_or_refuses_any_yaml_document_cleanly(doc: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scenario.yaml"
        path.write_text(yaml.safe_dump(doc))
        _scenario_result(path)


@SETTINGS
@given(data=st.data(), suffix=st.sampled_from([".toml", ".yaml"]))
def test_the_scenario_parser_refuses_broken_files_cleanly(data: st.DataObject, suffix: str) -> None:
    if data.draw(st.booleans(), label="bytes"):
        raw = data.draw(st.binary(max_size=200))
    else:
        base = VALID_SCENARIO_TOML
        if suffix == ".yaml":
            base = yaml.safe_dump(tomllib.loads(VALID_SCENARIO_TOML))
        raw = _mutate(base, data).encode("utf-8", "surrogatepass")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"scenario{suffix}"
        path.write_bytes(raw)
        _scenario_result(path)
