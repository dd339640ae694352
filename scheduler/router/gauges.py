"""Backend load gauges as a router polls them: SGLang's ``/v1/loads``, vLLM's ``/metrics``.

What a policy may know of a backend beyond its own tracking is what the
server says about itself, late by the poll interval (DESIGN.md, contract 3).
This module reads that into one :class:`Gauges` record per backend:

* **SGLang** ``GET /v1/loads`` (``entrypoints/v1_loads.py``): ``{"timestamp",
  "version", "accelerator", "num_accelerators", "loads": [...]}`` with one
  entry per data-parallel rank (``dp_rank``, ``num_running_reqs``,
  ``num_waiting_reqs``, ``num_used_tokens``, ``num_total_tokens``,
  ``max_total_num_tokens``, ...). Ranks are summed. ``num_total_tokens`` is
  the used tokens plus the prompt tokens waiting for prefill, so
  ``waiting_tokens`` is the difference; a server too old to send it leaves
  ``waiting_tokens`` unknown. A server without ``/v1/loads`` (404) is read
  at the older ``GET /get_load``: a list of ``{"dp_rank", "num_reqs"
  (running plus waiting), "num_waiting_reqs", "num_tokens"}``, which says
  nothing separable about tokens unless it also sends
  ``num_pending_tokens``.
* **vLLM** ``GET /metrics`` (``vllm/v1/metrics/loggers.py``): the gauges
  ``vllm:num_requests_waiting``, ``vllm:num_requests_running`` and
  ``vllm:kv_cache_usage_perc`` (a fraction, 1 is full; releases before it
  call it ``vllm:gpu_cache_usage_perc``), each labelled ``engine`` per
  data-parallel engine and summed over label sets. Tokens come from usage
  times capacity, capacity from the labels of the info gauge
  ``vllm:cache_config_info`` (``num_gpu_blocks`` times ``block_size``); a
  server that does not export it (the emulator does not) leaves the KV
  fields unknown. vLLM says nothing of waiting tokens.
* **openai**: any other OpenAI-compatible server; nothing to poll.

:func:`poll_gauges` fetches and parses one backend; :class:`GaugePoller`
keeps polling a changing set of them. Every failure is a
:class:`GaugeError` naming the URL and what was wrong.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "GAUGE_PATHS",
    "GaugeError",
    "GaugePoller",
    "Gauges",
    "parse_sglang_loads",
    "parse_vllm_metrics",
    "poll_gauges",
]

logger = logging.getLogger("llmsched.router")

#: Where each protocol's load gauges are read (``None``: the server has none).
GAUGE_PATHS: dict[str, str | None] = {"sglang": "/v1/loads", "vllm": "/metrics", "openai": None}
#: Where an SGLang server without ``/v1/loads`` reports its load.
SGLANG_LEGACY_PATH = "/get_load"

_VLLM_RUNNING = "vllm:num_requests_running"
_VLLM_WAITING = "vllm:num_requests_waiting"
_VLLM_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
_VLLM_CACHE_INFO = "vllm:cache_config_info"


class GaugeError(ValueError):
    """A backend's gauges could not be read: unreachable, an HTTP error, or a body of the wrong shape."""


@dataclass(frozen=True, slots=True)
class Gauges:
    """One backend's load as it last said, summed over its data-parallel ranks or engines.

    ``None`` means the server does not say (an older release, or a protocol
    that lacks the figure), never zero.
    """

    #: Requests queued, not yet scheduled.
    n_waiting: int
    #: Requests in the running batch.
    n_running: int
    #: Prompt tokens of the waiting requests.
    waiting_tokens: int | None
    #: KV-cache tokens in use.
    kv_used_tokens: int | None
    #: KV-cache tokens the server can hold.
    kv_capacity_tokens: int | None


# SGLang


def parse_sglang_loads(data: object, *, source: str = "/v1/loads") -> Gauges:
    """Gauges from the JSON of SGLang's ``GET /v1/loads`` (or the older ``GET /get_load``).

    ``source`` names the URL or path in error messages.

    Raises:
        GaugeError: not the shape of either endpoint, a missing or non-integer
            count, or no ranks at all.
    """
    if isinstance(data, dict):
        ranks = data.get("loads")
        if not isinstance(ranks, list):
            raise GaugeError(f"{source}: expected a 'loads' list, got keys {sorted(data)[:8]}")
        where = "loads"
    elif isinstance(data, list):
        ranks, where = data, "rank"  # /get_load: the ranks themselves
    else:
        raise GaugeError(f"{source}: expected a JSON object with 'loads', got {_kind(data)}")
    if not ranks:
        raise GaugeError(f"{source}: no data-parallel ranks in the answer")
    parsed = [_sglang_rank(r, f"{source}: {where}[{i}]") for i, r in enumerate(ranks)]
    return Gauges(
        n_waiting=sum(p.n_waiting for p in parsed),
        n_running=sum(p.n_running for p in parsed),
        waiting_tokens=_sum_known(p.waiting_tokens for p in parsed),
        kv_used_tokens=_sum_known(p.kv_used_tokens for p in parsed),
        kv_capacity_tokens=_sum_known(p.kv_capacity_tokens for p in parsed),
    )


def _sglang_rank(rank: object, where: str) -> Gauges:
    if not isinstance(rank, dict):
        raise GaugeError(f"{where}: expected an object, got {_kind(rank)}")
    if "num_running_reqs" not in rank and "num_reqs" in rank:
        return _sglang_legacy_rank(rank, where)
    used = _count(rank, "num_used_tokens", where, required=False)
    total = _count(rank, "num_total_tokens", where, required=False)
    return Gauges(
        n_waiting=_count(rank, "num_waiting_reqs", where),
        n_running=_count(rank, "num_running_reqs", where),
        waiting_tokens=None if used is None or total is None else max(0, total - used),
        kv_used_tokens=used,
        kv_capacity_tokens=_count(rank, "max_total_num_tokens", where, required=False),
    )


def _sglang_legacy_rank(rank: dict, where: str) -> Gauges:
    waiting = _count(rank, "num_waiting_reqs", where)
    requests = _count(rank, "num_reqs", where)
    # num_tokens alone mixes used and pending tokens; releases that split them add
    # num_pending_tokens beside it.
    pending = _count(rank, "num_pending_tokens", where, required=False)
    used = _count(rank, "num_tokens", where, required=False) if pending is not None else None
    return Gauges(
        n_waiting=waiting,
        n_running=max(0, requests - waiting),
        waiting_tokens=pending,
        kv_used_tokens=used,
        kv_capacity_tokens=None,
    )


# vLLM


def parse_vllm_metrics(text: str, *, source: str = "/metrics") -> Gauges:
    """Gauges from the Prometheus text of vLLM's ``GET /metrics``.

    ``source`` names the URL or path in error messages.

    Raises:
        GaugeError: text that is not Prometheus exposition, a missing request
            gauge, or a value that is negative or not a number.
    """
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    wanted = {_VLLM_RUNNING, _VLLM_WAITING, _VLLM_CACHE_INFO, *_VLLM_USAGE}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name in wanted:
                    samples.setdefault(s.name, []).append((s.labels, s.value))
    except (ValueError, TypeError, IndexError) as exc:
        raise GaugeError(f"{source}: not Prometheus text exposition ({exc})") from exc

    def total(name: str) -> int:
        if name not in samples:
            raise GaugeError(f"{source}: no {name} gauge (is this a vLLM server?)")
        return round(sum(_value(v, name, source) for _, v in samples[name]))

    n_running, n_waiting = total(_VLLM_RUNNING), total(_VLLM_WAITING)
    usage_name = next((n for n in _VLLM_USAGE if n in samples), None)
    usage = {
        labels.get("engine", ""): _value(v, usage_name, source)
        for labels, v in samples.get(usage_name or "", [])
    }
    capacity = _vllm_capacity(samples.get(_VLLM_CACHE_INFO, []))
    kv_used: int | None = None
    kv_capacity: int | None = None
    if capacity:
        shared = set(capacity.values())
        default = shared.pop() if len(shared) == 1 else None  # one CacheConfig for all engines
        engines = usage.keys() or capacity.keys()
        caps = [capacity.get(e, default) for e in engines]
        if all(c is not None for c in caps):
            kv_capacity = sum(c for c in caps if c is not None)
            if usage:
                kv_used = round(sum(usage[e] * (capacity.get(e, default) or 0) for e in usage))
    return Gauges(
        n_waiting=n_waiting,
        n_running=n_running,
        waiting_tokens=None,
        kv_used_tokens=kv_used,
        kv_capacity_tokens=kv_capacity,
    )


def _vllm_capacity(info: list[tuple[dict[str, str], float]]) -> dict[str, int]:
    """Per engine, KV tokens from ``vllm:cache_config_info`` labels (engines without numbers left out)."""
    out: dict[str, int] = {}
    for labels, _ in info:
        try:
            blocks, block = int(labels["num_gpu_blocks"]), int(labels["block_size"])
        except (KeyError, ValueError):
            continue  # "None" before the engine has profiled its memory
        out[labels.get("engine", "")] = blocks * block
    return out


# Polling


async def poll_gauges(
    client: httpx.AsyncClient,
    base_url: str,
    protocol: str,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 1.0,
) -> Gauges | None:
    """Fetch and parse one backend's gauges; ``None`` for a protocol with none (``openai``).

    An SGLang server that answers 404 at ``/v1/loads`` (a release before it)
    is asked at ``/get_load``. ``timeout_s`` bounds each request as a whole.

    Raises:
        ValueError: an unknown protocol.
        GaugeError: a transport error or timeout, a non-2xx status, or a body
            of the wrong shape; the message names the URL.
    """
    if protocol not in GAUGE_PATHS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {sorted(GAUGE_PATHS)}")
    path = GAUGE_PATHS[protocol]
    if path is None:
        return None
    base = base_url.rstrip("/")
    response = await _get(client, base + path, headers, timeout_s, allow_404=protocol == "sglang")
    if response is None:  # SGLang without /v1/loads
        url = base + SGLANG_LEGACY_PATH
        response = await _get(client, url, headers, timeout_s, allow_404=False)
        assert response is not None
    url = str(response.request.url)
    if protocol == "vllm":
        return parse_vllm_metrics(response.text, source=url)
    try:
        data = response.json()
    except ValueError as exc:
        raise GaugeError(f"{url}: not JSON ({exc})") from exc
    return parse_sglang_loads(data, source=url)


async def _get(
    client: httpx.AsyncClient,
    url: str,
    headers: Mapping[str, str] | None,
    timeout_s: float,
    *,
    allow_404: bool,
) -> httpx.Response | None:
    """The response, ``None`` for a 404 when allowed, else a GaugeError naming the URL."""
    try:
        async with asyncio.timeout(timeout_s):
            response = await client.get(url, headers=dict(headers or {}), timeout=timeout_s)
    except TimeoutError as exc:
        raise GaugeError(f"{url}: no answer within {timeout_s:g} s") from exc
    except httpx.HTTPError as exc:
        raise GaugeError(f"{url}: {type(exc).__name__}: {exc or 'no detail'}") from exc
    if response.status_code == 404 and allow_404:
        return None
    if not response.is_success:
        raise GaugeError(f"{url}: HTTP {response.status_code}")
    return response


@dataclass
class _Target:
    base_url: str
    protocol: str
    headers: dict[str, str]
    task: asyncio.Task[None] | None = None
    failing: bool = False


class GaugePoller:
    """Polls every added backend's gauges each ``interval_s``, over one shared client.

    Each backend has its own loop, so a slow or dead one never delays the
    others. Each result goes to ``on_gauges(key, gauges)``; a failed poll
    gives ``on_gauges(key, None)`` and is logged (logger ``llmsched.router``)
    once when a backend starts failing and once when it recovers. Backends
    of a protocol without gauges (``openai``) are kept but never polled.
    The client is made by :meth:`start` unless one is given, and closed by
    :meth:`stop` only if made here.
    """

    def __init__(
        self,
        on_gauges: Callable[[Hashable, Gauges | None], None],
        *,
        interval_s: float = 1.0,
        timeout_s: float = 1.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if not interval_s > 0 or not timeout_s > 0:
            raise ValueError(
                f"interval_s and timeout_s must be > 0, got {interval_s} and {timeout_s}"
            )
        self.on_gauges = on_gauges
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._client = client
        self._owns_client = client is None
        self._targets: dict[Hashable, _Target] = {}
        self._running = False

    def add(
        self,
        key: Hashable,
        base_url: str,
        protocol: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Start polling a backend (at once if the poller runs).

        Raises:
            ValueError: an unknown protocol, or a key already added.
        """
        if protocol not in GAUGE_PATHS:
            raise ValueError(f"unknown protocol {protocol!r}; known: {sorted(GAUGE_PATHS)}")
        if key in self._targets:
            raise ValueError(f"backend {key!r} is already polled")
        target = _Target(base_url, protocol, dict(headers or {}))
        self._targets[key] = target
        if self._running:
            self._spawn(key, target)

    def remove(self, key: Hashable) -> None:
        """Stop polling a backend; no more callbacks for it. Unknown keys are ignored."""
        target = self._targets.pop(key, None)
        if target is not None and target.task is not None:
            target.task.cancel()

    async def start(self) -> None:
        """Begin polling every added backend (each one's first poll at once)."""
        if self._running:
            return
        if self._client is None:
            self._client = httpx.AsyncClient()
        self._running = True
        for key, target in self._targets.items():
            self._spawn(key, target)

    async def stop(self) -> None:
        """Cancel every poll and wait for them; close the client if made here."""
        self._running = False
        tasks = [t.task for t in self._targets.values() if t.task is not None]
        for target in self._targets.values():
            target.task = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    def _spawn(self, key: Hashable, target: _Target) -> None:
        if GAUGE_PATHS[target.protocol] is not None:
            target.task = asyncio.get_running_loop().create_task(
                self._loop(key, target), name=f"gauges {key!r}"
            )

    async def _loop(self, key: Hashable, target: _Target) -> None:
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            await self._poll_once(key, target)
            await asyncio.sleep(max(0.0, self.interval_s - (loop.time() - began)))

    async def _poll_once(self, key: Hashable, target: _Target) -> None:
        assert self._client is not None
        try:
            gauges = await poll_gauges(
                self._client, target.base_url, target.protocol, target.headers, self.timeout_s
            )
        except GaugeError as exc:
            if not target.failing:
                logger.warning("gauges of backend %r unavailable: %s", key, exc)
            target.failing = True
            gauges = None
        else:
            if target.failing:
                logger.info("gauges of backend %r readable again", key)
            target.failing = False
        if self._targets.get(key) is not target:
            return  # removed while polling
        try:
            self.on_gauges(key, gauges)
        except Exception:
            logger.exception("on_gauges failed for backend %r", key)


# Helpers


def _count(rank: dict, name: str, where: str, *, required: bool = True) -> int | None:
    """A non-negative integer field (``None`` if absent or null and not required)."""
    value = rank.get(name)
    if value is None:
        if required:
            raise GaugeError(f"{where}: missing {name!r}")
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise GaugeError(f"{where}: {name!r} must be a non-negative integer, got {value!r}")
    return value


def _value(value: float, name: str | None, source: str) -> float:
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise GaugeError(f"{source}: {name} is {value}, expected a non-negative number")
    return value


def _sum_known(values: Iterable[int | None]) -> int | None:
    """The sum, or ``None`` if any rank does not say."""
    out = 0
    for v in values:
        if v is None:
            return None
        out += v
    return out


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__
