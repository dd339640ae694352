"""The router live, on loopback: the policy's order at the backend, failures, its queue, its latency.

Emulated backends (``llmsched emulate``, in a thread, or as a process where
one must be killed) behind a router in a thread of the test, or as a
process where its latency is measured; clients are httpx or raw asyncio
sockets. Each test asserts what a client of the router would notice: the
order answers come back in, a complete answer or an explicit error, a
status, how long the first token takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pandas as pd
import pytest

from scheduler.router.config import RouterConfig, load_config
from scheduler.router.server import running_in_thread as router_in_thread
from sim.emulator import EmulatorConfig
from sim.emulator import running_in_thread as emulator_in_thread
from sim.emulator.faults import FaultSpec
from tests.loopback import free_port, wait_healthy

LLMSCHED = Path(sys.executable).with_name("llmsched")
ADMIN = "test-admin-key"


# -- helpers ----------------------------------------------------------------------------


def _url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def _router_config(backends: list[str], protocol: str = "vllm", **kw: object) -> RouterConfig:
    base: dict = {
        "port": free_port(),
        "backends": [{"url": u, "protocol": protocol} for u in backends],
        "admin_key": ADMIN,
        "log_level": "warning",
        "shutdown_grace_s": 1.0,
    }
    base.update(kw)
    return RouterConfig.model_validate(base)


def _ready(url: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url + "/readiness", timeout=1).status_code == 200:
                return
        time.sleep(0.05)
    raise AssertionError(f"router at {url} never became ready")


def _metric(text: str, name: str, default: float | None = None, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (``default``: if none)."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        got = dict(re.findall(r'(\w+)="([^"]*)"', head))
        if all(got.get(k) == v for k, v in labels.items()):
            total, seen = total + float(value), True
    if not seen and default is not None:
        return default
    assert seen, f"no sample of {name} with {labels}:\n" + "\n".join(
        x for x in text.splitlines() if x.startswith(name)
    )
    return total


def _metrics(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=5).text


def _workers(url: str) -> dict[str, dict]:
    r = httpx.get(url + "/workers", headers={"authorization": f"Bearer {ADMIN}"}, timeout=5)
    assert r.status_code == 200, r.text
    return {w["url"]: w for w in r.json()["workers"]}


@contextlib.contextmanager
def _emulate_process(port: int, *args: str) -> Iterator[subprocess.Popen]:
    cmd = [str(LLMSCHED), "emulate", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _alive(*procs: subprocess.Popen) -> None:
    for p in procs:
        assert p.poll() is None, f"process exited: {p.communicate()[1]}"


# -- 1. the policy's order, seen at the backend ------------------------------------------

LONG_WORDS = 4000  # prompt tokens of a long request (the tokenizers count one a word)
N_LONG = N_SHORT = 4


async def _finish_order(url: str) -> dict[str, list[float]]:
    """Send N_LONG long prompts, then (100 ms later) N_SHORT short ones; each one's finish time."""
    filler = " ".join(["w"] * LONG_WORDS)
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        t0 = time.perf_counter()

        async def one(kind: str, i: int, at_s: float) -> tuple[str, float]:
            await asyncio.sleep(at_s)
            # Distinct first words: no prompt shares a cached prefix with another.
            prompt = f"long{i} {filler}" if kind == "long" else f"short {i}"
            r = await c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
            assert r.status_code == 200, r.text
            return kind, time.perf_counter() - t0

        sent = [one("long", i, 0.01 * i) for i in range(N_LONG)]
        sent += [one("short", i, 0.1 + 0.01 * i) for i in range(N_SHORT)]
        done = await asyncio.gather(*sent)
    return {k: sorted(t for kind, t in done if kind == k) for k in ("long", "short")}


@pytest.mark.parametrize("protocol", ["vllm", "sglang"])
@pytest.mark.parametrize("policy", ["laps", "fcfs"])
def test_laps_lets_short_requests_overtake_queued_long_ones_and_fcfs_does_not(
    policy: str, protocol: str, tmp_path: Path
) -> None:
    # One instance that admits one request at a time, four times slower than an H100: a
    # 4,000-token prefill takes about 0.7 s of wall time, a short request about 60 ms.
    emu = EmulatorConfig(
        protocol=protocol, port=free_port(), time_scale=0.25, limits={"max_running_requests": 1}
    )
    # No starvation bound within the test: short ones may overtake every held long one.
    params = {"max_wait_ms": 60_000} if policy == "laps" else {}
    with emulator_in_thread(emu) as e:
        cfg = _router_config(
            [_url(e.ports[0])], protocol, policy=policy, policy_params=params,
            record=str(tmp_path / "rec"),
        )  # fmt: skip
        with router_in_thread(cfg) as r:
            _ready(_url(r.port))
            times = asyncio.run(_finish_order(_url(r.port)))
    longs, shorts = times["long"], times["short"]
    # The order the router sent them upstream, by prompt length (long: L, short: S).
    records = pd.read_parquet(tmp_path / "rec" / "results.parquet").sort_values("dispatch_s")
    sent = "".join("L" if p >= LONG_WORDS else "S" for p in records["prompt_tokens"])
    note = f"{policy} ({protocol}): long finished at {longs}, short at {shorts} (s)"
    if policy == "laps":
        # The first two long ones were sent before any short one arrived: laps keeps one
        # released unit queued behind the prefill in progress, as the simulator does. The
        # other two wait in the router, and every short one goes before them.
        assert max(shorts) < longs[2], note
        assert max(shorts) - longs[1] < 0.5 * (longs[2] - longs[1]), note
        assert sent == "LLSSSSLL", sent
    else:
        # First come, first served: the instance's queue holds them in arrival order.
        assert min(shorts) > longs[-1], note
        assert sent == "LLLLSSSS", sent
    print(note)


# -- 2. a backend killed mid-stream, and restarted --------------------------------------


def _tokens(event: dict) -> int | None:
    """Output tokens an answer or event reports (OpenAI's usage, SGLang's meta_info)."""
    counts = event.get("usage") or event.get("meta_info") or {}
    return counts.get("completion_tokens")


def _outcome(
    client: httpx.Client,
    url: str,
    max_tokens: int,
    stream: bool = True,
    protocol: str = "vllm",
    began: threading.Event | None = None,
) -> str:
    """``complete`` (every token asked for, and a stream's ``[DONE]``), ``error`` (an HTTP error or
    an in-stream error event), or what went wrong: ``truncated``, ``hung``, a transport error."""
    path = "/generate" if protocol == "sglang" else "/v1/completions"
    body: dict = {"prompt": "tell me a story", "max_tokens": max_tokens, "stream": stream}
    if protocol == "sglang":
        body = {
            "text": "tell me",
            "stream": stream,
            "sampling_params": {"max_new_tokens": max_tokens},
        }
    elif stream:
        body["stream_options"] = {"include_usage": True}
    try:
        if not stream:
            r = client.post(url + path, json=body)
            if r.status_code != 200:
                return "error"
            n = _tokens(r.json())
            return "complete" if n == max_tokens else f"truncated at {n} tokens"
        with client.stream("POST", url + path, json=body) as r:
            if r.status_code != 200:
                r.read()
                return "error"
            done = errored = False
            n = 0
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: {"):
                    if began is not None:
                        began.set()
                    event = orjson.loads(line[6:])
                    errored = errored or "error" in event
                    n = _tokens(event) or n
            if errored:
                return "error"
            return "complete" if done and n == max_tokens else f"truncated ({done=}, {n} tokens)"
    except httpx.TimeoutException:
        return "hung"
    except httpx.TransportError as exc:
        return f"transport error: {exc!r}"


@pytest.mark.parametrize("protocol", ["vllm", "sglang"])
def test_a_killed_backend_leaves_no_request_hanging_or_truncated_and_rejoins_within_5_s(
    protocol: str,
) -> None:
    # Backend 0 is a process of its own, to be killed; the other two serve from a thread.
    # Streams of 1,200 tokens take about 6 s of wall time at the emulator's default pace.
    with contextlib.ExitStack() as stack:
        others = stack.enter_context(
            emulator_in_thread(EmulatorConfig(protocol=protocol, port=free_port(2), instances=2))
        )
        ports = [free_port(), *others.ports]
        urls = [_url(p) for p in ports]
        procs = [stack.enter_context(_emulate_process(ports[0], "--protocol", protocol))]
        assert wait_healthy(urls, lambda: _alive(*procs)), "emulators did not come up"
        cfg = _router_config(urls, protocol, policy="fcfs", read_timeout_s=10.0)
        with router_in_thread(cfg) as r:
            rurl = _url(r.port)
            _ready(rurl)
            client = stack.enter_context(httpx.Client(timeout=20))
            outcomes: list[str] = []
            lock = threading.Lock()

            n_streams, n_short = 12, 6
            began = [threading.Event() for _ in range(n_streams)]

            def send(n_tokens: int, stream: bool = True, k: int | None = None) -> None:
                flag = None if k is None else began[k]
                got = _outcome(client, rurl, n_tokens, stream, protocol, flag)
                with lock:
                    outcomes.append(got)

            # Streams of 3,000 tokens (about 15 s) outlast the wait below even on a loaded
            # machine (1,200 once finished first there). They go out first and alone, so the
            # least-loaded choice spreads them over all three backends whatever the timing
            # (sent beside short requests, backend 0 once drew only the short ones).
            streams = [
                threading.Thread(target=send, args=(3000, True, k)) for k in range(n_streams)
            ]
            for t in streams:
                t.start()
            # Every stream has begun (a chunk reached its client: it cannot be retried
            # elsewhere now); none has finished.
            for k in range(n_streams):
                assert began[k].wait(10.0), f"stream {k} never began"
            in_flight = _workers(rurl)[urls[0]]["outstanding"]
            assert in_flight >= 2, f"only {in_flight} streams were on the killed backend"
            # Short non-streamed requests in flight at the kill: any that backend 0 holds has
            # sent nothing to its client yet, so it is retried on another and completes.
            shorts = [threading.Thread(target=send, args=(40, False)) for _ in range(n_short)]
            for t in shorts:
                t.start()
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait(timeout=5)
            killed_at = time.monotonic()
            # Taken out while its streams end: the admin API says so within a probe or two.
            while _workers(rurl)[urls[0]]["available"] and time.monotonic() < killed_at + 5:
                time.sleep(0.02)
            out_s = time.monotonic() - killed_at
            assert out_s < 5.0, "the killed backend is still available"
            threads = streams + shorts
            for t in threads:
                t.join(timeout=30)
            assert not any(t.is_alive() for t in threads), "a stream hangs"
            assert len(outcomes) == n_streams + n_short
            assert all(o in ("complete", "error") for o in outcomes), outcomes
            # The killed backend's streams end in an error event, the rest complete.
            assert 1 <= outcomes.count("error") <= in_flight, (in_flight, outcomes)
            ended = f"{outcomes.count('complete')} complete, {outcomes.count('error')} errors"

            # Still out; readiness holds (two left) and the gauge says so.
            assert not _workers(rurl)[urls[0]]["available"]
            assert _metric(_metrics(rurl), "llmsched_router_backend_up", backend=urls[0]) == 0
            assert httpx.get(rurl + "/readiness", timeout=5).status_code == 200
            before = _metrics(rurl)
            after_kill = [_outcome(client, rurl, 8, True, protocol) for _ in range(6)]
            assert after_kill == ["complete"] * 6, after_kill
            served = _metric(_metrics(rurl), "llmsched_router_requests_total", status="200")
            on_dead = _metric(
                _metrics(rurl), "llmsched_router_requests_total", 0, backend=urls[0], status="200"
            )
            assert served - _metric(before, "llmsched_router_requests_total", status="200") == 6
            assert on_dead == _metric(
                before, "llmsched_router_requests_total", 0, backend=urls[0], status="200"
            )

            # Restarted on the same port: back in traffic within a probe or two.
            restarted = stack.enter_context(_emulate_process(ports[0], "--protocol", protocol))
            assert wait_healthy([urls[0]], lambda: _alive(restarted)), "no restart"
            up_at = time.monotonic()
            while not _workers(rurl)[urls[0]]["available"] and time.monotonic() < up_at + 10:
                time.sleep(0.02)
            rejoin_s = time.monotonic() - up_at
            assert rejoin_s < 5.0, f"the restarted backend rejoined after {rejoin_s:.2f} s"
            assert _metric(_metrics(rurl), "llmsched_router_backend_up", backend=urls[0]) == 1
            # fcfs sends each to the least loaded: concurrent requests reach the restarted one.
            with lock:
                outcomes.clear()
            threads = [threading.Thread(target=send, args=(50,)) for _ in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=30)
            assert outcomes == ["complete"] * 6, outcomes
            again = _metric(
                _metrics(rurl), "llmsched_router_requests_total", 0, backend=urls[0], status="200"
            )
            assert again > on_dead, "no request reached the restarted backend"
            # Nothing leaked: every request the router sent is finished in its own count too.
            left = {u: w["outstanding"] for u, w in _workers(rurl).items()}
            assert set(left.values()) == {0}, left
            assert _metric(_metrics(rurl), "llmsched_router_inflight_requests") == 0
            print(
                f"{in_flight} requests on the killed backend; {ended}; out after {out_s:.2f} s; "
                f"rejoined {rejoin_s:.2f} s after it was up"
            )


def test_laps_work_held_for_a_killed_backend_goes_to_the_other() -> None:
    # Two slow instances admitting one request at a time; LAPS (temporal) holds each
    # instance's queue in the router, so most requests wait there when backend 0 dies.
    port = free_port()
    slow = ["--time-scale", "0.25", "--max-running-requests", "1"]
    other = EmulatorConfig(
        protocol="vllm", port=free_port(), time_scale=0.25, limits={"max_running_requests": 1}
    )
    with _emulate_process(port, *slow) as proc, emulator_in_thread(other) as o:
        urls = [_url(port), _url(o.ports[0])]
        assert wait_healthy(urls, lambda: _alive(proc)), "emulators did not come up"
        # One long request per release (long_batch_tokens 0), so the rest stay held.
        params = {"mode": "temporal", "max_wait_ms": 60_000, "long_batch_tokens": 0}
        cfg = _router_config(urls, policy="laps", policy_params=params)
        with router_in_thread(cfg) as r:
            rurl = _url(r.port)
            _ready(rurl)

            async def main() -> tuple[list[int], int]:
                async with httpx.AsyncClient(base_url=rurl, timeout=30) as c:
                    filler = " ".join(["w"] * 2000)

                    async def one(i: int) -> int:
                        body = {"prompt": f"r{i} {filler}", "max_tokens": 2}
                        return (await c.post("/v1/completions", json=body)).status_code

                    async def kill() -> int:
                        # Killed once the router holds work (a fixed wait once found the
                        # queues drained to two on a fast machine), or after 1 s regardless.
                        held, t_kill = 0.0, time.monotonic() + 1.0
                        while held < 3 and time.monotonic() < t_kill:
                            await asyncio.sleep(0.02)
                            held = _metric(
                                (await c.get("/metrics")).text,
                                "llmsched_router_queued_requests",
                                queue="held",
                            )
                        proc.send_signal(signal.SIGKILL)
                        return int(held)

                    *status, held = await asyncio.gather(*(one(i) for i in range(10)), kill())
                    return status, held

            t0 = time.monotonic()
            status, held = asyncio.run(main())
            took_s = time.monotonic() - t0
            text = _metrics(rurl)
    assert status == [200] * 10, status
    assert held >= 3, f"only {held} requests were held when the backend died"
    served = [
        _metric(text, "llmsched_router_requests_total", 0, backend=u, status="200") for u in urls
    ]
    assert sum(served) == 10 and served[1] >= 5, served
    # About ten 0.25 s prefills on the one left, plus the kill; nothing waits for a timeout.
    assert took_s < 6.0, took_s


# -- 3. retries and the circuit breaker --------------------------------------------------


@pytest.mark.parametrize(
    ("protocol", "path"), [("vllm", "/v1/completions"), ("sglang", "/generate")]
)
def test_a_503_backend_is_retried_on_another_and_its_breaker_opens(
    protocol: str, path: str
) -> None:
    bad = EmulatorConfig(
        protocol=protocol, port=free_port(), time_scale=10.0,
        faults=FaultSpec(error_rate=1.0, error_status=503),
    )  # fmt: skip
    good = EmulatorConfig(protocol=protocol, port=free_port(), time_scale=10.0)
    body: dict = {"prompt": "a b", "max_tokens": 4}
    if protocol == "sglang":
        body = {"text": "a b", "sampling_params": {"max_new_tokens": 4}}
    with emulator_in_thread(bad) as b, emulator_in_thread(good) as g:
        bad_url, good_url = _url(b.ports[0]), _url(g.ports[0])
        # The failing one is backend 0: fcfs sends an idle cluster's request to the lower id.
        cfg = _router_config([bad_url, good_url], protocol, policy="fcfs", breaker={"open_s": 30.0})
        with router_in_thread(cfg) as r, httpx.Client(base_url=_url(r.port), timeout=10) as c:
            _ready(_url(r.port))
            got = [c.post(path, json=body) for _ in range(8)]
            text = _metrics(_url(r.port))
    assert [x.status_code for x in got] == [200] * 8, [x.text for x in got]
    answers = [x.json() for x in got]
    assert all((a["text"] if protocol == "sglang" else a["choices"][0]["text"]) for a in answers)
    retries = _metric(text, "llmsched_router_retries_total", backend=bad_url)
    # Five failures in a row (the breaker's threshold) open it; then no request goes there.
    assert retries == 5, text
    assert _metric(text, "llmsched_router_breaker_state", backend=bad_url, state="open") == 1
    assert _metric(text, "llmsched_router_breaker_state", backend=good_url, state="closed") == 1
    assert _metric(text, "llmsched_router_requests_total", backend=good_url, status="200") == 8


def test_a_backend_that_refuses_connections_is_retried_on_another() -> None:
    gone = EmulatorConfig(protocol="vllm", port=free_port(), time_scale=10.0)
    good = EmulatorConfig(protocol="vllm", port=free_port(), time_scale=10.0)
    with emulator_in_thread(good) as g:
        gone_url, good_url = _url(gone.port), _url(g.ports[0])
        # Probes far apart: the router still thinks the stopped backend is healthy.
        cfg = _router_config([gone_url, good_url], policy="fcfs", health={"interval_s": 60.0})
        with emulator_in_thread(gone):
            r_ctx = router_in_thread(cfg)
            r = r_ctx.__enter__()
            try:
                rurl = _url(r.port)
                deadline = time.monotonic() + 5
                while not all(w["available"] for w in _workers(rurl).values()):
                    assert time.monotonic() < deadline, _workers(rurl)
                    time.sleep(0.05)
            except BaseException:
                r_ctx.__exit__(None, None, None)
                raise
        try:
            with httpx.Client(base_url=rurl, timeout=10) as c:
                got = [
                    c.post("/v1/completions", json={"prompt": "a b", "max_tokens": 4})
                    for _ in range(3)
                ]
            text = _metrics(rurl)
        finally:
            r_ctx.__exit__(None, None, None)
    assert [x.status_code for x in got] == [200] * 3, [x.text for x in got]
    assert _metric(text, "llmsched_router_retries_total", backend=gone_url) >= 1
    assert _metric(text, "llmsched_router_requests_total", backend=good_url, status="200") == 3


# -- 4. the bounded queue ----------------------------------------------------------------


def test_a_full_queue_answers_429_with_retry_after_and_a_held_request_408(tmp_path: Path) -> None:
    emu = EmulatorConfig(protocol="vllm", port=free_port(), time_scale=10.0)
    with emulator_in_thread(emu) as e:
        # LAPS holds short requests for its batch window: a minute here, with an SLO too
        # loose to cut the window short, so nothing held is released within the test.
        toml = tmp_path / "router.toml"
        toml.write_text(
            f'port = {free_port()}\nmax_queue = 3\nqueue_timeout_s = 1.0\nadmin_key = "{ADMIN}"\n'
            'policy = "laps"\nlog_level = "warning"\nshutdown_grace_s = 1.0\n'
            f'record = "{tmp_path / "rec"}"\n'
            "[policy_params]\nwindow_ms = 60000\nslo_ttft_ms = 600000\nmax_batch = 64\n"
            f'[[backends]]\nurl = "{_url(e.ports[0])}"\nprotocol = "vllm"\n'
        )
        cfg = load_config(toml)
        with router_in_thread(cfg) as r:
            rurl = _url(r.port)
            _ready(rurl)

            async def main() -> list[tuple[int, str | None, float, dict]]:
                async with httpx.AsyncClient(base_url=rurl, timeout=10) as c:
                    t0 = time.perf_counter()

                    async def one(i: int) -> tuple[int, str | None, float, dict]:
                        await asyncio.sleep(0.05 * i)  # the first three are held first
                        x = await c.post(
                            "/v1/completions", json={"prompt": f"q {i}", "max_tokens": 4}
                        )
                        return (
                            x.status_code, x.headers.get("retry-after"),
                            time.perf_counter() - t0 - 0.05 * i, x.json(),
                        )  # fmt: skip

                    return await asyncio.gather(*(one(i) for i in range(6)))

            got = asyncio.run(main())
            text = _metrics(rurl)

            # Clients that give up while held free their places: the queue takes three more.
            async def leave_then_ask() -> list[int]:
                async with httpx.AsyncClient(base_url=rurl, timeout=0.3) as c:
                    for i in range(3):
                        with contextlib.suppress(httpx.TimeoutException):
                            await c.post("/v1/completions", json={"prompt": f"g {i}"})
                await asyncio.sleep(0.1)
                async with httpx.AsyncClient(base_url=rurl, timeout=10) as c:
                    again = [
                        c.post("/v1/completions", json={"prompt": f"a {i}", "max_tokens": 4})
                        for i in range(3)
                    ]
                    return [x.status_code for x in await asyncio.gather(*again)]

            after_leaving = asyncio.run(leave_then_ask())
    assert after_leaving == [408] * 3, after_leaving
    status = [g[0] for g in got]
    assert status == [408] * 3 + [429] * 3, got
    for code, retry_after, took_s, body in got:
        assert "error" in body and body["error"]["code"] == code
        if code == 429:
            assert retry_after is not None and int(retry_after) >= 1
            assert took_s < 0.5, got  # answered at once
        else:
            assert 0.9 <= took_s <= 3.0, got  # held queue_timeout_s, then answered
    assert _metric(text, "llmsched_router_rejected_total", reason="queue_full") == 3
    assert _metric(text, "llmsched_router_rejected_total", reason="timeout") == 3
    # The record keeps the refused requests' budgets: its trace offers what the clients offered.
    records = pd.read_parquet(tmp_path / "rec" / "results.parquet").sort_values("arrival_s")
    first6 = records.iloc[:6]
    assert first6["outcome"].astype(str).tolist() == ["timeout"] * 3 + ["rejected"] * 3
    assert first6["http_status"].tolist() == [408] * 3 + [429] * 3
    assert (first6["max_tokens"] == 4).all(), first6["max_tokens"]
    trace = pd.read_parquet(tmp_path / "rec" / "trace.parquet").sort_values("arrival_s")
    assert (trace["output_tokens"].iloc[:6] == 4).all(), trace["output_tokens"]


def test_a_request_still_held_when_the_shutdown_grace_ends_gets_503_not_a_cut() -> None:
    emu = EmulatorConfig(protocol="vllm", port=free_port(), time_scale=10.0)
    got: list[httpx.Response | BaseException] = []
    with emulator_in_thread(emu) as e:
        # LAPS holds short requests for a minute-long window; the grace is half a second.
        params = {"window_ms": 60_000, "slo_ttft_ms": 600_000}
        cfg = _router_config(
            [_url(e.ports[0])], policy="laps", policy_params=params, shutdown_grace_s=0.5
        )
        with router_in_thread(cfg) as r:
            rurl = _url(r.port)
            _ready(rurl)

            def send() -> None:
                try:
                    body = {"prompt": "a b", "max_tokens": 4}
                    got.append(httpx.post(rurl + "/v1/completions", json=body, timeout=10))
                except httpx.HTTPError as exc:
                    got.append(exc)

            threads = [threading.Thread(target=send) for _ in range(2)]
            for t in threads:
                t.start()
            time.sleep(0.3)
            stop_at = time.monotonic()
        stopped_s = time.monotonic() - stop_at
        for t in threads:
            t.join(timeout=10)
    assert len(got) == 2 and all(isinstance(x, httpx.Response) for x in got), got
    for x in got:
        assert isinstance(x, httpx.Response)
        assert x.status_code == 503 and x.headers.get("retry-after") == "1", (x, x.text)
        assert "shutting down" in x.json()["error"]["message"]
    assert stopped_s < 3.0, stopped_s


# -- 5. the first token's way through the router -----------------------------------------

FIRST = b'data: {"id":"c","object":"text_completion","choices":[{"index":0,"text":"hi"}]}\n\n'
REST = (
    b'data: {"id":"c","object":"text_completion","choices":[{"index":0,"text":" there",'
    b'"finish_reason":"length"}]}\n\ndata: [DONE]\n\n'
)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _TinyBackend:
    """An OpenAI server of one reply: the first event at once, noting when it was written."""

    def __init__(self) -> None:
        self.written: list[float] = []
        #: The caller's port of each reply: which connection it went out on.
        self.peers: list[int] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                m = re.search(rb"content-length:\s*(\d+)", head, re.I)
                if m:
                    await reader.readexactly(int(m.group(1)))
                if head.startswith(b"GET"):
                    body = b'{"status":"ok"}'
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\n\r\n%s" % (len(body), body)
                    )
                    continue
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n" + _chunk(FIRST)
                )
                self.written.append(time.perf_counter())  # the transport sent it at once
                self.peers.append(writer.get_extra_info("peername")[1])
                await asyncio.sleep(0.003)
                writer.write(_chunk(REST) + b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _first_token_delays(port: int, backend: _TinyBackend, n: int) -> list[float]:
    """Send ``n`` streamed requests on one kept-alive connection; first-event arrival minus write."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = b'{"prompt":"hi","max_tokens":2,"stream":true}'
    request = (
        b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    delays = []
    try:
        for _ in range(n):
            writer.write(request)
            buf = b""
            while b"data: {" not in buf:
                buf += await reader.read(65536)
            delays.append(time.perf_counter() - backend.written[-1])
            while not buf.endswith(b"0\r\n\r\n"):
                chunk = await reader.read(65536)
                assert chunk, "connection closed mid-response"
                buf += chunk
            assert b"data: [DONE]" in buf, buf
            await asyncio.sleep(0.005)
    finally:
        writer.close()
    return delays


def test_a_streamed_first_token_leaves_the_router_within_a_millisecond() -> None:
    backend = _TinyBackend()
    rport = free_port()

    async def main() -> tuple[list[float], list[float]]:
        server = await asyncio.start_server(backend.handle, "127.0.0.1", 0)
        bport = server.sockets[0].getsockname()[1]
        cmd = [str(LLMSCHED), "router", "--port", str(rport), "--protocol", "openai"]
        cmd += ["--backend", _url(bport), "--poll-interval-ms", "0", "--log-level", "warning"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            async with httpx.AsyncClient() as c:
                for _ in range(300):
                    assert proc.poll() is None, proc.communicate()[1]
                    with contextlib.suppress(httpx.TransportError):
                        if (await c.get(_url(rport) + "/readiness")).status_code == 200:
                            break
                    await asyncio.sleep(0.05)
            direct = await _first_token_delays(bport, backend, 60)
            n = len(backend.peers)
            routed = await _first_token_delays(rport, backend, 60)
            router_connections = len(set(backend.peers[n:]))
            # The other order too, so neither side has the warmer machine.
            direct += await _first_token_delays(bport, backend, 60)
            routed += await _first_token_delays(rport, backend, 60)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            server.close()
        assert router_connections == 1, f"60 requests in a row took {router_connections}"
        return direct, routed

    # The router kept one connection to the backend alive for all sixty.
    direct, routed = asyncio.run(main())

    def q(xs: list[float], p: float) -> float:
        return statistics.quantiles(xs, n=100)[p - 1] * 1e3

    note = (
        f"first event after the backend wrote it: direct p50 {q(direct, 50):.3f} ms, "
        f"p90 {q(direct, 90):.3f} ms; through the router p50 {q(routed, 50):.3f} ms, "
        f"p90 {q(routed, 90):.3f} ms; added p50 {q(routed, 50) - q(direct, 50):.3f} ms"
    )
    assert q(routed, 50) - q(direct, 50) < 1.0, note
    print(note)


# -- 3b. a stream cut after it began, and a backend that never answers ------------------


def test_a_stream_cut_after_it_began_ends_with_an_error_event_never_a_silent_end() -> None:
    cut = EmulatorConfig(
        protocol="vllm", port=free_port(), time_scale=10.0, faults=FaultSpec(cut_after_chunks=3)
    )
    with emulator_in_thread(cut) as e:
        cfg = _router_config([_url(e.ports[0])], policy="fcfs")
        with router_in_thread(cfg) as r, httpx.Client(timeout=10) as c:
            rurl = _url(r.port)
            _ready(rurl)
            got = [_outcome(c, rurl, 16) for _ in range(4)]
            body = {"prompt": "a b", "max_tokens": 16, "stream": True}
            with c.stream("POST", rurl + "/v1/completions", json=body) as s:
                lines = [x for x in s.iter_lines() if x.startswith("data: ")]
            text = _metrics(rurl)
    assert got == ["error"] * 4, got
    # Three chunks relayed, then the router's own error event; no [DONE].
    assert "data: [DONE]" not in lines, lines
    last = orjson.loads(lines[-1][6:])
    assert set(last) == {"error"} and last["error"]["message"], last
    assert sum(1 for x in lines if '"choices"' in x) == 3, lines
    # The cut is the backend's failure, counted against it (nothing was retried: the client
    # had the first chunks already).
    assert _metric(text, "llmsched_router_retries_total", 0, backend=_url(cut.port)) == 0


def test_a_backend_gone_silent_times_out_and_the_request_is_served_by_another() -> None:
    # Backend 0 answers two requests, then nothing at all (its /health neither).
    hung = EmulatorConfig(
        protocol="vllm", port=free_port(), time_scale=10.0, faults=FaultSpec(hang_after=2)
    )
    good = EmulatorConfig(protocol="vllm", port=free_port(), time_scale=10.0)
    with emulator_in_thread(hung) as h, emulator_in_thread(good) as g:
        hung_url, good_url = _url(h.ports[0]), _url(g.ports[0])
        # Probes far apart: only the requests find out that it went silent.
        cfg = _router_config(
            [hung_url, good_url], policy="fcfs", read_timeout_s=0.5, health={"interval_s": 60.0}
        )
        with router_in_thread(cfg) as r, httpx.Client(base_url=_url(r.port), timeout=10) as c:
            _ready(_url(r.port))
            took, got = [], []
            for _ in range(4):
                t0 = time.perf_counter()
                got.append(c.post("/v1/completions", json={"prompt": "a b", "max_tokens": 4}))
                took.append(time.perf_counter() - t0)
            text = _metrics(_url(r.port))
    assert [x.status_code for x in got] == [200] * 4, [x.text for x in got]
    assert _metric(text, "llmsched_router_requests_total", backend=hung_url, status="200") == 2
    assert _metric(text, "llmsched_router_requests_total", backend=good_url, status="200") == 2
    assert _metric(text, "llmsched_router_retries_total", backend=hung_url) == 2
    # The last two waited out read_timeout_s on the silent one, then were served at once.
    assert all(t < 0.4 for t in took[:2]) and all(0.5 <= t < 1.5 for t in took[2:]), took


@pytest.mark.parametrize("stream", [False, True])
def test_an_open_breaker_lets_a_trial_through_and_a_recovered_backend_is_served_again(
    stream: bool,
) -> None:
    port = free_port()
    failing = EmulatorConfig(
        protocol="vllm", port=port, time_scale=10.0,
        faults=FaultSpec(error_rate=1.0, error_status=503),
    )  # fmt: skip
    good = EmulatorConfig(protocol="vllm", port=free_port(), time_scale=10.0)
    url = _url(port)
    body = {"prompt": "a b", "max_tokens": 4, "stream": stream}
    with contextlib.ExitStack() as stack:
        g = stack.enter_context(emulator_in_thread(good))
        bad = emulator_in_thread(failing)
        bad.__enter__()
        # No probes within the test: only the breaker decides, from the requests' outcomes.
        cfg = _router_config(
            [url, _url(g.ports[0])], policy="fcfs", health={"interval_s": 60.0},
            breaker={"failure_threshold": 2, "open_s": 0.5},
        )  # fmt: skip
        try:
            r = stack.enter_context(router_in_thread(cfg))
            rurl = _url(r.port)
            _ready(rurl)
            c = stack.enter_context(httpx.Client(base_url=rurl, timeout=10))
            first = [c.post("/v1/completions", json=body).status_code for _ in range(3)]
            opened = _metric(
                _metrics(rurl), "llmsched_router_breaker_state", backend=url, state="open"
            )
        finally:
            bad.__exit__(None, None, None)
        # The same port now serves well; after open_s one trial request finds that out.
        stack.enter_context(emulator_in_thread(EmulatorConfig(protocol="vllm", port=port)))
        time.sleep(0.6)
        later = [c.post("/v1/completions", json=body).status_code for _ in range(4)]
        text = _metrics(rurl)
    assert first == [200] * 3 and later == [200] * 4, (first, later)
    assert opened == 1
    assert _metric(text, "llmsched_router_breaker_state", backend=url, state="closed") == 1, text
    # fcfs sends an idle cluster's request to backend 0: the recovered one serves all four.
    assert _metric(text, "llmsched_router_requests_total", backend=url, status="200") == 4
