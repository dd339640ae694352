"""The shared result-record schema: outcomes, per-request ITL figures, run metadata."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from traces.errors import ConfigError
from traces.metrics import LogHistogram, RecordArrays, summarize
from traces.records import (
    OUTCOME_NAMES,
    REQUIRED_COLUMNS,
    RESULT_COLUMNS,
    RESULT_SCHEMA,
    InstanceRecord,
    RunMetadata,
    inter_token_figures,
    inter_token_samples,
    outcome_codes,
    read_run_metadata,
)


def test_outcome_codes_keep_their_numbers_and_append_the_error_outcomes():
    # Codes live in record arrays and old files: 0-3 never move.
    assert OUTCOME_NAMES[:4] == ("pending", "ok", "failed", "rejected")
    assert set(OUTCOME_NAMES[4:]) == {"error", "timeout", "cancelled"}
    codes = outcome_codes(pd.Series(["ok", "timeout", "weird", "cancelled"]), np.zeros(4))
    assert codes.tolist() == [1, 5, 2, 6]  # an unknown name counts as failed
    inferred = outcome_codes(None, np.array([1.0, np.nan]))
    assert inferred.tolist() == [1, 2]  # no outcome column: finished means ok


def test_schema_lists_every_column_a_live_run_needs():
    for col in (
        "send_s",
        "max_tokens",
        "session_id",
        "slo_ttft_s",
        "slo_tpot_s",
        "http_status",
        "error_message",
        "itl_p50_s",
        "itl_p90_s",
        "itl_p99_s",
        "itl_max_s",
        "n_chunks",
    ):
        assert col in RESULT_SCHEMA, col
    assert tuple(RESULT_SCHEMA) == RESULT_COLUMNS
    assert set(REQUIRED_COLUMNS) <= set(RESULT_COLUMNS)


def test_itl_figures_one_token_per_chunk():
    f = inter_token_figures([1.0, 1.1, 1.3, 1.6, 2.0])  # gaps 0.1, 0.2, 0.3, 0.4
    assert f.n_chunks == 5
    assert f.itl_p50_s == pytest.approx(0.25)
    assert f.itl_p90_s == pytest.approx(0.37)
    assert f.itl_max_s == pytest.approx(0.4)


def test_itl_figures_spread_a_packed_chunk_over_its_tokens():
    # First chunk (2 tokens) is the TTFT's; then 4 tokens in 0.4 s, then 1 in 0.5 s.
    f = inter_token_figures([0.0, 0.4, 0.9], chunk_tokens=[2, 4, 1])
    assert f.n_chunks == 3
    assert f.itl_p50_s == pytest.approx(0.1)  # four samples of 0.1 and one of 0.5
    assert f.itl_max_s == pytest.approx(0.5)
    samples = [0.1] * 4 + [0.5]
    assert f.itl_p99_s == pytest.approx(np.quantile(samples, 0.99))


def test_a_live_writer_pools_request_itls_into_the_run_histogram():
    itl = LogHistogram()
    pooled = []
    for times, tokens in (([0.0, 0.02, 0.05, 0.09], [1, 1, 3, 2]), ([5.0, 5.5], [4, 1])):
        values, weights = inter_token_samples(times, tokens)
        for v, w in zip(values, weights, strict=True):
            itl.add(float(v), int(w))
        pooled += np.repeat(values, weights).tolist()
    assert itl.count == 1 + 3 + 2 + 1  # one sample per token after each first chunk
    assert itl.mean == pytest.approx(np.mean(pooled))
    assert itl.quantile(0.5) == pytest.approx(np.quantile(pooled, 0.5), rel=0.02)
    s = summarize(pd.DataFrame({c: [0.0] for c in REQUIRED_COLUMNS}), itl=itl)
    assert s["itl_mean_s"] == pytest.approx(np.mean(pooled))  # the summary reads the sketch


def test_itl_figures_of_a_single_chunk_are_undefined_and_bad_input_is_refused():
    one = inter_token_figures([3.0], chunk_tokens=[7])
    assert one.n_chunks == 1 and math.isnan(one.itl_p50_s) and math.isnan(one.itl_max_s)
    assert inter_token_figures([]).n_chunks == 0
    with pytest.raises(ValueError, match="backwards"):
        inter_token_figures([1.0, 0.5])
    with pytest.raises(ValueError, match="2 entries for 3"):
        inter_token_figures([0.0, 1.0, 2.0], chunk_tokens=[1, 1])
    with pytest.raises(ValueError, match="at least one token"):
        inter_token_figures([0.0, 1.0], chunk_tokens=[1, 0])


def test_run_metadata_round_trips_and_orders_instances_by_id(tmp_path):
    meta = RunMetadata(
        source="replay",
        target_url="http://10.0.0.5:8000",
        instances=[
            InstanceRecord(id=1, name="decode-a", url="http://d:8001", role="decode"),
            InstanceRecord(id=0, name="prefill-a", url="http://p:8000", role="prefill"),
        ],
        options={"prefix_knowledge": "estimate", "poll_interval_s": 0.5},
    )
    meta.write(tmp_path)
    back = read_run_metadata(tmp_path)
    assert back == meta
    assert back.roles == ("prefill", "decode")
    raw = json.loads((tmp_path / "run.json").read_text())
    assert raw["created"].startswith(str(pd.Timestamp.now(tz="UTC").year))
    assert raw["llmsched_version"]


def test_run_metadata_errors_name_the_file_and_field(tmp_path):
    assert read_run_metadata(tmp_path) is None  # older folders have none
    (tmp_path / "run.json").write_text(json.dumps({"source": "spreadsheet"}))
    with pytest.raises(ConfigError, match=r"run\.json: source: "):
        read_run_metadata(tmp_path)
    with pytest.raises(ValueError, match="id 0 appears more than once"):
        RunMetadata(
            source="router",
            instances=[InstanceRecord(id=0, name="a"), InstanceRecord(id=0, name="b")],
        )


def test_summary_of_live_records_counts_error_outcomes_and_own_slos():
    frame = pd.DataFrame(
        {
            "arrival_s": [0.0, 1.0, 2.0, 3.0],
            "first_token_s": [0.2, 1.5, np.nan, np.nan],
            "finish_s": [1.2, 2.5, 2.1, 13.0],
            "prompt_tokens": [10, 10, 10, 10],
            "output_tokens": [11, 11, 0, 0],
            "outcome": ["ok", "ok", "error", "timeout"],
            "slo_ttft_s": [0.1, np.nan, np.nan, np.nan],
        }
    )
    s = summarize(frame, slo_ttft_s=1.0)
    assert (s["n_completed"], s["n_error"], s["n_timeout"], s["n_failed"]) == (2, 1, 1, 0)
    # Row 0 misses its own 0.1 s TTFT SLO; row 1 meets the run's 1 s.
    assert s["slo_attainment"] == pytest.approx(0.5)
    assert s["duration_s"] == pytest.approx(2.5)
    assert math.isnan(s["itl_p50_s"])  # records alone pool no ITL
    same = summarize(RecordArrays.from_frame(frame), slo_ttft_s=1.0)
    assert json.dumps(same) == json.dumps(s)  # a frame or its arrays: one definition


def test_the_record_layer_imports_nothing_above_it():
    code = (
        "import sys, traces.records, traces.metrics;"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'sim', 'scheduler', 'pandas'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # Servers write records: the schema module must not drag pandas in either.
    assert out.stdout.strip() == "[]"
