"""The router's Prometheus metrics, in a registry of its own.

Each :class:`RouterMetrics` owns a ``CollectorRegistry``, so two routers in
one process (tests) never share a series. Metrics (``backend`` is the
backend's name or URL, with any ``user:password@`` part, query and
fragment cut off; ``none`` for a request never dispatched):

=============================================  =========  =================================
llmsched_router_info{policy, version}          gauge      1; the policy and llmsched version
llmsched_router_requests_total                 counter    answered requests
    {endpoint, status, backend}
llmsched_router_tokens_total{kind, backend}    counter    prompt and generation tokens of
                                                          2xx answers (the backend's usage)
llmsched_router_ttft_seconds{backend}          histogram  arrival to first token (2xx only)
llmsched_router_tpot_seconds{backend}          histogram  per output token after the first
llmsched_router_e2e_seconds{backend}           histogram  arrival to last byte (2xx only)
llmsched_router_queued_requests{queue}         gauge      requests in a policy queue
                                                          (``short``, ``long``, ``held`` ...)
llmsched_router_inflight_requests{backend}     gauge      requests sent and not finished
llmsched_router_batch_size_requests            histogram  size of each group the batch
                                                          window released
llmsched_router_decisions_total{kind}          counter    policy decisions (``dispatch``,
                                                          ``hold``, ``timer`` ...)
llmsched_router_backend_up{backend}            gauge      1 while the backend takes requests
llmsched_router_breaker_state{backend, state}  gauge      one-hot circuit-breaker state
                                                          (``closed``, ``open``, ``half_open``)
llmsched_router_retries_total{backend}         counter    requests retried away from it
llmsched_router_rejected_total{reason}         counter    requests the router answered
                                                          itself (``queue_full`` 429,
                                                          ``timeout`` 408,
                                                          ``shutting_down`` 503,
                                                          ``no_backend`` 503,
                                                          ``bad_request`` 4xx,
                                                          ``upstream``: retries spent)
=============================================  =========  =================================

The methods sit on the router's hot path: each caches the labelled
children it made, so a call after the first is a dict look-up and an
increment. Nothing here knows an API key; since a backend URL could carry
credentials in its user-info part, labels are built only through
:func:`backend_label`.
"""

from __future__ import annotations

import contextlib
from urllib.parse import urlsplit, urlunsplit

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from traces.records import llmsched_version

__all__ = [
    "BATCH_BUCKETS",
    "BREAKER_STATES",
    "LATENCY_BUCKETS_S",
    "PREFIX",
    "TPOT_BUCKETS_S",
    "RouterMetrics",
    "backend_label",
]

#: Every metric's name starts with this.
PREFIX = "llmsched_router_"

#: TTFT and end-to-end buckets, seconds: 5 ms (a cached short prompt) to 10 min.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip

#: Time-per-output-token buckets, seconds: 1 ms to 2.5 s.
TPOT_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5,
)  # fmt: skip

#: Released group sizes: the CUDA-graph batch sizes engines capture.
BATCH_BUCKETS: tuple[float, ...] = (
    1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 384, 512,
)  # fmt: skip

#: Circuit-breaker states the one-hot gauge always shows (another state name is added as met).
BREAKER_STATES: tuple[str, ...] = ("closed", "open", "half_open")

_NO_BACKEND = "none"


def backend_label(backend: str) -> str:
    """The label of a backend: its name, or its URL without credentials, query or fragment.

    ``""`` (never dispatched) is ``none``.
    """
    if not backend:
        return _NO_BACKEND
    if "://" not in backend:
        return backend
    u = urlsplit(backend)
    host = u.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    try:
        port = u.port
    except ValueError:
        port = None
    netloc = host if port is None else f"{host}:{port}"
    return urlunsplit((u.scheme, netloc, u.path, "", ""))


class RouterMetrics:
    """The router's metrics (module docstring), rendered by :meth:`render`.

    Args:
        policy: the scheduling policy's name, shown by ``llmsched_router_info``.
    """

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        p = PREFIX
        info = Gauge(
            f"{p}info",
            "The router's policy and llmsched version.",
            ["policy", "version"],
            registry=r,
        )
        info.labels(policy, llmsched_version()).set(1)
        self._requests = Counter(
            f"{p}requests",
            "Requests answered, by endpoint, HTTP status and backend.",
            ["endpoint", "status", "backend"],
            registry=r,
        )
        self._tokens = Counter(
            f"{p}tokens",
            "Tokens of answered requests, by kind (prompt, generation; the backend's usage) "
            "and backend.",
            ["kind", "backend"],
            registry=r,
        )
        self._ttft = Histogram(
            f"{p}ttft_seconds",
            "Arrival at the router to the first token (2xx answers).",
            ["backend"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self._tpot = Histogram(
            f"{p}tpot_seconds",
            "Time per output token after the first (2xx answers).",
            ["backend"],
            buckets=TPOT_BUCKETS_S,
            registry=r,
        )
        self._e2e = Histogram(
            f"{p}e2e_seconds",
            "Arrival at the router to the last byte (2xx answers).",
            ["backend"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self._queued = Gauge(
            f"{p}queued_requests", "Requests waiting in a policy queue.", ["queue"], registry=r
        )
        self._inflight = Gauge(
            f"{p}inflight_requests",
            "Requests sent to a backend and not finished.",
            ["backend"],
            registry=r,
        )
        self._batch = Histogram(
            f"{p}batch_size_requests",
            "Requests in each group the batch window released.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self._decisions = Counter(
            f"{p}decisions", "Policy decisions, by kind.", ["kind"], registry=r
        )
        self._up = Gauge(
            f"{p}backend_up", "1 while the backend takes requests, else 0.", ["backend"], registry=r
        )
        self._breaker = Gauge(
            f"{p}breaker_state",
            "The backend's circuit-breaker state (1 on the current one).",
            ["backend", "state"],
            registry=r,
        )
        self._retries = Counter(
            f"{p}retries", "Requests retried away from a backend.", ["backend"], registry=r
        )
        self._rejected = Counter(
            f"{p}rejected",
            "Requests the router answered itself, by reason.",
            ["reason"],
            registry=r,
        )
        # Caches of labelled children (the hot path's dict look-ups).
        self._labels: dict[str, str] = {}
        self._request_children: dict[tuple[str, int, str], Counter] = {}
        self._latency_children: dict[str, tuple[Histogram, Histogram, Histogram]] = {}
        self._queue_children: dict[str, Gauge] = {}
        self._inflight_children: dict[str, Gauge] = {}
        self._decision_children: dict[str, Counter] = {}
        self._up_children: dict[str, Gauge] = {}
        self._breaker_children: dict[str, dict[str, Gauge]] = {}
        self._retry_children: dict[str, Counter] = {}
        self._rejected_children: dict[str, Counter] = {}

    # -- labels ------------------------------------------------------------------------

    def _label(self, backend: str) -> str:
        label = self._labels.get(backend)
        if label is None:
            label = self._labels[backend] = backend_label(backend)
        return label

    # -- the router's calls --------------------------------------------------------------

    def request_done(
        self,
        endpoint: str,
        status: int,
        backend: str,
        *,
        ttft_s: float | None,
        tpot_s: float | None,
        e2e_s: float,
        prompt_tokens: int = 0,
        output_tokens: int = 0,
    ) -> None:
        """Count one answered request; a 2xx answer's latencies and tokens enter the metrics.

        ``backend`` is ``""`` when the request was never dispatched. The token
        counts are the backend's usage (as vLLM's ``prompt_tokens_total`` and
        ``generation_tokens_total`` count them), 0 when it reported none.
        """
        key = (endpoint, status, backend)
        child = self._request_children.get(key)
        if child is None:
            label = self._label(backend)
            child = self._request_children[key] = self._requests.labels(
                endpoint, str(status), label
            )
        child.inc()
        if not 200 <= status < 300:
            return
        hists = self._latency_children.get(backend)
        if hists is None:
            label = self._label(backend)
            hists = self._latency_children[backend] = (
                self._ttft.labels(label),
                self._tpot.labels(label),
                self._e2e.labels(label),
            )
        ttft, tpot, e2e = hists
        if prompt_tokens > 0 or output_tokens > 0:
            label = self._label(backend)
            self._tokens.labels("prompt", label).inc(max(prompt_tokens, 0))
            self._tokens.labels("generation", label).inc(max(output_tokens, 0))
        if ttft_s is not None:
            ttft.observe(ttft_s)
        if tpot_s is not None:
            tpot.observe(tpot_s)
        e2e.observe(e2e_s)

    def queue_depth(self, queue: str, n: int) -> None:
        """Requests now waiting in the policy queue ``queue``."""
        child = self._queue_children.get(queue)
        if child is None:
            child = self._queue_children[queue] = self._queued.labels(queue)
        child.set(n)

    def inflight(self, backend: str, n: int) -> None:
        """Requests now sent to ``backend`` and not finished."""
        child = self._inflight_children.get(backend)
        if child is None:
            child = self._inflight_children[backend] = self._inflight.labels(self._label(backend))
        child.set(n)

    def batch_released(self, size: int) -> None:
        """The batch window released a group of ``size`` requests."""
        self._batch.observe(size)

    def decision(self, kind: str) -> None:
        """The policy made one decision of ``kind`` (``dispatch``, ``hold``, ``timer`` ...)."""
        child = self._decision_children.get(kind)
        if child is None:
            child = self._decision_children[kind] = self._decisions.labels(kind)
        child.inc()

    def health(self, backend: str, available: bool, breaker: str) -> None:
        """``backend``'s availability and circuit-breaker state (``closed``, ``open`` ...)."""
        up = self._up_children.get(backend)
        if up is None:
            up = self._up_children[backend] = self._up.labels(self._label(backend))
        up.set(1 if available else 0)
        states = self._breaker_children.get(backend)
        if states is None:
            label = self._label(backend)
            states = self._breaker_children[backend] = {
                s: self._breaker.labels(label, s) for s in BREAKER_STATES
            }
        if breaker not in states:
            states[breaker] = self._breaker.labels(self._label(backend), breaker)
        for state, child in states.items():
            child.set(1 if state == breaker else 0)

    def retry(self, backend: str) -> None:
        """A request that failed on ``backend`` was retried elsewhere."""
        child = self._retry_children.get(backend)
        if child is None:
            child = self._retry_children[backend] = self._retries.labels(self._label(backend))
        child.inc()

    def rejected(self, reason: str) -> None:
        """The router answered a request itself (``queue_full``, ``timeout``, ``shutting_down``)."""
        child = self._rejected_children.get(reason)
        if child is None:
            child = self._rejected_children[reason] = self._rejected.labels(reason)
        child.inc()

    def remove_backend(self, backend: str) -> None:
        """Drop every series labelled with ``backend`` (it left the pool)."""
        label = self._label(backend)
        for key in [k for k in self._request_children if k[2] == backend]:
            del self._request_children[key]
            self._requests.remove(key[0], str(key[1]), label)
        if self._latency_children.pop(backend, None) is not None:
            for hist in (self._ttft, self._tpot, self._e2e):
                hist.remove(label)
            for kind in ("prompt", "generation"):
                with contextlib.suppress(KeyError):
                    self._tokens.remove(kind, label)
        for cache, metric in (
            (self._inflight_children, self._inflight),
            (self._up_children, self._up),
            (self._retry_children, self._retries),
        ):
            if cache.pop(backend, None) is not None:
                metric.remove(label)
        for state in self._breaker_children.pop(backend, {}):
            self._breaker.remove(label, state)
        self._labels.pop(backend, None)

    def render(self) -> tuple[bytes, str]:
        """The metrics in Prometheus' text format: ``(body, content type)``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
