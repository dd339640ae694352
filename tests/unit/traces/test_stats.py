"""`llmsched trace stats` reproduces the published statistics of the real traces.

Expected figures are the table in shared/traces-real/SOURCES.md §3 (computed
there independently with pandas), written as printed: each value must agree
to the precision shown.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sim.cli import app
from tests.conftest import SHARED_TRACES
from traces.bundled import DATA_DIR
from traces.stats import trace_stats
from traces.trace import Trace

# file -> {stats key: value as printed in the table}
# fmt: off
PUBLISHED = {
    "azure-llm-2023/AzureLLMInferenceTrace_code.csv": {
        "n_requests": "8819", "span_s": "3436",
        "prompt_tokens_mean": "2048", "prompt_tokens_p50": "1469", "prompt_tokens_p90": "5188",
        "prompt_tokens_p99": "7436", "prompt_tokens_max": "7437",
        "output_tokens_mean": "28", "output_tokens_p50": "13", "output_tokens_p90": "55",
        "output_tokens_p99": "251", "output_tokens_max": "1899",
        "rate_mean_rps": "2.57", "rate_peak_1s_rps": "67", "rate_peak_60s_rps": "10.5",
        "interarrival_cv": "13.15", "dispersion_1s": "13.2", "dispersion_60s": "160.5",
        "prompt_share_over_1024": "62.1%", "prompt_share_over_2048": "37.5%",
        "prompt_share_over_4096": "14.1%", "tokens_per_s_mean": "5328",
    },
    "azure-llm-2023/AzureLLMInferenceTrace_conv.csv": {
        "n_requests": "19366", "span_s": "3502",
        "prompt_tokens_mean": "1155", "prompt_tokens_p50": "1020", "prompt_tokens_p90": "2734",
        "prompt_tokens_p99": "4142", "prompt_tokens_max": "14050",
        "output_tokens_mean": "211", "output_tokens_p50": "129", "output_tokens_p90": "424",
        "output_tokens_p99": "601", "output_tokens_max": "1000",
        "rate_mean_rps": "5.53", "rate_peak_1s_rps": "16", "rate_peak_60s_rps": "8.45",
        "interarrival_cv": "1.09", "dispersion_1s": "1.39", "dispersion_60s": "20.6",
        "prompt_share_over_1024": "49.2%", "prompt_share_over_2048": "14.0%",
        "prompt_share_over_4096": "2.1%", "tokens_per_s_mean": "7554",
    },
    "mooncake-fast25/conversation_trace.jsonl": {
        "n_requests": "12031", "span_s": "3537",
        "prompt_tokens_mean": "12035", "prompt_tokens_p50": "6909", "prompt_tokens_p90": "27367",
        "prompt_tokens_p99": "85400", "prompt_tokens_max": "126195",
        "output_tokens_mean": "343", "output_tokens_p50": "350", "output_tokens_p90": "597",
        "output_tokens_p99": "1119", "output_tokens_max": "2000",
        "rate_mean_rps": "3.40", "rate_peak_1s_rps": "28", "rate_peak_60s_rps": "4.12",
        "interarrival_cv": "3.03", "dispersion_1s": "7.89", "dispersion_60s": "2.85",
        "prompt_share_over_1024": "88.7%", "prompt_share_over_2048": "76.7%",
        "prompt_share_over_4096": "65.9%", "prefix_reuse_share": "36.6%",
        "tokens_per_s_mean": "42102",
    },
    "mooncake-fast25/synthetic_trace.jsonl": {
        "n_requests": "3993", "span_s": "1022",
        "prompt_tokens_mean": "15325", "prompt_tokens_p50": "11587", "prompt_tokens_p90": "38611",
        "prompt_tokens_p99": "66456", "prompt_tokens_max": "191378",
        "output_tokens_mean": "149", "output_tokens_p50": "69", "output_tokens_p90": "389",
        "output_tokens_p99": "768", "output_tokens_max": "893",
        "rate_mean_rps": "3.91", "rate_peak_1s_rps": "13", "rate_peak_60s_rps": "4.55",
        "interarrival_cv": "1.01", "dispersion_1s": "1.09", "dispersion_60s": "12.98",
        "prompt_share_over_1024": "69.5%", "prompt_share_over_2048": "67.4%",
        "prompt_share_over_4096": "60.2%", "prefix_reuse_share": "64.0%",
        "tokens_per_s_mean": "60458",
    },
    "ragpulse/0_trace.jsonl": {
        "n_requests": "7106", "span_s": "604603",
        "prompt_tokens_mean": "2944", "prompt_tokens_p50": "3140", "prompt_tokens_p90": "3958",
        "prompt_tokens_p99": "5438", "prompt_tokens_max": "7712",
        "output_tokens_mean": "283", "output_tokens_p50": "234", "output_tokens_p90": "563",
        "output_tokens_p99": "891", "output_tokens_max": "2183",
        "rate_mean_rps": "0.0118", "rate_peak_1s_rps": "3", "rate_peak_60s_rps": "0.167",
        "interarrival_cv": "3.06", "dispersion_1s": "1.01", "dispersion_60s": "1.73",
        "prompt_share_over_1024": "100.0%", "prompt_share_over_2048": "79.9%",
        "prompt_share_over_4096": "8.2%", "tokens_per_s_mean": "38",
        "n_sessions": "3990", "n_multi_turn_sessions": "1643",
        "turns_per_session_mean": "1.78", "turns_per_session_max": "25",
    },
}
# fmt: on


def _agrees(actual: float, printed: str) -> bool:
    """Whether ``actual`` rounds to ``printed`` (as a table would show it)."""
    percent = printed.endswith("%")
    text = printed.rstrip("%")
    decimals = len(text.split(".")[1]) if "." in text else 0
    value = float(actual) * (100 if percent else 1)
    return abs(value - float(text)) <= 0.5 * 10**-decimals + 1e-9


def _trace_file(relpath: str) -> Path:
    """The file in shared/traces-real, else the bundled copy (the same bytes, gzipped)."""
    shared = SHARED_TRACES / relpath
    return shared if shared.exists() else DATA_DIR / f"{relpath}.gz"


@pytest.mark.parametrize("relpath", sorted(PUBLISHED))
def test_trace_stats_cli_agrees_with_published_table(relpath: str) -> None:
    result = CliRunner().invoke(app, ["trace", "stats", "--json", str(_trace_file(relpath))])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    wrong = {
        key: (stats[key], printed)
        for key, printed in PUBLISHED[relpath].items()
        if not _agrees(stats[key], printed)
    }
    assert not wrong, f"{relpath}: (computed, published): {wrong}"


def test_stats_json_keys_are_stable_snake_case() -> None:
    path = _trace_file("azure-llm-2023/AzureLLMInferenceTrace_code.csv")
    result = CliRunner().invoke(app, ["trace", "stats", "--json", str(path)])
    keys = set(json.loads(result.stdout))
    assert {
        "n_requests",
        "span_s",
        "rate_mean_rps",
        "rate_peak_1s_rps",
        "rate_peak_60s_rps",
        "interarrival_cv",
        "prompt_tokens_p99",
        "output_tokens_mean",
        "prompt_share_over_4096",
        "n_sessions",
        "turns_per_session_mean",
    } <= keys
    assert all(k == k.lower() and " " not in k for k in keys)


def test_stats_of_a_hand_made_trace() -> None:
    frame = {
        "arrival_s": np.array([0.0, 0.5, 1.0, 61.0]),
        "prompt_tokens": np.array([100, 2000, 3000, 5000]),
        "output_tokens": np.array([10, 20, 0, 40]),
        "session_id": np.array(["a", "a", None, "b"], dtype=object),
        "failed": np.array([False, False, True, False]),
    }
    import pandas as pd

    s = trace_stats(Trace(pd.DataFrame(frame), name="tiny"))
    assert s.n_requests == 4 and s.n_failed == 1
    assert s.span_s == 61.0
    assert s.rate_peak_1s_rps == 2.0  # bins [0,1): two arrivals
    assert s.rate_peak_60s_rps == pytest.approx(3 / 60)
    assert s.prompt_share_over_1024 == 0.75 and s.prompt_share_over_4096 == 0.25
    assert (s.n_sessions, s.n_multi_turn_sessions, s.turns_per_session_max) == (2, 1, 2)
    assert s.prefix_reuse_share is None


def test_stats_table_prints_one_column_per_file() -> None:
    paths = [
        str(_trace_file("azure-llm-2023/AzureLLMInferenceTrace_code.csv")),
        str(_trace_file("azure-llm-2023/AzureLLMInferenceTrace_conv.csv")),
    ]
    result = CliRunner().invoke(app, ["trace", "stats", *paths])
    assert result.exit_code == 0, result.output
    assert "8,819" in result.stdout and "19,366" in result.stdout


@pytest.mark.parametrize("last_s", [1e11, 1e300])
def test_stats_of_an_absurd_span_bin_only_the_occupied_seconds(last_s: float) -> None:
    # One bin per second of span would be 745 GiB at 1e11 s and overflow at 1e300 s.
    import pandas as pd

    frame = {
        "arrival_s": np.array([0.0, 0.2, 0.7, last_s]),
        "prompt_tokens": np.array([10, 10, 10, 10]),
        "output_tokens": np.array([5, 5, 5, 5]),
    }
    s = trace_stats(Trace(pd.DataFrame(frame), name="far"))
    assert s.span_s == last_s
    assert s.rate_peak_1s_rps == 3.0 and s.rate_peak_60s_rps == pytest.approx(3 / 60)
    # Counts 3 and 1 over n bins: variance / mean -> (9 + 1) / 4 as the empty bins grow.
    assert s.dispersion_1s == pytest.approx(2.5, rel=1e-6)


def test_dispersion_counts_the_empty_bins() -> None:
    import pandas as pd

    frame = {
        "arrival_s": np.array([0.0, 0.5, 3.0]),  # counts per second: 2, 0, 0, 1
        "prompt_tokens": np.array([10, 10, 10]),
        "output_tokens": np.array([5, 5, 5]),
    }
    s = trace_stats(Trace(pd.DataFrame(frame), name="gaps"))
    counts = np.array([2, 0, 0, 1])
    assert s.dispersion_1s == pytest.approx(counts.var() / counts.mean())
