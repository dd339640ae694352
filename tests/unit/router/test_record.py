"""``--record``: the router's folder read back by the project's own loaders and report."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scheduler.router.record import FILES, Recorder, RouterRecord
from sim.report.records import load_sources
from traces.errors import ConfigError
from traces.loaders import load
from traces.records import (
    OUTCOME_CANCELLED,
    OUTCOME_ERROR,
    OUTCOME_OK,
    OUTCOME_PENDING,
    OUTCOME_REJECTED,
    OUTCOME_TIMEOUT,
    RESULT_COLUMNS,
    InstanceRecord,
    inter_token_figures,
)

T0 = 5_000.0  # the router's monotonic clock is nowhere near 0
INSTANCES = [
    InstanceRecord(id=0, name="p0", url="http://10.0.0.5:30000", role="prefill"),
    {"id": 1, "name": "d0", "url": "http://10.0.0.6:30000", "role": "decode"},
]


def served(row: int, arrival: float, ttft: float, n_out: int, gap: float, **kw) -> RouterRecord:
    """A streamed request served to the end: one token per chunk, ``gap`` seconds apart."""
    first = T0 + arrival + ttft
    chunks = [first + i * gap for i in range(n_out)]
    return RouterRecord(
        row=row,
        arrival_s=T0 + arrival,
        dispatch_s=T0 + arrival + 0.002,
        first_token_s=first,
        finish_s=chunks[-1],
        prompt_tokens=kw.pop("prompt_tokens", 200),
        output_tokens=n_out,
        max_tokens=kw.pop("max_tokens", n_out),
        instance=0,
        decode_instance=1,
        http_status=200,
        chunk_times_s=chunks,
        **kw,
    )


def workload() -> list[RouterRecord]:
    """Finished in a different order from their arrivals, as a router hands them over."""
    return [
        served(3, 0.50, 0.080, 11, 0.020, request_id="req-c", cached_tokens=128),
        served(
            1,
            0.00,
            0.150,
            21,
            0.030,
            request_id="req-a",
            session_id="chat-1",
            prefix_hashes=[11, 22, 33],
            block_tokens=16,
            slo_ttft_s=0.2,
            slo_tpot_s=0.05,
            model="qwen",
        ),
        served(2, 0.20, 0.400, 6, 0.025, max_tokens=64, chunk_tokens=None),
        RouterRecord(
            row=4,
            arrival_s=T0 + 0.7,
            finish_s=T0 + 0.7005,
            prompt_tokens=50,
            max_tokens=100,
            outcome=OUTCOME_REJECTED,
            http_status=429,
            error_message="queue full",
        ),
        RouterRecord(
            row=5,
            arrival_s=T0 + 0.8,
            dispatch_s=T0 + 0.81,
            finish_s=T0 + 0.9,
            prompt_tokens=70,
            max_tokens=40,
            instance=0,
            outcome=OUTCOME_ERROR,
            http_status=500,
            error_message="upstream: 500 internal error",
        ),
        RouterRecord(
            row=6,
            arrival_s=T0 + 0.9,
            finish_s=T0 + 60.9,
            prompt_tokens=30,
            max_tokens=10,
            outcome=OUTCOME_TIMEOUT,
            http_status=408,
        ),
        RouterRecord(
            row=7,
            arrival_s=T0 + 1.0,
            dispatch_s=T0 + 1.0,
            first_token_s=T0 + 1.1,
            finish_s=T0 + 1.3,
            prompt_tokens=30,
            output_tokens=3,
            max_tokens=50,
            instance=0,
            outcome=OUTCOME_CANCELLED,
            http_status=200,
            chunk_times_s=[T0 + 1.1, T0 + 1.2, T0 + 1.3],
        ),
    ]


def record(folder: Path, records: list[RouterRecord], **kw) -> dict[str, Path]:
    rec = Recorder(
        folder,
        policy="laps",
        instances=INSTANCES,
        target_url="http://127.0.0.1:8080",
        options={"window_ms": 4.0, "poll_interval_s": 0.5},
        flush_every_s=0,
        **kw,
    )
    for r in records:
        rec.add(r)
    return rec.close()


def test_the_folder_is_the_replay_layout_plus_the_trace(tmp_path):
    paths = record(tmp_path / "run", workload())
    assert set(paths) == set(FILES)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(FILES.values())
    results = pd.read_parquet(paths["results"])
    assert list(results.columns) == [*RESULT_COLUMNS, "x_request_id"]


def test_the_report_reads_the_records_with_the_figures_written(tmp_path):
    records = workload()
    record(tmp_path / "run", records)
    (run,) = load_sources([tmp_path / "run"]).runs
    assert run.label == "laps"
    assert run.run is not None and run.run.source == "router"
    assert run.run.target_url == "http://127.0.0.1:8080"
    assert [(i.id, i.name, i.url, i.role) for i in run.run.instances] == [
        (0, "p0", "http://10.0.0.5:30000", "prefill"),
        (1, "d0", "http://10.0.0.6:30000", "decode"),
    ]
    assert run.run.options == {"policy": "laps", "window_ms": 4.0, "poll_interval_s": 0.5}
    s = run.summary
    assert s["roles"] == ["prefill", "decode"]
    assert (s["n_requests"], s["n_completed"]) == (7, 3)
    assert (s["n_rejected"], s["n_error"], s["n_timeout"], s["n_cancelled"]) == (1, 1, 1, 1)
    ok = [r for r in records if r.outcome == OUTCOME_OK]
    ttfts = [r.first_token_s - r.arrival_s for r in ok]
    tpots = [(r.finish_s - r.first_token_s) / (r.output_tokens - 1) for r in ok]
    assert s["ttft_p50_s"] == pytest.approx(np.quantile(ttfts, 0.5))
    assert s["ttft_p90_s"] == pytest.approx(np.quantile(ttfts, 0.9))
    assert s["tpot_mean_s"] == pytest.approx(np.mean(tpots))
    assert s["e2e_p99_s"] == pytest.approx(
        np.quantile([r.finish_s - r.arrival_s for r in ok], 0.99)
    )
    # Pooled ITL of served requests: 10 gaps of 20 ms, 20 of 30 ms, 5 of 25 ms.
    assert s["itl_p50_s"] == pytest.approx(0.030, rel=0.02)
    assert s["itl_mean_s"] == pytest.approx((10 * 0.020 + 20 * 0.030 + 5 * 0.025) / 35)
    # The one request with its own SLOs met them; the others have none to miss.
    assert s["slo_attainment"] == 1.0
    assert s["prefix_hit_rate"] == pytest.approx(128 / 600)


def test_records_are_trace_relative_in_arrival_order_with_their_outcomes(tmp_path):
    records = workload()
    paths = record(tmp_path / "run", records)
    f = pd.read_parquet(paths["results"])
    assert f["request_id"].tolist() == [1, 2, 3, 4, 5, 6, 7]
    np.testing.assert_allclose(f["arrival_s"], [0.0, 0.2, 0.5, 0.7, 0.8, 0.9, 1.0], atol=1e-9)
    assert f["outcome"].astype(str).tolist() == [
        "ok",
        "ok",
        "ok",
        "rejected",
        "error",
        "timeout",
        "cancelled",
    ]
    by_row = {r.row: r for r in records}
    for _, row in f.iterrows():
        r = by_row[row["request_id"]]
        for col, value in (
            ("first_token_s", r.first_token_s),
            ("finish_s", r.finish_s),
            ("dispatch_s", r.dispatch_s),
        ):
            if math.isnan(value):
                assert math.isnan(row[col])
            else:
                assert row[col] == pytest.approx(value - T0)
        assert row["ttft_s"] == pytest.approx(r.first_token_s - r.arrival_s, nan_ok=True)
        assert row["e2e_s"] == pytest.approx(r.finish_s - r.arrival_s)
    first = f.iloc[0]
    assert first["x_request_id"] == "req-a" and first["session_id"] == "chat-1"
    assert first["policy"] == "laps" and first["instance"] == 0 and first["decode_instance"] == 1
    assert first["slo_ttft_s"] == 0.2 and first["router_queue_s"] == pytest.approx(0.002)
    fig = inter_token_figures(by_row[1].chunk_times_s)
    assert first["itl_p90_s"] == pytest.approx(fig.itl_p90_s) and first["n_chunks"] == 21
    rejected = f.iloc[3]
    assert rejected["http_status"] == 429 and rejected["error_message"] == "queue full"
    assert pd.isna(rejected["x_request_id"]) and rejected["instance"] == -1
    assert f.loc[f["request_id"] == 3, "cached_tokens"].item() == 128
    assert f.loc[f["request_id"] == 2, "cached_tokens"].item() == 0  # unknown: 0, as replays write
    assert f.loc[f["request_id"] == 6, "http_status"].item() == 408


def test_the_trace_loads_and_simulates_with_the_arrivals_the_router_saw(tmp_path):
    import sim

    paths = record(tmp_path / "run", workload())
    trace = load(paths["trace"])
    assert trace.name == "run"
    f = trace.frame
    assert f["request_id"].tolist() == [1, 2, 3, 4, 5, 6, 7]
    np.testing.assert_allclose(f["arrival_s"], [0.0, 0.2, 0.5, 0.7, 0.8, 0.9, 1.0], atol=1e-9)
    # Served: what was produced; not served (or cut short): the budget asked for.
    assert f["output_tokens"].tolist() == [21, 6, 11, 100, 40, 10, 50]
    assert f["prompt_tokens"].tolist() == [200, 200, 200, 50, 70, 30, 30]
    first = trace[0]
    assert first.session_id == "chat-1" and first.prefix_hashes == (11, 22, 33)
    assert first.block_tokens == 16 and first.model == "qwen"
    assert (first.slo_ttft_s, first.slo_tpot_s) == (0.2, 0.05)
    assert not f["failed"].any()
    # Epoch seconds of the first arrival (the router's clock is time.monotonic).
    assert trace.origin_s == pytest.approx(time.time() - time.monotonic() + T0, abs=60)
    result = sim.run(str(paths["trace"]), "fcfs", instances=1)
    assert result.summary["n_requests"] == 7


def test_periodic_writes_leave_a_readable_folder_while_the_router_runs(tmp_path):
    folder = tmp_path / "live"
    rec = Recorder(folder, policy="fcfs", flush_every_s=0.05)
    records = workload()
    for r in records[:3]:
        rec.add(r)
    deadline = time.monotonic() + 10
    while not (folder / "results.parquet").is_file() and time.monotonic() < deadline:
        time.sleep(0.02)
    (run,) = load_sources([folder]).runs  # mid-run, without close
    assert run.summary["n_requests"] == 3
    for r in records[3:]:
        rec.add(r)
    rec.close()
    assert len(pd.read_parquet(folder / "results.parquet")) == 7
    assert len(load(folder / "trace.parquet")) == 7
    assert not (folder / ".writing").exists()


def test_a_failed_write_keeps_the_files_before_it_and_loses_no_record(tmp_path, monkeypatch):
    import traces.loaders.canonical as canonical

    folder = tmp_path / "run"
    rec = Recorder(folder, policy="fcfs", flush_every_s=0)
    records = workload()
    rec.add(records[0])
    rec.flush()
    rec.add(records[1])

    def disk_full(trace, path):
        Path(path).write_bytes(b"PAR1 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(canonical, "save_parquet", disk_full)
    with pytest.raises(OSError, match="No space"):
        rec.flush()
    assert len(load(folder / "trace.parquet")) == 1  # the previous complete file
    assert len(pd.read_parquet(folder / "results.parquet")) == 1
    monkeypatch.undo()
    for r in records[2:]:
        rec.add(r)
    rec.close()
    assert len(load(folder / "trace.parquet")) == 7
    assert len(pd.read_parquet(folder / "results.parquet")) == 7


def test_a_bad_folder_is_a_clear_error_naming_it(tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match=r"taken: not a folder"):
        Recorder(a_file, policy="fcfs", flush_every_s=0)
    with pytest.raises(ConfigError, match=r"taken/run: cannot create the record folder"):
        Recorder(a_file / "run", policy="fcfs", flush_every_s=0)
    record(tmp_path / "old", workload()[:1])
    with pytest.raises(ConfigError, match=r"old: holds a recording already"):
        Recorder(tmp_path / "old", policy="fcfs", flush_every_s=0)
    with pytest.raises(ConfigError, match=r"new: instances\[0\]\.role: Input should be"):
        Recorder(tmp_path / "new", policy="fcfs", instances=[{"id": 0, "name": "x", "role": "big"}])


def test_an_unwritable_folder_is_a_clear_error(tmp_path, monkeypatch):
    # Root writes through permission bits, so the file system's answer is stood in for.
    import scheduler.router.record as record_module

    folder = tmp_path / "ro"
    real_access = record_module.os.access
    monkeypatch.setattr(
        record_module.os,
        "access",
        lambda path, mode: False if Path(path).is_relative_to(folder) else real_access(path, mode),
    )
    with pytest.raises(ConfigError, match=r"ro: the record folder is not writable"):
        Recorder(folder, policy="fcfs", flush_every_s=0)


def test_add_refuses_a_repeated_row_an_unfinished_outcome_and_a_closed_recorder(tmp_path):
    rec = Recorder(tmp_path / "run", policy="fcfs", flush_every_s=0)
    rec.add(workload()[0])
    with pytest.raises(ValueError, match="row 3 was recorded before"):
        rec.add(workload()[0])
    with pytest.raises(ValueError, match="not final"):
        rec.add(RouterRecord(row=9, arrival_s=T0, outcome=OUTCOME_PENDING))
    assert len(rec) == 1
    rec.close()
    rec.close()  # harmless
    with pytest.raises(ValueError, match="closed"):
        rec.add(RouterRecord(row=10, arrival_s=T0))
    assert json.loads((tmp_path / "run" / "run.json").read_text())["source"] == "router"


def test_closing_without_records_leaves_only_run_json(tmp_path):
    with Recorder(tmp_path / "empty", policy="fcfs", flush_every_s=0.01):
        pass
    assert [p.name for p in (tmp_path / "empty").iterdir()] == ["run.json"]


def test_importing_the_recorder_loads_no_dataframe_library():
    code = (
        "import sys, scheduler.router.record, scheduler.router.metrics\n"
        "print([m for m in ('pandas', 'pyarrow', 'sim') if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_folder_the_process_may_not_write_is_refused_at_start(tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match=r"run: the record folder is not writable"):
        Recorder(tmp_path / "run", policy="fcfs", flush_every_s=0)


def test_itl_figures_of_a_batch_are_each_records_own_figures(tmp_path):
    rng = np.random.default_rng(7)
    records = []
    for row in range(60):
        n = int(rng.integers(0, 40))
        times = list(T0 + np.cumsum(rng.exponential(0.02, n)))
        tokens = None if row % 3 else [int(k) for k in rng.integers(1, 5, n)]
        records.append(
            RouterRecord(
                row=row,
                arrival_s=T0,
                first_token_s=times[0] if times else math.nan,
                finish_s=times[-1] if times else T0,
                output_tokens=n,
                chunk_times_s=times,
                chunk_tokens=tokens,
            )
        )
    records.append(
        RouterRecord(row=60, arrival_s=T0, finish_s=T0 + 1, chunk_times_s=[T0 + 0.2, T0 + 0.1])
    )  # backwards: no figures
    paths = record(tmp_path / "run", records)
    f = pd.read_parquet(paths["results"]).set_index("request_id")
    for r in records[:-1]:
        fig = inter_token_figures(r.chunk_times_s, r.chunk_tokens)
        got = f.loc[r.row, ["itl_p50_s", "itl_p90_s", "itl_p99_s", "itl_max_s"]].to_numpy(float)
        want = [fig.itl_p50_s, fig.itl_p90_s, fig.itl_p99_s, fig.itl_max_s]
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=str(r.row))
        assert f.loc[r.row, "n_chunks"] == fig.n_chunks
    assert f.loc[60, ["itl_p50_s", "itl_max_s"]].isna().all() and f.loc[60, "n_chunks"] == 2
