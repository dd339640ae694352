"""The real traces in shared/traces-real load with the figures their SOURCES.md reports.

Expected rows, spans and token means are the statistics table of
``shared/traces-real/SOURCES.md`` (computed there with pandas, independently
of these loaders); spans to the second, means to the token.
"""

from __future__ import annotations

import math
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from traces.loaders import detect_format, load, save
from traces.trace import Trace


def real_traces_dir() -> Path:
    """shared/traces-real beside the repository checkout (tests/unit/traces is 3 levels down)."""
    return (Path(__file__).resolve().parents[3] / ".." / "shared" / "traces-real").resolve()


REAL = real_traces_dir()
pytestmark = pytest.mark.skipif(
    not REAL.is_dir(), reason=f"real traces not found at {REAL} (shared/ beside the checkout)"
)

# file -> (format, rows, span_s, mean prompt tokens, mean output tokens)
EXPECTED = {
    "azure-llm-2023/AzureLLMInferenceTrace_code.csv": ("azure", 8_819, 3_436, 2_048, 28),
    "azure-llm-2023/AzureLLMInferenceTrace_conv.csv": ("azure", 19_366, 3_502, 1_155, 211),
    "mooncake-fast25/conversation_trace.jsonl": ("mooncake", 12_031, 3_537, 12_035, 343),
    "mooncake-fast25/synthetic_trace.jsonl": ("mooncake", 3_993, 1_022, 15_325, 149),
    "ragpulse/0_trace.jsonl": ("ragpulse", 7_106, 604_603, 2_944, 283),
}

_cache: dict[str, tuple[Trace, list[warnings.WarningMessage]]] = {}


def loaded(name: str) -> tuple[Trace, list[warnings.WarningMessage]]:
    """Each real file is loaded once per test session (RAGPulse hashing takes ~1 s)."""
    if name not in _cache:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trace = load(REAL / name)
        _cache[name] = (trace, list(caught))
    return _cache[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_file_matches_published_statistics(name: str) -> None:
    fmt, rows, span_s, prompt_mean, output_mean = EXPECTED[name]
    assert detect_format(REAL / name) == fmt
    trace, _ = loaded(name)
    assert len(trace) == rows
    assert trace.span_s == pytest.approx(span_s, abs=1.0)
    assert trace.prompt_tokens.mean() == pytest.approx(prompt_mean, abs=1.0)
    assert trace.output_tokens.mean() == pytest.approx(output_mean, abs=1.0)
    assert trace.arrival_s[0] == 0.0 and np.all(np.diff(trace.arrival_s) >= 0)


def test_azure_origin_is_the_first_request_in_epoch_seconds() -> None:
    trace, caught = loaded("azure-llm-2023/AzureLLMInferenceTrace_code.csv")
    first = datetime(2023, 11, 16, 18, 17, 3, 979960, tzinfo=UTC).timestamp()
    assert trace.origin_s == pytest.approx(first, abs=1e-6)
    assert caught == []  # the file is sorted


def test_mooncake_blocks_and_prefix_reuse() -> None:
    trace, _ = loaded("mooncake-fast25/conversation_trace.jsonl")
    reqs = list(trace)
    assert all(r.block_tokens == 512 for r in reqs)
    assert all(len(r.prefix_hashes) == math.ceil(r.prompt_tokens / 512) for r in reqs)
    # SOURCES.md: 288,500 block references, 182,790 distinct (36.6% reuse).
    refs = np.concatenate([np.asarray(r.prefix_hashes) for r in reqs])
    assert (len(refs), len(np.unique(refs))) == (288_500, 182_790)


def test_mooncake_jitter_on_the_real_buckets() -> None:
    plain, _ = loaded("mooncake-fast25/conversation_trace.jsonl")
    assert len(np.unique(plain.arrival_s)) == 1_180  # the 3 s buckets
    jittered = load(REAL / "mooncake-fast25/conversation_trace.jsonl", jitter=True, seed=0)
    raw = plain.frame.set_index("request_id")["arrival_s"]
    bucket = raw.loc[jittered.frame["request_id"]].to_numpy()
    clock = jittered.origin_s + jittered.arrival_s
    assert np.all((clock >= bucket) & (clock < bucket + 3.0))
    assert len(np.unique(jittered.arrival_s)) == len(jittered)


def test_ragpulse_sessions_order_warning_and_hashes() -> None:
    trace, caught = loaded("ragpulse/0_trace.jsonl")
    assert trace.frame["session_id"].nunique() == 3_990
    assert len(caught) == 1 and caught[0].category is UserWarning
    assert str(REAL / "ragpulse/0_trace.jsonl") in str(caught[0].message)
    assert "1 pair(s)" in str(caught[0].message)
    reqs = list(trace)
    # Hashes cover only full 16-token blocks of the parts; input_length adds
    # 6-12 template tokens (SOURCES.md), so 6..12+15 tokens stay unhashed.
    unhashed = np.array([r.prompt_tokens - 16 * len(r.prefix_hashes) for r in reqs])
    assert unhashed.min() >= 6 and unhashed.max() <= 12 + 15
    # Most requests open with the same system prompt: their first block agrees.
    firsts = [r.prefix_hashes[0] for r in reqs if r.prefix_hashes]
    assert max(firsts.count(h) for h in set(firsts)) > len(reqs) // 2


@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("mooncake-fast25/conversation_trace.jsonl", "m.parquet"),
        ("ragpulse/0_trace.jsonl", "r.jsonl.gz"),
    ],
)
def test_real_traces_round_trip_through_canonical_files(
    tmp_path: Path, name: str, target: str
) -> None:
    trace, _ = loaded(name)
    save(trace, tmp_path / target)
    back = load(tmp_path / target)
    assert back.equals(trace)
    assert (back.name, back.origin_s) == (trace.name, trace.origin_s)
