"""``llmsched router`` operated: health, readiness and metrics, and a graceful SIGTERM (the real CLI).

A load balancer's view (``/health``, ``/readiness`` 503 with no healthy
backend, or a PD router missing a role; ``/metrics`` after traffic), and
what clients and operators see when the router is told to stop: the stream
in flight finishes, new requests are refused, the process exits 0 with its
``--record`` written, its logs JSON lines; past ``shutdown_grace_s`` the
stream is cut and recorded so.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from scheduler.router.config import RouterConfig
from scheduler.router.server import running_in_thread
from tests.integration.router_support import (
    MODEL,
    Procs,
    completion,
    emulate,
    events,
    procs_in,
    start_router,
    texts,
)
from tests.loopback import free_port


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("router_ops")


@pytest.fixture(scope="module")
def procs(folder: Path) -> Iterator[Procs]:
    with procs_in(folder) as p:
        yield p


@pytest.fixture(scope="module")
def vllm(procs: Procs) -> list[str]:
    return emulate(procs, "vllm")


@pytest.fixture(scope="module")
def router(vllm: list[str]) -> Iterator[str]:
    cfg = RouterConfig(port=free_port(), backends=[{"url": vllm[0], "protocol": "vllm"}])
    with running_in_thread(cfg) as srv:
        yield f"http://127.0.0.1:{srv.port}"


def test_health_readiness_and_metrics(router: str, vllm: list[str]) -> None:
    assert httpx.get(router + "/health").status_code == 200
    ready = httpx.get(router + "/readiness")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    httpx.post(router + "/v1/completions", json=completion(5, 2), timeout=10.0)
    text = httpx.get(router + "/metrics").text
    ok = [
        line
        for line in text.splitlines()
        if line.startswith("llmsched_router_requests_total{")
        and 'endpoint="completions"' in line
        and 'status="200"' in line
    ]
    assert ok and sum(float(x.rsplit(" ", 1)[1]) for x in ok) >= 1
    assert "llmsched_router_ttft_seconds_bucket" in text
    assert "llmsched_router_backend_up" in text
    models = httpx.get(router + "/v1/models", timeout=5.0)
    assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == [MODEL]
    # No healthy backend: alive, not ready.
    dead = f"http://127.0.0.1:{free_port()}"
    with running_in_thread(RouterConfig(port=free_port(), backends=[{"url": dead}])) as srv:
        url = f"http://127.0.0.1:{srv.port}"
        assert httpx.get(url + "/health").status_code == 200
        r = httpx.get(url + "/readiness")
        assert r.status_code == 503 and r.json()["ready"] is False
        out = httpx.post(url + "/v1/completions", json=completion(3, 1), timeout=10.0)
        assert out.status_code == 503 and out.json()["error"]["message"]
    # PD with a healthy prefill and a dead decode server: not ready.
    cfg = RouterConfig(
        port=free_port(),
        backends=[
            {"url": vllm[0], "protocol": "vllm", "role": "prefill"},
            {"url": dead, "protocol": "vllm", "role": "decode"},
        ],
    )
    with running_in_thread(cfg) as srv:
        r = httpx.get(f"http://127.0.0.1:{srv.port}/readiness")
        assert r.status_code == 503 and "decode backends: 0" in r.json()["detail"]


def test_sigterm_lets_the_stream_finish_and_exits_0(vllm, folder: Path) -> None:
    pd = pytest.importorskip("pandas")
    record = folder / "shutdown-record"
    with procs_in(folder) as procs:
        router, proc = start_router(
            procs, ["--backend", vllm[0], "--protocol", "vllm", "--record", str(record)]
        )
        got: dict[str, Any] = {}
        started = threading.Event()

        def slow() -> None:
            data: list[str] = []
            body = completion(10, 2500, stream=True)  # about 2 s at --time-scale 10
            with httpx.stream("POST", router + "/v1/completions", json=body, timeout=20.0) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        data.append(line[6:])
                        started.set()
            got["data"] = data

        t = threading.Thread(target=slow)
        t.start()
        assert started.wait(10.0)
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.1)
        try:
            late = httpx.post(router + "/v1/completions", json=completion(3, 1), timeout=5.0)
            assert late.status_code == 503 and "shutting down" in late.json()["error"]["message"]
            # A load balancer's probes see it leave.
            assert httpx.get(router + "/health", timeout=5.0).status_code == 503
            assert httpx.get(router + "/readiness", timeout=5.0).status_code == 503
        except httpx.ConnectError:
            pass  # the listener already closed: also a refusal
        assert t.is_alive(), "the slow stream ended before the checks: make it longer"
        t.join(timeout=20.0)
        evs = events(got["data"])
        assert len("".join(texts(evs, chat=False)).split()) == 2500
        assert proc.wait(timeout=15.0) == 0
    rows = pd.read_parquet(record / "results.parquet")
    assert list(rows["outcome"]) == ["ok"] and list(rows["output_tokens"]) == [2500]


def test_sigterm_past_the_grace_cuts_the_stream_and_records_it_cut(vllm, folder: Path) -> None:
    pd = pytest.importorskip("pandas")
    record = folder / "grace-record"
    config = folder / "grace.toml"
    config.write_text(
        f'shutdown_grace_s = 0.2\nrecord = "{record}"\n[[backends]]\nurl = "{vllm[0]}"\n'
    )
    with procs_in(folder) as procs:
        router, proc = start_router(procs, ["--config", str(config)])
        got: dict[str, Any] = {"data": []}
        started = threading.Event()

        def slow() -> None:
            body = completion(10, 6000, stream=True)  # about 4 s at --time-scale 10
            try:
                with httpx.stream("POST", router + "/v1/completions", json=body, timeout=20.0) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            got["data"].append(line[6:])
                            started.set()
            except httpx.HTTPError as exc:
                got["error"] = exc

        t = threading.Thread(target=slow)
        t.start()
        assert started.wait(10.0)
        os.kill(proc.pid, signal.SIGTERM)
        t.join(timeout=20.0)
        assert proc.wait(timeout=10.0) == 0
        log = procs.log_of(proc)
    # Its log stays JSON lines, uvicorn's complaint about the cut included.
    lines = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert any(x["level"] == "warning" and "grace" in x["message"] for x in lines)
    # The client can tell the answer is incomplete: no [DONE], or a cut connection.
    assert "error" in got or got["data"][-1] != "[DONE]"
    (row,) = pd.read_parquet(record / "results.parquet").itertuples()
    assert row.outcome != "ok" and row.output_tokens < 6000
    assert "shut" in row.error_message or "stopped" in row.error_message
