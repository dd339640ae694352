"""Backend health: the probe and breaker state machine, its settings, and the async monitor on loopback."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Hashable, Iterator

import httpx
import pydantic
import pytest
import uvicorn

from scheduler.router.health import BackendHealth, BreakerSettings, HealthMonitor, HealthSettings
from tests.loopback import free_port

# Settings


def test_settings_defaults_are_the_documented_ones() -> None:
    h, b = HealthSettings(), BreakerSettings()
    assert (h.interval_s, h.timeout_s, h.failure_threshold, h.success_threshold, h.path) == (
        1.0,
        5.0,
        3,
        1,
        "/health",
    )
    assert (b.failure_threshold, b.open_s, b.half_open_requests) == (5, 2.0, 1)


@pytest.mark.parametrize(
    ("model", "fields", "where"),
    [
        (HealthSettings, {"interval_s": 0}, "interval_s"),
        (HealthSettings, {"timeout_s": -1}, "timeout_s"),
        (HealthSettings, {"failure_threshold": 0}, "failure_threshold"),
        (HealthSettings, {"success_threshold": 0}, "success_threshold"),
        (HealthSettings, {"path": "health"}, "path"),
        (HealthSettings, {"interval": 1.0}, "interval"),  # a typo in a config file
        (BreakerSettings, {"failure_threshold": 0}, "failure_threshold"),
        (BreakerSettings, {"open_s": 0}, "open_s"),
        (BreakerSettings, {"half_open_requests": 0}, "half_open_requests"),
        (BreakerSettings, {"open_ms": 2000}, "open_ms"),
    ],
)
def test_settings_reject_bad_values_naming_the_field(
    model: type[pydantic.BaseModel], fields: dict, where: str
) -> None:
    with pytest.raises(pydantic.ValidationError) as err:
        model.model_validate(fields)
    assert err.value.errors()[0]["loc"] == (where,)


def test_settings_fields_are_described_for_the_config_schema() -> None:
    for model in (HealthSettings, BreakerSettings):
        props = model.model_json_schema()["properties"]
        assert all(p.get("description") for p in props.values()), model.__name__


# BackendHealth: probes

H = HealthSettings(failure_threshold=2, success_threshold=3)
B = BreakerSettings(failure_threshold=3, open_s=2.0, half_open_requests=1)


def test_a_backend_is_unavailable_until_its_first_good_probe_which_is_enough() -> None:
    h = BackendHealth(H, B)
    assert not h.available(0.0) and not h.healthy
    h.probe(False, 0.0)
    assert not h.available(0.1)
    h.probe(True, 1.0)  # success_threshold is 3, but a first good probe marks it healthy
    assert h.healthy and h.available(1.0) and h.breaker == "closed"


def test_failure_threshold_consecutive_failed_probes_mark_it_unhealthy() -> None:
    h = BackendHealth(H, B)
    h.probe(True, 0.0)
    h.probe(False, 1.0)
    assert h.available(1.0)  # one failure is not enough
    h.probe(True, 2.0)
    h.probe(False, 3.0)
    assert h.available(3.0)  # the good probe reset the count
    h.probe(False, 4.0)
    assert not h.healthy and not h.available(4.0)
    assert h.consecutive_probe_failures == 2


def test_recovery_needs_success_threshold_consecutive_good_probes() -> None:
    h = BackendHealth(H, B)
    h.probe(True, 0.0)
    h.probe(False, 1.0)
    h.probe(False, 2.0)
    h.probe(True, 3.0)
    h.probe(True, 4.0)
    h.probe(False, 5.0)  # interrupts the run
    for t in (6.0, 7.0):
        h.probe(True, t)
        assert not h.available(t)
    h.probe(True, 8.0)
    assert h.healthy and h.available(8.0)


# BackendHealth: the breaker


def _healthy() -> BackendHealth:
    h = BackendHealth(H, B)
    h.probe(True, 0.0)
    return h


def test_consecutive_request_failures_open_the_breaker_until_open_s() -> None:
    h = _healthy()
    h.request_done(False, 1.0)
    h.request_done(False, 1.1)
    h.request_done(True, 1.2)  # resets the count
    h.request_done(False, 1.3)
    h.request_done(False, 1.4)
    assert h.available(1.4) and h.breaker == "closed" and h.next_change_s(1.4) is None
    h.request_done(False, 1.5)
    assert h.breaker == "open" and not h.available(1.5)
    assert h.next_change_s(1.5) == pytest.approx(3.5)
    assert not h.available(3.49) and h.breaker == "open"
    assert h.available(3.5) and h.breaker == "half_open"
    assert h.next_change_s(3.5) is None
    assert h.healthy  # the probes never said otherwise


def _open_at(t: float, h: BackendHealth | None = None) -> BackendHealth:
    h = h or _healthy()
    for _ in range(B.failure_threshold):
        h.request_done(False, t)
    assert h.breaker == "open"
    return h


def test_half_open_lets_one_trial_through_and_its_success_closes() -> None:
    h = _open_at(1.0)
    assert h.available(3.0)
    h.request_started(3.0)
    assert not h.available(3.1)  # the one trial slot is taken
    h.request_done(True, 3.2)
    assert h.breaker == "closed" and h.available(3.2)
    assert h.consecutive_request_failures == 0
    # Closed again: the full threshold is needed to re-open.
    h.request_done(False, 3.3)
    assert h.available(3.3)


def test_half_open_trial_failure_reopens_for_another_open_s() -> None:
    h = _open_at(1.0)
    h.request_started(3.0)
    h.request_done(False, 3.5)
    assert h.breaker == "open" and not h.available(3.5)
    assert h.next_change_s(3.5) == pytest.approx(5.5)
    assert h.available(5.5) and h.breaker == "half_open"


def test_half_open_requests_sets_the_number_of_trials_at_once() -> None:
    h = BackendHealth(H, BreakerSettings(failure_threshold=1, open_s=1.0, half_open_requests=2))
    h.probe(True, 0.0)
    h.request_done(False, 0.0)
    h.request_started(1.0)
    assert h.available(1.0)
    h.request_started(1.0)
    assert not h.available(1.0)


def test_outcomes_reported_while_open_are_ignored() -> None:
    h = _open_at(1.0)
    h.request_done(True, 1.5)  # a request sent before the breaker opened
    assert h.breaker == "open" and h.next_change_s(1.5) == pytest.approx(3.0)
    h.request_started(1.6)  # not a trial: the breaker is open
    assert h.available(3.0)


def test_probes_marking_a_backend_healthy_again_close_its_breaker() -> None:
    h = BackendHealth(HealthSettings(failure_threshold=1, success_threshold=1), B)
    h.probe(True, 0.0)
    _open_at(1.0, h)
    h.probe(False, 1.1)
    assert not h.healthy
    h.probe(True, 1.2)  # the outage is over: no waiting out open_s
    assert h.breaker == "closed" and h.available(1.2)


def test_a_good_probe_does_not_close_a_breaker_the_probes_never_saw() -> None:
    # /health answers but requests fail: the breaker alone keeps the backend out.
    h = _open_at(1.0)
    h.probe(True, 1.5)
    assert h.breaker == "open" and not h.available(1.5)


# HealthMonitor over a mock transport


def _mock(status: Callable[[httpx.Request], int]) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(status(r))))


async def _until(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():
            await asyncio.sleep(0.005)


async def test_monitor_calls_on_change_exactly_when_availability_flips() -> None:
    changes: list[tuple[Hashable, bool]] = []
    async with _mock(lambda r: 200) as client:
        mon = HealthMonitor(
            HealthSettings(interval_s=10.0),
            BreakerSettings(failure_threshold=2, open_s=0.1),
            lambda k, a: changes.append((k, a)),
            client=client,
        )
        mon.add("a", "http://a:8000")
        mon.add("b", "http://b:8000")
        await mon.start()
        try:
            assert sorted(changes) == [("a", True), ("b", True)]  # serving after one round
            changes.clear()
            mon.report("a", False, "HTTP 502")
            assert changes == []
            mon.report("a", False, "HTTP 502")
            assert changes == [("a", False)] and not mon.available("a") and mon.available("b")
            opened = time.monotonic()
            await _until(lambda: len(changes) == 2)  # the half-open timer
            assert changes[-1] == ("a", True)
            assert time.monotonic() - opened >= 0.09
            mon.started("a")  # the trial takes the slot
            assert changes[-1] == ("a", False)
            mon.report("a", True)
            assert changes[-1] == ("a", True) and len(changes) == 4
            mon.started("a")  # closed: no change
            mon.report("a", True)
            mon.report("gone", False)  # a removed or unknown backend: ignored
            assert len(changes) == 4
            st = mon.state("a")
            assert st["breaker"] == "closed" and st["healthy"] is True and st["available"] is True
            assert st["last_error"] == "HTTP 502" and st["url"] == "http://a:8000"
        finally:
            await mon.stop()
        assert not client.is_closed


async def test_monitor_state_is_json_safe_and_says_why_a_backend_is_out() -> None:
    import json

    async with _mock(lambda r: 503 if r.url.host == "bad" else 200) as client:
        mon = HealthMonitor(HealthSettings(), BreakerSettings(), lambda k, a: None, client=client)
        mon.add("bad", "http://bad:30000/", headers={"authorization": "Bearer k"})
        await mon.start()
        try:
            st = json.loads(json.dumps(mon.state("bad")))
        finally:
            await mon.stop()
    assert st["available"] is False and st["healthy"] is False
    assert st["last_error"] == "http://bad:30000/health: HTTP 503"
    assert st["consecutive_probe_failures"] == 1 and st["last_probe_s"] is not None
    with pytest.raises(KeyError):
        mon.state("nobody")
    assert mon.available("nobody") is False


async def test_monitor_first_round_returns_without_waiting_for_a_hung_backend() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "hung":
            await asyncio.sleep(30)
        return httpx.Response(200)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        mon = HealthMonitor(
            HealthSettings(interval_s=0.05, timeout_s=0.2),
            BreakerSettings(),
            lambda k, a: None,
            client=client,
        )
        mon.add("ok", "http://ok")
        mon.add("hung", "http://hung")
        began = time.monotonic()
        await mon.start()
        try:
            took = time.monotonic() - began
            assert mon.available("ok") and not mon.available("hung")
            assert took < 1.0  # bounded by the probe timeout, not the hang
            await _until(lambda: mon.state("hung")["last_error"] is not None)
            assert "no answer within 0.2 s" in str(mon.state("hung")["last_error"])
        finally:
            await mon.stop()


async def test_monitor_probes_a_backend_added_while_running_and_forgets_a_removed_one() -> None:
    changes: list[tuple[Hashable, bool]] = []
    async with _mock(lambda r: 200) as client:
        mon = HealthMonitor(
            HealthSettings(interval_s=0.02),
            BreakerSettings(),
            lambda k, a: changes.append((k, a)),
            client=client,
        )
        await mon.start()
        try:
            mon.add("late", "http://late")
            await _until(lambda: ("late", True) in changes)
            with pytest.raises(ValueError, match="already watched"):
                mon.add("late", "http://late")
            mon.remove("late")
            assert not mon.available("late")
            await asyncio.sleep(0.05)
            assert changes == [("late", True)]
        finally:
            await mon.stop()


async def test_probe_now_answers_for_a_backend_added_at_run_time() -> None:
    async with _mock(lambda r: 200 if r.url.host == "up" else 503) as client:
        mon = HealthMonitor(
            HealthSettings(interval_s=10.0), BreakerSettings(), lambda k, a: None, client=client
        )
        await mon.start()
        try:
            mon.add("up", "http://up")
            mon.add("down", "http://down")
            assert await mon.probe_now("up") is True
            assert await mon.probe_now("down") is False
            assert await mon.probe_now("up") is True  # probed again, loop already ran once
            with pytest.raises(KeyError):
                await mon.probe_now("nobody")
        finally:
            await mon.stop()


# Loopback: a real server that stops answering and comes back


class _Server:
    """A /health server on 127.0.0.1 in a thread: ``ok``, ``hang`` (accepts, never answers) or ``503``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.mode = "ok"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    async def app(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        deadline = time.monotonic() + 10.0
        while self.mode == "hang" and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        status = 503 if self.mode == "503" else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def start(self) -> None:
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="off",
            loop="asyncio",
            http="h11",
            interface="asgi3",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10.0
        while not self._server.started:
            assert self._thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10.0)
            assert not self._thread.is_alive(), "server did not stop"
        self._server = self._thread = None


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server(free_port())
    s.start()
    try:
        yield s
    finally:
        s.mode = "ok"
        s.stop()


LOOP = HealthSettings(interval_s=0.1, timeout_s=0.3, failure_threshold=2)


async def _flip(changes: list[tuple[float, bool]], to: bool, timeout_s: float) -> float:
    """Wait for the next on_change to ``to``; the seconds it took."""
    began = time.monotonic()
    async with asyncio.timeout(timeout_s):
        while not (changes and changes[-1][1] is to):
            await asyncio.sleep(0.005)
    return changes[-1][0] - began


async def test_loopback_a_stopped_server_is_marked_out_and_back_within_an_interval(
    server: _Server,
) -> None:
    changes: list[tuple[float, bool]] = []
    mon = HealthMonitor(LOOP, BreakerSettings(), lambda k, a: changes.append((time.monotonic(), a)))
    mon.add("s", f"http://127.0.0.1:{server.port}")
    await mon.start()
    try:
        assert mon.available("s") and [a for _, a in changes] == [True]
        await asyncio.to_thread(server.stop)  # connections refused from here on
        out_s = await _flip(changes, False, timeout_s=5.0)
        assert out_s < 2 * LOOP.interval_s + 0.5  # two failed probes
        assert "ConnectError" in str(mon.state("s")["last_error"])
        await asyncio.sleep(0.3)  # stays out while down
        assert not mon.available("s") and [a for _, a in changes] == [True, False]
        await asyncio.to_thread(server.start)
        back_s = await _flip(changes, True, timeout_s=5.0)
        assert back_s < LOOP.interval_s + LOOP.timeout_s + 0.3
        assert mon.available("s") and mon.state("s")["breaker"] == "closed"
    finally:
        await mon.stop()


async def test_loopback_a_hung_server_times_out_and_recovers(server: _Server) -> None:
    changes: list[tuple[float, bool]] = []
    mon = HealthMonitor(LOOP, BreakerSettings(), lambda k, a: changes.append((time.monotonic(), a)))
    mon.add("s", f"http://127.0.0.1:{server.port}")
    await mon.start()
    try:
        assert mon.available("s")
        server.mode = "hang"
        out_s = await _flip(changes, False, timeout_s=5.0)
        assert out_s < 2 * (LOOP.interval_s + LOOP.timeout_s) + 0.5
        assert "no answer within 0.3 s" in str(mon.state("s")["last_error"])
        server.mode = "503"
        await asyncio.sleep(0.4)
        assert not mon.available("s")
        assert "HTTP 503" in str(mon.state("s")["last_error"])
        server.mode = "ok"
        back_s = await _flip(changes, True, timeout_s=5.0)
        assert back_s < LOOP.interval_s + LOOP.timeout_s + 0.3
    finally:
        await mon.stop()


async def test_loopback_failed_requests_open_the_breaker_and_a_trial_closes_it(
    server: _Server,
) -> None:
    # /health keeps answering; the proxied requests fail: only the breaker sees it.
    changes: list[tuple[float, bool]] = []
    mon = HealthMonitor(
        LOOP,
        BreakerSettings(failure_threshold=3, open_s=0.2),
        lambda k, a: changes.append((time.monotonic(), a)),
    )
    mon.add("s", f"http://127.0.0.1:{server.port}")
    await mon.start()
    try:
        for _ in range(3):
            mon.started("s")
            mon.report("s", False, "HTTP 500")
        assert not mon.available("s") and mon.state("s")["breaker"] == "open"
        half_open_s = await _flip(changes, True, timeout_s=5.0)
        assert 0.15 < half_open_s < 0.6
        mon.started("s")
        mon.report("s", True)
        assert mon.state("s")["breaker"] == "closed"
        assert [a for _, a in changes] == [True, False, True, False, True]
    finally:
        await mon.stop()
