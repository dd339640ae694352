"""Backend health: active probes plus a circuit breaker on proxied requests.

Two signals decide whether the router may send a backend a request:

* **Probes** (``GET base_url + path`` every ``interval_s``, ``timeout_s``
  each; 2xx is good). ``failure_threshold`` consecutive failures mark a
  healthy backend unhealthy; ``success_threshold`` consecutive good probes
  mark it healthy again. A backend starts unhealthy, and its first good
  probe ever marks it healthy whatever ``success_threshold`` says, so a
  router started in front of live servers serves after one probe round;
  the threshold guards recovery, not start-up.
* **The breaker**, fed the outcome of proxied requests (a connect error, a
  5xx or a cut stream is a failure; report a 4xx, the client's fault, as
  a success). ``failure_threshold`` consecutive failures open it; after
  ``open_s`` it is half-open and lets ``half_open_requests`` trial requests
  through; the first trial outcome decides: a success closes it, a failure
  opens it for another ``open_s``. Outcomes reported while it is open are
  of requests sent before it opened, and are ignored. When probes mark an
  unhealthy backend healthy the breaker is closed afresh: the failures it
  counted were the outage the probes have seen end, and waiting out
  ``open_s`` on top would slow recovery.

A backend is *available* when healthy and its breaker closed, or half-open
with a trial slot free. With the defaults a backend that comes back is
available again within about ``interval_s + timeout_s`` (the next probe).

:class:`BackendHealth` is the state machine alone, with time passed in;
:class:`HealthMonitor` runs the probes, the breaker's timer and the
``on_change`` callback on an asyncio loop.

NOTE: SGLang's ``/health`` generates a token by default
(``SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION``) and answers only after
polling its detokenizer for about a second, so against real SGLang either
start it with that variable set to ``0`` or give probes a ``timeout_s``
above a second. vLLM's ``/health`` and the emulator's answer at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["BackendHealth", "BreakerSettings", "BreakerState", "HealthMonitor", "HealthSettings"]

logger = logging.getLogger("llmsched.router")

BreakerState = Literal["closed", "open", "half_open"]


class HealthSettings(BaseModel):
    """Active health probes of every backend."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    interval_s: float = Field(1.0, gt=0)
    """Seconds from the start of one probe of a backend to the start of the next."""
    timeout_s: float = Field(5.0, gt=0)
    """Seconds a probe may take, all of it; a slower answer is a failed probe.

    As long as sglang-router's: a server whose CPU is starved for a moment
    (its tokenizer, a loaded host) answers late, not never, and with 1 s and
    two failures every backend of a loaded host was marked down at once.
    A dead server refuses the connection at once, whatever this is.
    """
    failure_threshold: int = Field(3, ge=1)
    """Consecutive failed probes that mark a healthy backend unhealthy (sglang-router's 3)."""
    success_threshold: int = Field(1, ge=1)
    """Consecutive good probes that mark an unhealthy backend healthy again (the first good probe ever always does)."""
    path: str = "/health"
    """Probed path on each backend's base URL; any 2xx answer is good."""

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"must start with '/', got {v!r}")
        return v


class BreakerSettings(BaseModel):
    """The circuit breaker on proxied requests to each backend."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    failure_threshold: int = Field(5, ge=1)
    """Consecutive failed requests (connect error, 5xx, cut stream) that open the breaker."""
    open_s: float = Field(2.0, gt=0)
    """Seconds the breaker stays open before letting trial requests through (half-open)."""
    half_open_requests: int = Field(1, ge=1)
    """Trial requests let through at once while half-open; one success closes, a failure re-opens."""


class BackendHealth:
    """One backend's probe state and breaker: a pure state machine, time passed in as ``now_s``.

    Every method first moves an open breaker to half-open if ``open_s`` has
    passed, so :attr:`breaker` is the state as of the last call.
    """

    def __init__(
        self, settings: HealthSettings | None = None, breaker: BreakerSettings | None = None
    ) -> None:
        self.settings = settings or HealthSettings()
        self.breaker_settings = breaker or BreakerSettings()
        self._healthy = False
        self._ever_healthy = False
        self._probe_failures = 0
        self._probe_successes = 0
        self._breaker: BreakerState = "closed"
        self._request_failures = 0
        self._opened_at_s = 0.0
        self._trials = 0  # half-open trial requests in flight

    @property
    def healthy(self) -> bool:
        """The probes' verdict."""
        return self._healthy

    @property
    def breaker(self) -> BreakerState:
        """``closed``, ``open`` or ``half_open``, as of the last call."""
        return self._breaker

    @property
    def consecutive_probe_failures(self) -> int:
        """Failed probes since the last good one."""
        return self._probe_failures

    @property
    def consecutive_request_failures(self) -> int:
        """Failed requests since the last success (the breaker's count)."""
        return self._request_failures

    def probe(self, ok: bool, now_s: float) -> None:
        """Record one probe's outcome."""
        self._advance(now_s)
        if ok:
            self._probe_failures = 0
            self._probe_successes += 1
            threshold = self.settings.success_threshold if self._ever_healthy else 1
            if not self._healthy and self._probe_successes >= threshold:
                self._healthy = self._ever_healthy = True
                self._close()
        else:
            self._probe_successes = 0
            self._probe_failures += 1
            if self._healthy and self._probe_failures >= self.settings.failure_threshold:
                self._healthy = False

    def request_started(self, now_s: float) -> None:
        """A request is being sent; while half-open it takes a trial slot."""
        self._advance(now_s)
        if self._breaker == "half_open":
            self._trials += 1

    def request_done(self, ok: bool, now_s: float) -> None:
        """Record a proxied request's outcome (``ok=False``: connect error, 5xx or cut stream)."""
        self._advance(now_s)
        if self._breaker == "closed":
            if ok:
                self._request_failures = 0
            else:
                self._request_failures += 1
                if self._request_failures >= self.breaker_settings.failure_threshold:
                    self._open(now_s)
        elif self._breaker == "half_open":
            self._trials = max(0, self._trials - 1)
            if ok:
                self._close()
            else:
                self._request_failures += 1
                self._open(now_s)
        # open: a request sent before the breaker opened; its outcome is stale

    def available(self, now_s: float) -> bool:
        """Whether a request may be sent now: healthy, and the breaker closed or a trial slot free."""
        self._advance(now_s)
        if not self._healthy or self._breaker == "open":
            return False
        return self._breaker == "closed" or self._trials < self.breaker_settings.half_open_requests

    def next_change_s(self, now_s: float) -> float | None:
        """When an open breaker goes half-open (a time to set a timer for), else ``None``."""
        self._advance(now_s)
        if self._breaker == "open":
            return self._opened_at_s + self.breaker_settings.open_s
        return None

    def _advance(self, now_s: float) -> None:
        if self._breaker == "open" and now_s >= self._opened_at_s + self.breaker_settings.open_s:
            self._breaker = "half_open"
            self._trials = 0

    def _open(self, now_s: float) -> None:
        self._breaker = "open"
        self._opened_at_s = now_s
        self._trials = 0

    def _close(self) -> None:
        self._breaker = "closed"
        self._request_failures = 0
        self._trials = 0


@dataclass
class _Backend:
    base_url: str
    headers: dict[str, str]
    health: BackendHealth
    available: bool = False  # as last told to on_change
    last_error: str | None = None
    last_error_s: float | None = None
    last_probe_s: float | None = None
    probed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None
    timer_at_s: float | None = None  # the breaker change the timer is set for


class HealthMonitor:
    """Probes backends on an asyncio loop and keeps each one's :class:`BackendHealth`.

    ``on_change(key, available)`` is called exactly when a backend's
    availability flips: probes marking it (un)healthy, the breaker opening,
    going half-open (on a loop timer, :meth:`BackendHealth.next_change_s`),
    a half-open trial slot being taken or given back, the breaker closing.
    A backend starts unavailable, so the first good probe calls it with
    ``True``. It is called on the loop's thread and must not block; an
    exception it raises is logged, not propagated.

    Each backend is probed by its own task, so a hanging one never delays
    the others. The client is made by :meth:`start` unless one is given,
    and closed by :meth:`stop` only if made here.
    """

    def __init__(
        self,
        settings: HealthSettings,
        breaker: BreakerSettings,
        on_change: Callable[[Hashable, bool], None],
        *,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.breaker_settings = breaker
        self.on_change = on_change
        self.clock = clock
        self._client = client
        self._owns_client = client is None
        self._backends: dict[Hashable, _Backend] = {}
        self._running = False

    def add(self, key: Hashable, base_url: str, headers: Mapping[str, str] | None = None) -> None:
        """Watch a backend (unavailable until its first good probe; probed at once if running).

        Raises:
            ValueError: the key is already watched.
        """
        if key in self._backends:
            raise ValueError(f"backend {key!r} is already watched")
        b = _Backend(
            base_url.rstrip("/"),
            dict(headers or {}),
            BackendHealth(self.settings, self.breaker_settings),
        )
        self._backends[key] = b
        if self._running:
            self._spawn(key, b)

    def remove(self, key: Hashable) -> None:
        """Stop watching a backend; no more callbacks for it. Unknown keys are ignored."""
        b = self._backends.pop(key, None)
        if b is not None:
            if b.task is not None:
                b.task.cancel()
            if b.timer is not None:
                b.timer.cancel()

    def report(self, key: Hashable, ok: bool, error: str | None = None) -> None:
        """A proxied request's outcome, for the breaker (``ok=False``: connect error, 5xx, cut stream).

        ``error`` says what went wrong, for :meth:`state`. Unknown keys (a
        backend removed while the request ran) are ignored.
        """
        b = self._backends.get(key)
        if b is None:
            return
        now = self.clock()
        b.health.request_done(ok, now)
        if not ok:
            b.last_error, b.last_error_s = error or "request failed", now
        self._sync(key, b)

    def started(self, key: Hashable) -> None:
        """A request is being sent to the backend (takes a half-open trial slot); report it when done."""
        b = self._backends.get(key)
        if b is not None:
            b.health.request_started(self.clock())
            self._sync(key, b)

    def available(self, key: Hashable) -> bool:
        """Whether the backend may be sent a request now (``False`` for an unknown key)."""
        b = self._backends.get(key)
        if b is None:
            return False
        self._sync(key, b)
        return b.available

    def state(self, key: Hashable) -> dict[str, object]:
        """The backend's health as JSON-safe values, for the admin API and metrics.

        ``last_probe_s`` and ``last_error_s`` are on the monitor's clock;
        the ``*_age_s`` fields are seconds before now.

        Raises:
            KeyError: an unknown key.
        """
        b = self._backends[key]
        now = self.clock()
        self._sync(key, b)
        h = b.health
        return {
            "url": b.base_url,
            "available": b.available,
            "healthy": h.healthy,
            "breaker": h.breaker,
            "consecutive_probe_failures": h.consecutive_probe_failures,
            "consecutive_request_failures": h.consecutive_request_failures,
            "last_error": b.last_error,
            "last_error_s": b.last_error_s,
            "last_probe_s": b.last_probe_s,
            "last_probe_age_s": None if b.last_probe_s is None else now - b.last_probe_s,
            "breaker_half_open_s": h.next_change_s(now),
        }

    async def probe_now(self, key: Hashable) -> bool:
        """Probe a backend now, or wait for its first probe if one is under way; whether it is available.

        For a backend added at run time, so the caller knows at once.

        Raises:
            KeyError: an unknown key.
            RuntimeError: neither started nor given a client.
        """
        b = self._backends[key]
        if self._running and b.task is not None and not b.probed.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.timeout_s + 1.0):
                    await b.probed.wait()
        else:
            if self._client is None:
                raise RuntimeError("the health monitor has no client: start it first")
            await self._probe(key, b)
        return self.available(key)

    async def start(self, first_round_timeout_s: float | None = None) -> None:
        """Probe every backend once, return when that round is done, and keep probing.

        Waits at most ``first_round_timeout_s`` (default: the probe
        timeout plus one second); backends whose first probe has not
        finished by then stay unavailable until it does.
        """
        if self._running:
            return
        if self._client is None:
            self._client = httpx.AsyncClient()
        self._running = True
        for key, b in self._backends.items():
            self._spawn(key, b)
        waits = [asyncio.ensure_future(b.probed.wait()) for b in self._backends.values()]
        if not waits:
            return
        limit = (
            self.settings.timeout_s + 1.0
            if first_round_timeout_s is None
            else first_round_timeout_s
        )
        _, pending = await asyncio.wait(waits, timeout=limit)
        for w in pending:
            w.cancel()

    async def stop(self) -> None:
        """Cancel the probes and timers and wait for them; close the client if made here."""
        self._running = False
        tasks = [b.task for b in self._backends.values() if b.task is not None]
        for b in self._backends.values():
            b.task = None
            if b.timer is not None:
                b.timer.cancel()
                b.timer = b.timer_at_s = None
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    def _spawn(self, key: Hashable, b: _Backend) -> None:
        b.task = asyncio.get_running_loop().create_task(
            self._probe_loop(key, b), name=f"health {key!r}"
        )

    async def _probe_loop(self, key: Hashable, b: _Backend) -> None:
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            await self._probe(key, b)
            b.probed.set()
            await asyncio.sleep(max(0.0, self.settings.interval_s - (loop.time() - began)))

    async def _probe(self, key: Hashable, b: _Backend) -> None:
        assert self._client is not None
        url, timeout_s = b.base_url + self.settings.path, self.settings.timeout_s
        error: str | None = None
        try:
            async with asyncio.timeout(timeout_s):
                r = await self._client.get(url, headers=b.headers, timeout=timeout_s)
            if not r.is_success:
                error = f"{url}: HTTP {r.status_code}"
        except TimeoutError:
            error = f"{url}: no answer within {timeout_s:g} s"
        except httpx.HTTPError as exc:
            error = f"{url}: {type(exc).__name__}: {exc or 'no detail'}"
        if self._backends.get(key) is not b:
            return  # removed while probing
        now = self.clock()
        was_healthy = b.health.healthy
        b.health.probe(error is None, now)
        b.last_probe_s = now
        if error is not None:
            b.last_error, b.last_error_s = error, now
        if was_healthy and not b.health.healthy:
            logger.warning("backend %r unhealthy: %s", key, error)
        elif b.health.healthy and not was_healthy:
            logger.info("backend %r healthy", key)
        self._sync(key, b)

    def _sync(self, key: Hashable, b: _Backend) -> None:
        """Tell on_change if availability flipped, and time the next breaker change."""
        now = self.clock()
        available = b.health.available(now)
        change_s = b.health.next_change_s(now)
        if b.timer is not None and b.timer_at_s != change_s:
            b.timer.cancel()
            b.timer = b.timer_at_s = None
        if change_s is not None and b.timer is None and self._running:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None  # no loop, or stopped: the change is seen on the next call instead
            if loop is not None:
                b.timer = loop.call_later(max(0.0, change_s - now), self._on_timer, key, b)
                b.timer_at_s = change_s
        if available != b.available:
            b.available = available
            try:
                self.on_change(key, available)
            except Exception:
                logger.exception("on_change failed for backend %r", key)

    def _on_timer(self, key: Hashable, b: _Backend) -> None:
        b.timer = b.timer_at_s = None
        if self._backends.get(key) is b:
            self._sync(key, b)
