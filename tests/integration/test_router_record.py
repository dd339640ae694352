"""The router's record and its policy: a live run replays in the simulator, and both run one policy.

``llmsched router --record DIR`` in front of an emulated vLLM takes a
bundled trace from ``llmsched replay``; ``llmsched simulate --trace
DIR/trace.parquet`` on the emulator's model and GPU predicts the same run,
and ``llmsched report`` shows both. Then a policy class registered by the
test runs one short trace in the simulator (:func:`sim.api.run`) and in
the router, which must call the same hooks on the same class: no decision
lives in the router.
"""

from __future__ import annotations

import ast
import asyncio
import functools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import numpy as np
import orjson
import pandas as pd
import pytest

from scheduler import registry
from scheduler.cost_model import CostModel
from scheduler.policies.laps import LapsPolicy
from scheduler.router.config import RouterConfig
from scheduler.router.server import running_in_thread as router_in_thread
from sim.api import run as simulate
from sim.emulator import EmulatorConfig
from sim.emulator import running_in_thread as emulator_in_thread
from sim.loop import Simulation
from tests.loopback import free_port, run_llmsched
from tests.unit.sim.fakes import make_limits, make_trace

ROUTER_DIR = Path(__file__).parents[2] / "scheduler" / "router"
MODEL, GPU = "llama-3.1-8b", "h100"


_cli = functools.partial(run_llmsched, timeout_s=120)


def _router_config(url: str, policy: str, **kw: Any) -> RouterConfig:
    return RouterConfig.model_validate(
        {
            "port": free_port(),
            "backends": [{"url": url, "protocol": "vllm"}],
            "policy": policy,
            "log_level": "warning",
            "shutdown_grace_s": 2.0,
            **kw,
        }
    )


def _wait_ready(url: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readiness", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"router at {url} never became ready")


# -- record, replay, simulate, report ----------------------------------------------------


def test_a_recorded_router_run_simulates_and_reports_beside_the_simulation(
    tmp_path: Path,
) -> None:
    live, simulated, report = tmp_path / "live", tmp_path / "sim", tmp_path / "report"
    n = 30  # the bundled conversation trace's first 30 requests, at twice its rate: about 10 s
    emu = EmulatorConfig(protocol="vllm", model=MODEL, gpu=GPU, port=free_port())
    with emulator_in_thread(emu) as e:
        cfg = _router_config(f"http://127.0.0.1:{e.ports[0]}", "fcfs", record=str(live))
        with router_in_thread(cfg) as r:
            url = f"http://127.0.0.1:{r.port}"
            _wait_ready(url)
            done = _cli(
                "replay", "--trace", "bundled:azure-conv", "--max-requests", str(n), "--load", "2",
                "--target", url, "--protocol", "openai", "--out", str(tmp_path / "client"), "-q",
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
    # The router flushed its record on the way down.
    for name in ("run.json", "results.parquet", "summary.json", "trace.parquet"):
        assert (live / name).is_file(), sorted(p.name for p in live.iterdir())
    meta = json.loads((live / "run.json").read_text())
    assert meta["source"] == "router", meta
    records = pd.read_parquet(live / "results.parquet")
    trace = pd.read_parquet(live / "trace.parquet")
    assert len(records) == len(trace) == n
    sent = pd.read_parquet(tmp_path / "client" / "results.parquet")
    # The router saw the prompts the client sent, and served every answer in full.
    assert sorted(trace["prompt_tokens"]) == sorted(sent["prompt_tokens"])
    assert sorted(trace["output_tokens"]) == sorted(sent["output_tokens"])
    assert (records["dispatch_s"] >= records["arrival_s"]).all()
    # Its arrivals are the client's sends, on the router's clock (both count from the first).
    # A moment's stall of either process on a shared machine delays one arrival by tens of
    # milliseconds; a wrong clock (dispatch, first token, epoch) would move them all.
    sends = sent["send_s"].to_numpy() - sent["send_s"].min()
    lag = np.abs(np.sort(trace["arrival_s"].to_numpy()) - np.sort(sends))
    lag_note = f"arrival minus send, ms: {np.round(np.sort(lag) * 1e3, 2).tolist()}"
    assert np.median(lag) < 0.005 and np.quantile(lag, 0.9) < 0.02, lag_note

    sim = _cli(
        "simulate", "--trace", str(live / "trace.parquet"), "--model", MODEL, "--gpu", GPU,
        "--policy", "fcfs", "--out", str(simulated), "-q",
    )  # fmt: skip
    assert sim.returncode == 0, sim.stderr
    rep = _cli("report", str(live), str(simulated), "--out", str(report), "-q")
    assert rep.returncode == 0, rep.stderr
    table = pd.read_csv(report / "summary.csv")
    # One row a run, labelled by its folder, each saying where its records come from.
    rows = {row["records_from"]: row for _, row in table.iterrows()}
    assert sorted(rows) == ["router", "simulator"], table["records_from"].tolist()
    assert sorted(table["source"]) == ["live", "sim"], table["source"].tolist()
    assert json.loads((simulated / "run.json").read_text())["source"] == "simulator"
    for key in ("n_requests", "n_completed"):
        assert rows["router"][key] == rows["simulator"][key] == n
    md = (report / "summary.md").read_text()
    assert "fcfs [live]" in md and "fcfs [sim]" in md, md
    assert (report / "report.html").stat().st_size > 0
    # One instance at 3 requests per second is lightly loaded: the simulated E2E, mostly
    # decode steps, is the emulated one (which is the simulator's engine on the wall clock).
    r_s = json.loads((live / "summary.json").read_text())
    s_s = json.loads((simulated / "summary.json").read_text())
    note = "; ".join(
        f"{k} router {r_s[k] * 1e3:.1f} ms, simulated {s_s[k] * 1e3:.1f} ms"
        for k in ("ttft_p50_s", "e2e_p50_s", "e2e_p90_s")
    )
    assert abs(r_s["e2e_p50_s"] / s_s["e2e_p50_s"] - 1) < 0.1, note
    print(note)


# -- one policy, two drivers --------------------------------------------------------------


class RecordingLaps(LapsPolicy):
    """``laps``, noting each hook called and on which class."""

    calls: ClassVar[list[tuple[str, type]]] = []

    def on_arrival(self, request: Any, now_s: float, view: Any) -> Any:
        self.calls.append(("on_arrival", type(self)))
        return super().on_arrival(request, now_s, view)

    def on_progress(self, instance_id: int, now_s: float, view: Any) -> Any:
        self.calls.append(("on_progress", type(self)))
        return super().on_progress(instance_id, now_s, view)

    def on_timer(self, now_s: float, view: Any) -> Any:
        self.calls.append(("on_timer", type(self)))
        return super().on_timer(now_s, view)

    def on_health(self, instance_id: int, healthy: bool, now_s: float, view: Any) -> Any:
        self.calls.append(("on_health", type(self)))
        return super().on_health(instance_id, healthy, now_s, view)


NAME = "test-recording-laps"


@pytest.fixture
def recording_laps() -> Iterator[type[RecordingLaps]]:
    """RecordingLaps registered under NAME for the test only (the registry is process-wide:
    left in, it would show up in every later listing of the policies)."""
    registry.register(NAME)(RecordingLaps)
    try:
        yield RecordingLaps
    finally:
        registry._REGISTRY.pop(NAME, None)


def _short_trace() -> pd.DataFrame:
    """Twelve requests 40 ms apart: short prompts, and every third one long."""
    k = np.arange(12)
    return pd.DataFrame(
        {
            "arrival_s": k * 0.04,
            "prompt_tokens": np.where(k % 3 == 2, 1500, 40),
            "output_tokens": np.full(12, 8),
        }
    )


async def _send(url: str, frame: pd.DataFrame) -> list[int]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        t0 = time.perf_counter()

        async def one(i: int, row: Any) -> int:
            await asyncio.sleep(max(0.0, row.arrival_s - (time.perf_counter() - t0)))
            words = " ".join(f"r{i}w{j}" for j in range(int(row.prompt_tokens)))
            r = await c.post(
                "/v1/completions", json={"prompt": words, "max_tokens": int(row.output_tokens)}
            )
            return r.status_code

        return await asyncio.gather(*(one(i, row) for i, row in enumerate(frame.itertuples())))


def test_the_router_and_the_simulator_drive_the_same_policy_class_through_the_same_hooks(
    recording_laps: type[RecordingLaps],
) -> None:
    frame = _short_trace()
    cls = registry.policy_class(NAME)
    assert cls is RecordingLaps

    RecordingLaps.calls.clear()
    result = simulate(frame, NAME, model=MODEL, gpu=GPU, instances=1)
    assert result.summary["n_completed"] == len(frame)
    # The public API schedules no health change; the simulator's loop, told of one, tells the
    # policy as the router does when a probe fails.
    loop = Simulation(
        make_trace(frame["arrival_s"], frame["prompt_tokens"], frame["output_tokens"]),
        CostModel.from_names(MODEL, GPU, 1), registry.create(NAME), make_limits(), instances=2,
    )  # fmt: skip
    loop.schedule_health(0.1, 1, False)
    loop.schedule_health(0.2, 1, True)
    assert (loop.run().frame()["outcome"] == "ok").all()
    in_sim = list(RecordingLaps.calls)

    RecordingLaps.calls.clear()
    emu = EmulatorConfig(protocol="vllm", model=MODEL, gpu=GPU, port=free_port())
    with emulator_in_thread(emu) as e:
        cfg = _router_config(f"http://127.0.0.1:{e.ports[0]}", NAME)
        with router_in_thread(cfg) as r:
            assert type(r.router.policy) is RecordingLaps  # built by the registry, as sim does
            _wait_ready(f"http://127.0.0.1:{r.port}")
            status = asyncio.run(_send(f"http://127.0.0.1:{r.port}", frame))
    in_router = list(RecordingLaps.calls)
    assert status == [200] * len(frame)

    def hooks(calls: list[tuple[str, type]]) -> dict[str, int]:
        return {h: sum(1 for name, _ in calls if name == h) for h in sorted({c[0] for c in calls})}

    assert {c for _, c in in_sim} == {c for _, c in in_router} == {RecordingLaps}
    sim_hooks, router_hooks = hooks(in_sim), hooks(in_router)
    note = f"simulator called {sim_hooks}; router called {router_hooks}"
    # Every arrival is the policy's to place, in both; both report progress, wake the policy's
    # batch window and tell it of health (the router: its backend's first good probe).
    assert sim_hooks["on_arrival"] == 2 * len(frame), note  # the API's run and the loop's
    assert router_hooks["on_arrival"] == len(frame), note
    for hook in ("on_progress", "on_timer"):
        assert sim_hooks.get(hook, 0) > 0 and router_hooks.get(hook, 0) > 0, note
    assert sim_hooks.get("on_health", 0) == 2 and router_hooks.get("on_health", 0) >= 1, note
    print(note)


def test_the_router_package_imports_no_policy_and_decides_nothing_itself() -> None:
    decision_modules = ("scheduler.policies", "scheduler.batch_window", "scheduler.length")
    decision_modules += ("scheduler.routing", "scheduler.graph_buckets", "sim")
    from_policy: dict[str, set[str]] = {}
    for path in sorted(ROUTER_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module]
                if node.module == "scheduler.policy":
                    from_policy.setdefault(path.name, set()).update(a.name for a in node.names)
            elif isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            else:
                continue
            for m in mods:
                assert not any(m == d or m.startswith(d + ".") for d in decision_modules), (
                    f"{path.name} imports {m}"
                )
        defined = {
            n.name
            for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        }
        assert not defined & {"least_loaded", "select_worker", "select_decode_instance"}, path.name
    # The one fallback choice the live driver makes itself (the retry target, the decode
    # server when the policy names none) is the policy module's own least_loaded.
    assert "least_loaded" in from_policy.get("live.py", set()), from_policy


def test_the_record_says_how_each_request_ended(tmp_path: Path) -> None:
    from sim.emulator.faults import FaultSpec
    from traces.records import (
        OUTCOME_CANCELLED,
        OUTCOME_ERROR,
        OUTCOME_NAMES,
        OUTCOME_OK,
        OUTCOME_REJECTED,
    )

    # Every stream is cut after three chunks, 50 ms apart; whole answers are not.
    faults = FaultSpec(cut_after_chunks=3, chunk_delay_s=0.05)
    emu = EmulatorConfig(protocol="vllm", model=MODEL, gpu=GPU, port=free_port(), faults=faults)
    out = tmp_path / "live"
    with emulator_in_thread(emu) as e:
        cfg = _router_config(
            f"http://127.0.0.1:{e.ports[0]}", "fcfs", record=str(out), max_prompt_tokens=100
        )
        with router_in_thread(cfg) as r, httpx.Client(timeout=10) as c:
            url = f"http://127.0.0.1:{r.port}/v1/completions"
            _wait_ready(f"http://127.0.0.1:{r.port}")
            whole = [c.post(url, json={"prompt": "a b c", "max_tokens": 5}) for _ in range(3)]
            cut = []
            for _ in range(2):
                with c.stream(
                    "POST", url, json={"prompt": "a b", "max_tokens": 40, "stream": True}
                ) as s:
                    cut.append([x for x in s.iter_lines() if x.startswith("data: ")])
            with c.stream("POST", url, json={"prompt": "a", "max_tokens": 9, "stream": True}) as s:
                next(s.iter_lines())  # the first event, then the client leaves
            time.sleep(0.2)
            too_long = " ".join(["w"] * 200)
            bad = c.post(url, json={"prompt": too_long, "max_tokens": 7})
    assert [x.status_code for x in whole] == [200] * 3 and bad.status_code == 400
    assert all("error" in orjson.loads(lines[-1][6:]) for lines in cut), cut
    records = pd.read_parquet(out / "results.parquet").sort_values("arrival_s")
    name = {OUTCOME_NAMES[k]: k for k in range(len(OUTCOME_NAMES))}
    got = [name.get(o, o) for o in records["outcome"].astype(str)]
    expected = [OUTCOME_OK] * 3 + [OUTCOME_ERROR] * 2 + [OUTCOME_CANCELLED, OUTCOME_REJECTED]
    assert got == expected, records[["outcome", "http_status", "error_message"]]
    assert records["http_status"].tolist()[-1] == 400
    assert records["prompt_tokens"].iloc[-1] == 200 and records["max_tokens"].iloc[-1] == 7
    assert records["error_message"].iloc[3:5].str.contains("cut").all(), records["error_message"]
    assert records["output_tokens"].iloc[:3].tolist() == [5] * 3
    # A cut stream's output is not nothing: without the usage the cut took away, the router
    # counts the content events it relayed (three), a lower bound on the tokens the client got
    # (one word a token; the slow stream packs several in a chunk).
    received = [
        len("".join(orjson.loads(x[6:])["choices"][0]["text"] for x in lines[:-1]).split())
        for lines in cut
    ]
    assert records["output_tokens"].iloc[3:5].tolist() == [3, 3], records["output_tokens"]
    assert min(received) >= 3, received
    # And the client that left after one event had one token.
    assert records["output_tokens"].iloc[5] >= 1
    assert len(pd.read_parquet(out / "trace.parquet")) == 7
