"""The router's HTTP face: the generation endpoints on a lean ASGI path, the rest on FastAPI.

Generation (``POST /v1/completions``, ``/v1/chat/completions``, SGLang's
``/generate``) is the hot path and is served by :class:`Router` as plain
ASGI: a request is read and checked, measured (prompt tokens, prefix block
hashes), handed to the policy through :class:`scheduler.router.live.LiveCluster`,
held while the policy holds it, sent to the backend the policy chose, and
its answer relayed as it arrives. Everything else (``/health``,
``/readiness``, ``/metrics``, ``/v1/models``, the admin API ``/workers``)
is a FastAPI app (:func:`control_app`).

Request hints come from headers (DESIGN's contract 6): ``x-request-id``
(kept, or made, returned and logged), ``x-session-id``, ``x-slo-ttft-ms``,
``x-slo-tpot-ms``.

Failures, in the order a request can meet them:

* a bad body (not JSON, wrong types, unknown model, too large, prompt over
  the limit): 400, 404 or 413 with OpenAI's error body naming the field;
* the router is shutting down: 503; it holds ``max_queue`` requests: 429
  with ``Retry-After``; the request waited ``queue_timeout_s`` undispatched:
  408; no healthy backend for it: 503;
* the backend fails before anything reached the client (connect error,
  timeout, 5xx, a cut before the response's head): the circuit breaker is
  told and the request is retried on the least loaded other healthy
  backend of the same role, up to ``retries`` times with backoff; then 502
  (504 for a timeout), or the backend's own 5xx answer;
* a backend's 4xx is the client's problem: passed through as it is;
* a stream cut after it began ends with an OpenAI-shaped error event
  (``data: {"error": {...}}``), so a client never takes it for a complete
  answer (the ``openai`` SDK raises on it);
* the client goes away: the upstream request is cancelled (its connection
  closed, which SGLang and vLLM take as an abort).

Nothing answers with a traceback: an unexpected exception is logged with
the request id and answered 500 with an error body.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from scheduler.policy import Policy
from scheduler.router.config import BackendConfig, RouterConfig, policy_role
from scheduler.router.gauges import GAUGE_PATHS, GaugePoller
from scheduler.router.health import HealthMonitor
from scheduler.router.live import Assignment, LiveCluster, NoBackend, RouterRequest
from scheduler.router.metrics import RouterMetrics
from scheduler.router.prompts import BodyError, PromptCounter
from scheduler.router.upstream import (
    Backend,
    StreamRelay,
    sglang_pd_body,
    usage_of,
    vllm_decode_body,
    vllm_prefill_body,
)
from traces.records import (
    OUTCOME_CANCELLED,
    OUTCOME_ERROR,
    OUTCOME_OK,
    OUTCOME_REJECTED,
    OUTCOME_TIMEOUT,
)
from traces.replay.http import StreamCut
from traces.replay.protocol import error_message

__all__ = ["GENERATION_PATHS", "Router", "control_app", "error_body"]

log = logging.getLogger("llmsched.router")

#: Path -> endpoint name of the generation endpoints.
GENERATION_PATHS: dict[str, str] = {
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat",
    "/generate": "generate",
}
#: Output budget of a request that gives none: the servers' own defaults
#: (vLLM's and OpenAI's completions: 16; SGLang's max_new_tokens: 128).
_DEFAULT_BUDGET = {"completions": 16, "generate": 128}

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    408: "RequestTimeoutError",
    413: "RequestTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
    err = {
        "message": message,
        "type": _ERROR_TYPES.get(status, "Error"),
        "param": param,
        "code": status,
    }
    return orjson.dumps({"error": err})


class _Reject(Exception):
    """Answer the client ``status`` with an error body (nothing sent upstream yet)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
        outcome: int = OUTCOME_REJECTED,
        reason: str = "bad_request",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.headers = headers or []
        self.outcome = outcome
        #: The ``reason`` label of ``llmsched_router_rejected_total``.
        self.reason = reason


class _ClientGone(Exception):
    """The client disconnected."""


class _Upstream(Exception):
    """A backend failed before anything reached the client (retryable)."""

    def __init__(self, status: int, message: str, body: bytes | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.body = status, message, body


class _Record:
    """What the router saw of one request, for the metrics, the logs and ``--record``."""

    __slots__ = (
        "arrival",
        "cached_tokens",
        "chunk_times",
        "decode_instance",
        "dispatch",
        "endpoint",
        "error",
        "finish",
        "first_token",
        "instance",
        "model",
        "outcome",
        "output_tokens",
        "prompt_tokens",
        "req",
        "rid",
        "row",
        "status",
    )

    def __init__(self, row: int, rid: str, endpoint: str, arrival: float) -> None:
        self.row = row
        self.rid = rid
        self.endpoint = endpoint
        self.arrival = arrival
        self.dispatch = -1.0
        self.first_token = -1.0
        self.finish = -1.0
        self.instance = -1
        self.decode_instance = -1
        self.status = 0
        self.outcome = OUTCOME_OK
        self.error: str | None = None
        self.prompt_tokens = -1
        self.cached_tokens = -1
        self.output_tokens = -1
        self.chunk_times: list[float] | None = None
        self.model: str | None = None
        #: The policy's request, once the request was accepted.
        self.req: RouterRequest | None = None


class Router:
    """The router: backends, policy, health, metrics, and the ASGI app of the hot path.

    Args:
        config: what to serve.
        policy: the policy object (from :func:`scheduler.registry.create`).
        counter: prompt measurement (default: from ``config.tokenizer``).
        recorder: ``--record``'s writer, or None.
    """

    def __init__(
        self,
        config: RouterConfig,
        policy: Policy,
        *,
        counter: PromptCounter | None = None,
        recorder: Any = None,
    ) -> None:
        self.config = config
        self.policy = policy
        self.counter = counter or PromptCounter(config.tokenizer, block_tokens=config.block_tokens)
        self.recorder = recorder
        self.metrics = RouterMetrics(policy.name)
        self.backends: list[Backend | None] = []
        self.cluster: LiveCluster | None = None
        self.health: HealthMonitor | None = None
        self.poller: GaugePoller | None = None
        self.client: httpx.AsyncClient | None = None
        self.control = control_app(self)
        self.shutting_down = False
        #: Requests accepted and not yet answered in full.
        self.active = 0
        self._idle: asyncio.Event | None = None
        #: Set when a shutdown's grace is over: requests still held are answered 503.
        self._closing: asyncio.Future[None] | None = None
        self._rows = 0
        #: Request ids the router makes: a random prefix per process, then a count.
        self._id_prefix = f"{uuid.uuid4().hex[:16]}-"
        self._models_cache: tuple[float, bytes] | None = None

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Start on the running loop: backends, health checks (one round), gauge polls."""
        loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = loop.create_future()
        self.cluster = LiveCluster(
            self.policy, loop, on_dispatch=self._dispatched, on_release=self.metrics.batch_released
        )
        self.client = httpx.AsyncClient(timeout=self.config.connect_timeout_s)
        cfg = self.config
        self.health = HealthMonitor(
            cfg.health, cfg.breaker, self._health_changed, client=self.client
        )
        if cfg.poll_interval_s > 0:
            self.poller = GaugePoller(
                self._gauges,
                interval_s=cfg.poll_interval_s,
                timeout_s=cfg.health.timeout_s,
                client=self.client,
            )
        for b in cfg.backends:
            self._add_backend(b)
        await self.health.start(first_round_timeout_s=cfg.health.timeout_s + 1.0)
        if self.poller is not None:
            await self.poller.start()

    async def stop(self) -> None:
        """Stop polling and probing, close every connection, flush the record."""
        if self.poller is not None:
            await self.poller.stop()
        if self.health is not None:
            await self.health.stop()
        if self.cluster is not None:
            self.cluster.close()
        for b in self.backends:
            if b is not None:
                b.close()
        if self.client is not None:
            await self.client.aclose()
        if self.recorder is not None:
            self.recorder.close()

    async def drain(self, grace_s: float) -> bool:
        """Refuse new requests (503) and wait up to ``grace_s`` for in-flight ones; whether all ended."""
        self.shutting_down = True
        if self._idle is None or self.active == 0:
            return True
        try:
            async with asyncio.timeout(grace_s):
                await self._idle.wait()
        except TimeoutError:
            # Requests the policy still holds get an answer before the server cuts them off.
            if self._closing is not None and not self._closing.done():
                self._closing.set_result(None)
            return False
        return True

    # -- backends ---------------------------------------------------------------------

    def _add_backend(self, b: BackendConfig) -> int:
        assert self.cluster is not None and self.health is not None
        capacity = b.kv_capacity_tokens or self.config.default_kv_capacity_tokens
        i = self.cluster.add_instance(policy_role(b.role), capacity, b.pools)
        backend = Backend(b, i, self.config.connect_timeout_s)
        self.backends.append(backend)
        self.health.add(i, b.url, backend.auth_headers)
        if self.poller is not None and GAUGE_PATHS.get(b.protocol):
            self.poller.add(i, b.url, b.protocol, backend.auth_headers)
        self.metrics.health(b.label, False, "closed")
        return i

    async def add_backend(self, b: BackendConfig) -> int:
        """Add a backend at run time (admin API); probed at once."""
        i = self._add_backend(b)
        assert self.health is not None
        probe = getattr(self.health, "probe_now", None)
        if probe is not None:
            await probe(i)
        return i

    def remove_backend(self, instance_id: int) -> None:
        """Take a backend out (admin API); requests in flight on it finish."""
        assert self.cluster is not None and self.health is not None
        backend = self.backends[instance_id]
        if backend is None:
            return
        self.cluster.remove_instance(instance_id)
        self.health.remove(instance_id)
        if self.poller is not None:
            self.poller.remove(instance_id)
        self.metrics.remove_backend(backend.label)
        self.backends[instance_id] = None
        backend.close()

    def find_backend(self, url: str) -> int | None:
        url = url.rstrip("/")
        for b in self.backends:
            if b is not None and b.config.url == url:
                return b.instance_id
        return None

    def _health_changed(self, key: Any, available: bool) -> None:
        if self.cluster is None:
            return
        i = int(key)
        backend = self.backends[i] if i < len(self.backends) else None
        if backend is None:
            return
        state = self.health.state(i) if self.health else {}
        log.info(
            "backend %s",
            "available" if available else "unavailable",
            extra={"backend": backend.label, "state": state},
        )
        self.metrics.health(backend.label, available, str(state.get("breaker", "closed")))
        self.cluster.set_healthy(i, available)

    def _gauges(self, key: Any, gauges: Any) -> None:
        if self.cluster is not None and self.backends[int(key)] is not None:
            self.cluster.set_gauges(int(key), gauges)

    def _dispatched(self, req: RouterRequest, a: Assignment) -> None:
        self.metrics.decision("dispatch")

    def ready(self) -> tuple[bool, str]:
        """Whether the policy's pools have healthy members (PD: a prefill and a decode backend)."""
        if self.cluster is None:
            return False, "starting"
        view = self.cluster.view
        if self.config.pd or view.pool("prefill"):
            p = [i for i in view.pool("prefill") if i.healthy]
            d = [i for i in view.pool("decode") if i.healthy]
            if not p or not d:
                return False, f"healthy prefill backends: {len(p)}, decode backends: {len(d)}"
            return True, f"healthy prefill backends: {len(p)}, decode backends: {len(d)}"
        entry = [i for i in view.pool("entry") if i.healthy]
        if not entry:
            return False, "no healthy backend"
        return True, f"healthy backends: {len(entry)}"

    # -- ASGI -------------------------------------------------------------------------

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = GENERATION_PATHS.get(scope["path"])
            if endpoint is not None:
                await self._generate(endpoint, scope, receive, send)
                return
        await self.control(scope, receive, send)

    async def _generate(
        self, endpoint: str, scope: dict, receive: Callable, send: Callable
    ) -> None:
        loop = asyncio.get_running_loop()
        t_arrival = loop.time()
        headers = _headers(scope)
        given = headers.get("x-request-id")
        rid = given or f"{self._id_prefix}{self._rows + 1:x}"
        self._rows += 1
        rec = _Record(self._rows, rid, endpoint, t_arrival)
        self.active += 1
        if self._idle is not None:
            self._idle.clear()
        out = _Client(send, rid)
        try:
            await self._serve(endpoint, headers, rec, receive, out)
        except _Reject as exc:
            rec.status, rec.outcome, rec.error = exc.status, exc.outcome, exc.message
            self.metrics.rejected(exc.reason)
            await out.error(exc.status, exc.message, exc.param, exc.headers)
        except _ClientGone:
            rec.outcome, rec.status = OUTCOME_CANCELLED, 499
            rec.error = "client disconnected"
        except asyncio.CancelledError:
            if out.guard is None or not out.guard.claim("client"):
                # The server's own cancel: a shutdown whose grace ran out cut the answer.
                rec.outcome = OUTCOME_ERROR
                rec.error = "the router stopped before the answer was complete (shutdown)"
                raise
            rec.outcome, rec.status = OUTCOME_CANCELLED, 499
            rec.error = "client disconnected"
        except Exception as exc:  # never a traceback to the client
            log.exception("request failed", extra={"request_id": rid})
            rec.status, rec.outcome, rec.error = 500, OUTCOME_ERROR, f"internal error: {exc}"
            if not out.started:
                await out.error(
                    500, f"internal router error ({type(exc).__name__}); see the router log"
                )
        finally:
            self.active -= 1
            if self.active == 0 and self._idle is not None:
                self._idle.set()
            rec.finish = loop.time()
            self._done(rec)
            if self.recorder is not None and rec.prompt_tokens >= 0:
                self._record(rec, given)

    async def _serve(
        self, endpoint: str, headers: dict[str, str], rec: _Record, receive: Callable, out: _Client
    ) -> None:
        cfg = self.config
        raw = await _read_body(receive, cfg.max_body_bytes)
        if self.shutting_down:
            raise _Reject(503, "the router is shutting down", reason="shutting_down")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _Reject(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise _Reject(400, f"the body must be a JSON object; got {type(body).__name__}")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _Reject(400, f"stream: expected a boolean; got {stream!r}", "stream")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise _Reject(400, f"model: expected a string; got {model!r}", "model")
        rec.model = model
        if cfg.model and model and model != cfg.model:
            raise _Reject(404, f"The model `{model}` does not exist.", "model")
        budget = _budget(endpoint, body, cfg.default_max_tokens)
        slo_ttft = _ms_header(headers, "x-slo-ttft-ms")
        slo_tpot = _ms_header(headers, "x-slo-tpot-ms")
        try:
            info = await self.counter.measure(endpoint, body)
        except BodyError as exc:
            raise _Reject(400, str(exc), exc.param) from None
        rec.prompt_tokens = info.tokens
        cluster = self.cluster
        assert cluster is not None
        # Made before any check so that a request refused below is recorded with its budget,
        # session, SLOs and prefix: the recorded trace offers the load the clients offered.
        req = rec.req = RouterRequest(
            rec.row,
            cluster.now(),
            info.tokens,
            budget,
            session_id=headers.get("x-session-id"),
            prefix_hashes=info.prefix_hashes,
            block_tokens=info.block_tokens,
            slo_ttft_s=slo_ttft,
            slo_tpot_s=slo_tpot,
        )
        if cfg.max_prompt_tokens is not None and info.tokens > cfg.max_prompt_tokens:
            raise _Reject(
                400,
                f"the prompt has {info.tokens} tokens; this router accepts at most "
                f"{cfg.max_prompt_tokens}",
                "messages" if endpoint == "chat" else "prompt",
            )
        ok, why = self.ready()
        if not ok:
            raise _Reject(
                503,
                f"no backend can take the request ({why})",
                headers=[(b"retry-after", b"1")],
                reason="no_backend",
            )
        if cluster.held >= cfg.max_queue:
            raise _Reject(
                429,
                f"the router holds {cluster.held} requests, its limit (max_queue); retry later",
                headers=[(b"retry-after", b"1")],
                reason="queue_full",
            )
        watcher = out.guard = _Guard(receive, cluster.loop)
        try:
            assignment = await self._wait_dispatch(req)
            rec.dispatch = cluster.loop.time()
            rec.instance, rec.decode_instance = assignment.instance, assignment.decode
            await self._forward(endpoint, body, raw, stream, req, assignment, rec, out)
        finally:
            watcher.close()
            cluster.finish(req)

    async def _wait_dispatch(self, req: RouterRequest) -> Assignment:
        cluster = self.cluster
        assert cluster is not None
        cluster.arrive(req)
        fut = req.assigned
        assert fut is not None
        if not fut.done():
            self.metrics.decision("hold")
            self.metrics.queue_depth("held", cluster.held)
            try:
                async with asyncio.timeout(self.config.queue_timeout_s):
                    if self._closing is None:
                        await fut
                    else:
                        await asyncio.wait(
                            (fut, self._closing), return_when=asyncio.FIRST_COMPLETED
                        )
                if not fut.done():  # the shutdown's grace is over (abandoned below)
                    raise _Reject(
                        503,
                        "the router is shutting down; the request was not sent to a backend",
                        headers=[(b"retry-after", b"1")],
                        reason="shutting_down",
                    )
            except TimeoutError:
                cluster.abandon(req)
                raise _Reject(
                    408,
                    f"the request waited {self.config.queue_timeout_s:g} s in the router without "
                    "being dispatched (queue_timeout_s)",
                    outcome=OUTCOME_TIMEOUT,
                    reason="timeout",
                ) from None
            except BaseException:
                cluster.abandon(req)
                raise
            finally:
                self.metrics.queue_depth("held", cluster.held)
        try:
            return fut.result()
        except NoBackend as exc:
            raise _Reject(503, str(exc), reason="no_backend") from None

    # -- forwarding ---------------------------------------------------------------------

    async def _forward(
        self,
        endpoint: str,
        body: dict[str, Any],
        raw: bytes,
        stream: bool,
        req: RouterRequest,
        a: Assignment,
        rec: _Record,
        out: _Client,
    ) -> None:
        cfg = self.config
        cluster = self.cluster
        assert cluster is not None
        keep_usage = True
        if stream and endpoint != "generate":
            opts = body.get("stream_options")
            if opts is not None and not isinstance(opts, dict):
                raise _Reject(
                    400, f"stream_options: expected an object; got {opts!r}", "stream_options"
                )
            # vLLM's and SGLang's include_usage default to true once stream_options is
            # given at all (OpenAI's to false).
            first = self.backends[a.instance]
            default = first is not None and first.config.protocol != "openai"
            keep_usage = opts is not None and bool(opts.get("include_usage", default))
            if not keep_usage:
                body = dict(body)
                body["stream_options"] = {**(opts or {}), "include_usage": True}
                raw = b""
        tried: list[int] = []
        instance, decode = a.instance, a.decode
        backoff = cfg.retry_backoff_s
        for attempt in range(cfg.retries + 1):
            backend = self.backends[instance]
            tried.append(instance)
            try:
                if backend is None:
                    raise _Upstream(503, f"backend {instance} was removed")
                rec.instance = instance
                await self._attempt(
                    endpoint, body, raw, stream, keep_usage, req, backend, decode, rec, out
                )
                return
            except _Upstream as exc:
                if backend is not None and self.health is not None:
                    self.health.report(instance, False, exc.message)
                if out.started:
                    raise
                log.warning(
                    "backend failed before the response began",
                    extra={
                        "request_id": rec.rid,
                        "backend": backend.label if backend else instance,
                        "error": exc.message,
                    },
                )
                role = "prefill" if cfg.pd else "entry"
                nxt = cluster.fallback(role, tried) if attempt < cfg.retries else None
                if nxt is None:
                    if exc.body is not None:
                        rec.status, rec.outcome, rec.error = exc.status, OUTCOME_ERROR, exc.message
                        await out.raw(exc.status, exc.body)
                        return
                    raise _Reject(
                        exc.status, exc.message, outcome=OUTCOME_ERROR, reason="upstream"
                    ) from None
                self.metrics.retry(backend.label if backend else str(instance))
                if backoff:
                    await asyncio.sleep(backoff)
                    backoff *= 2
                if decode >= 0 or req.decode_instance >= 0:
                    cluster.drop_decode(req)
                    decode = -1
                cluster.move(req, nxt)
                instance = nxt

    async def _attempt(
        self,
        endpoint: str,
        body: dict[str, Any],
        raw: bytes,
        stream: bool,
        keep_usage: bool,
        req: RouterRequest,
        backend: Backend,
        decode: int,
        rec: _Record,
        out: _Client,
    ) -> None:
        protocol = backend.config.protocol
        cluster = self.cluster
        assert cluster is not None and self.health is not None
        self.health.started(backend.instance_id)
        if backend.config.role == "prefill":
            if protocol == "vllm":
                await self._vllm_pd(endpoint, body, stream, keep_usage, req, backend, rec, out)
            else:
                await self._sglang_pd(
                    endpoint, body, stream, keep_usage, req, backend, decode, rec, out
                )
            return
        payload = raw or orjson.dumps(body)
        resp = await self._post(backend, endpoint, payload, rec.rid)
        await self._relay(resp, endpoint, stream, keep_usage, req, backend, rec, out)

    async def _post(self, backend: Backend, endpoint: str, payload: bytes, rid: str) -> Any:
        path = _PATHS[endpoint]
        headers = dict(backend.headers)
        headers["x-request-id"] = rid
        try:
            async with asyncio.timeout(self.config.read_timeout_s):
                return await backend.pool.post(path, payload, headers)
        except TimeoutError:
            raise _Upstream(
                504,
                f"backend {backend.label} did not answer within {self.config.read_timeout_s:g} s",
            ) from None
        except (OSError, StreamCut) as exc:
            raise _Upstream(
                502, f"backend {backend.label} unreachable: {exc or type(exc).__name__}"
            ) from None

    async def _relay(
        self,
        resp: Any,
        endpoint: str,
        stream: bool,
        keep_usage: bool,
        req: RouterRequest,
        backend: Backend,
        rec: _Record,
        out: _Client,
        first_at_head: bool = False,
    ) -> None:
        """Pass a backend's answer to the client as it arrives; note first token, usage, outcome."""
        cluster = self.cluster
        assert cluster is not None and self.health is not None
        loop = cluster.loop
        timeout = self.config.read_timeout_s
        status = resp.status
        if status >= 500:
            data = await _read_all(resp, timeout)
            raise _Upstream(status, f"backend {backend.label} answered {status}", data)
        ctype = resp.headers.get("content-type", "application/json")
        rec.status = status
        if status >= 400 or not stream or "text/event-stream" not in ctype:
            try:
                data = await _read_all(resp, timeout)
            except (StreamCut, TimeoutError) as exc:
                raise _Upstream(
                    502, f"backend {backend.label}: the answer was cut off: {exc}"
                ) from None
            self.health.report(backend.instance_id, True)
            if status < 400:
                rec.first_token = loop.time()
                cluster.first_token(req)
                try:
                    p, c, o = usage_of(orjson.loads(data))
                except orjson.JSONDecodeError:
                    p = c = o = -1
                _note_usage(rec, p, c, o)
            else:
                rec.outcome, rec.error = OUTCOME_ERROR, error_message(data)
            await out.raw(status, data, ctype)
            return
        relay = StreamRelay(endpoint, keep_usage)
        times: list[float] = []
        await out.start(status, ctype)
        guard = out.guard
        assert guard is not None
        problem: str | None = None
        try:
            guard.watch_silence(timeout)
            try:
                async for piece in resp.pieces():
                    guard.progress += 1
                    passed, n = relay.feed(piece)
                    if n:
                        now = loop.time()
                        if rec.first_token < 0:
                            rec.first_token = now
                            cluster.first_token(req)
                        times.extend([now] * n)
                    if passed:
                        await out.body(passed)
            finally:
                guard.stop_silence()
            rest = relay.finish()
            if rest:
                await out.body(rest)
        except asyncio.CancelledError:
            if not guard.claim("silent"):
                resp.close()  # the client left: closing the connection aborts it upstream
                rec.chunk_times = times  # the tokens it had are recorded as produced
                _note_usage(rec, *relay.usage)
                raise
            problem = f"went silent for {timeout:g} s"
        except (StreamCut, OSError) as exc:
            problem = f"was cut: {exc or type(exc).__name__}"
        if problem is not None:
            msg = f"the stream from backend {backend.label} {problem}"
            self.health.report(backend.instance_id, False, msg)
            rec.outcome, rec.error, rec.status = OUTCOME_ERROR, msg, 502
            rec.chunk_times = times
            _note_usage(rec, *relay.usage)  # what was relayed before the cut
            await out.body(b"data: " + error_body(502, msg) + b"\n\n")
            await out.end()
            resp.close()
            return
        resp.close()
        self.health.report(backend.instance_id, True)
        rec.chunk_times = times
        _note_usage(rec, *relay.usage)
        if relay.error is not None:
            rec.outcome, rec.error = OUTCOME_ERROR, relay.error
        await out.end()

    async def _sglang_pd(
        self,
        endpoint: str,
        body: dict[str, Any],
        stream: bool,
        keep_usage: bool,
        req: RouterRequest,
        prefill: Backend,
        decode_id: int,
        rec: _Record,
        out: _Client,
    ) -> None:
        cluster = self.cluster
        assert cluster is not None
        if decode_id < 0:
            try:
                decode_id = cluster.decode_for(req, prefill.instance_id)
            except NoBackend as exc:
                raise _Reject(503, str(exc), reason="no_backend") from None
            cluster.count_decode(req, decode_id)
        decode = self.backends[decode_id]
        if decode is None:
            raise _Upstream(503, f"decode backend {decode_id} was removed")
        rec.decode_instance = decode_id
        self.health.started(decode_id)  # type: ignore[union-attr]
        payload = orjson.dumps(sglang_pd_body(body, prefill))
        p_task = asyncio.ensure_future(self._post(prefill, endpoint, payload, rec.rid))
        try:
            d_resp = await self._post(decode, endpoint, payload, rec.rid)
        except BaseException:
            p_task.cancel()
            raise
        drain = asyncio.ensure_future(self._drain_prefill(p_task, prefill, req))
        try:
            await self._relay(d_resp, endpoint, stream, keep_usage, req, decode, rec, out)
        finally:
            if not drain.done():
                drain.cancel()

    async def _drain_prefill(
        self, p_task: asyncio.Future, prefill: Backend, req: RouterRequest
    ) -> None:
        """Read the prefill server's answer (SGLang PD) and stop counting the request there."""
        assert self.health is not None
        try:
            resp = await p_task
            data = await _read_all(resp, self.config.read_timeout_s)
            self.health.report(prefill.instance_id, resp.status < 500)
            if resp.status >= 400:
                log.warning(
                    "prefill server answered an error",
                    extra={
                        "backend": prefill.label,
                        "status": resp.status,
                        "error": error_message(data),
                    },
                )
        except _Upstream as exc:
            self.health.report(prefill.instance_id, False, exc.message)
            log.warning(
                "prefill server failed", extra={"backend": prefill.label, "error": exc.message}
            )
        finally:
            assert self.cluster is not None
            self.cluster.release(req)

    async def _vllm_pd(
        self,
        endpoint: str,
        body: dict[str, Any],
        stream: bool,
        keep_usage: bool,
        req: RouterRequest,
        prefill: Backend,
        rec: _Record,
        out: _Client,
    ) -> None:
        cluster = self.cluster
        assert cluster is not None
        resp = await self._post(prefill, endpoint, orjson.dumps(vllm_prefill_body(body)), rec.rid)
        data = await _read_all(resp, self.config.read_timeout_s)
        if resp.status >= 500:
            raise _Upstream(
                resp.status, f"prefill backend {prefill.label} answered {resp.status}", data
            )
        if resp.status >= 400:
            rec.status, rec.outcome, rec.error = resp.status, OUTCOME_ERROR, error_message(data)
            await out.raw(resp.status, data)
            return
        self.health.report(prefill.instance_id, True)  # type: ignore[union-attr]
        try:
            decode_body = vllm_decode_body(body, data)
        except ValueError as exc:
            raise _Upstream(502, f"prefill backend {prefill.label}: {exc}") from None
        try:
            decode_id = cluster.decode_for(req, prefill.instance_id)
        except NoBackend as exc:
            raise _Reject(503, str(exc), reason="no_backend") from None
        decode = self.backends[decode_id]
        assert decode is not None
        cluster.move(req, decode_id, first=True)
        rec.decode_instance = decode_id
        self.health.started(decode_id)  # type: ignore[union-attr]
        d_resp = await self._post(decode, endpoint, orjson.dumps(decode_body), rec.rid)
        await self._relay(d_resp, endpoint, stream, keep_usage, req, decode, rec, out)

    # -- results ----------------------------------------------------------------------

    def _done(self, rec: _Record) -> None:
        backend = ""
        if rec.instance >= 0 and rec.instance < len(self.backends):
            b = self.backends[rec.instance]
            backend = b.label if b is not None else str(rec.instance)
        ttft = rec.first_token - rec.arrival if rec.first_token >= 0 else None
        tpot = None
        times = rec.chunk_times
        if times and len(times) > 1:
            tpot = (times[-1] - times[0]) / (len(times) - 1)
        self.metrics.request_done(
            rec.endpoint,
            rec.status or 200,
            backend,
            ttft_s=ttft,
            tpot_s=tpot,
            e2e_s=rec.finish - rec.arrival,
            prompt_tokens=rec.prompt_tokens,
            output_tokens=rec.output_tokens,
        )
        if self.config.access_log or rec.outcome not in (OUTCOME_OK,):
            log.info(
                "request",
                extra={
                    "request_id": rec.rid,
                    "endpoint": rec.endpoint,
                    "status": rec.status,
                    "backend": backend,
                    "prompt_tokens": rec.prompt_tokens,
                    "output_tokens": rec.output_tokens,
                    "ttft_ms": None if ttft is None else round(ttft * 1e3, 3),
                    "e2e_ms": round((rec.finish - rec.arrival) * 1e3, 3),
                    "error": rec.error,
                },
            )

    def _record(self, rec: _Record, given_id: str | None) -> None:
        from scheduler.router.record import RouterRecord

        req = rec.req
        nan = float("nan")
        self.recorder.add(
            RouterRecord(
                row=rec.row,
                arrival_s=rec.arrival,
                request_id=given_id,
                dispatch_s=rec.dispatch if rec.dispatch >= 0 else nan,
                first_token_s=rec.first_token if rec.first_token >= 0 else nan,
                finish_s=rec.finish,
                prompt_tokens=max(rec.prompt_tokens, 0),
                cached_tokens=rec.cached_tokens,
                output_tokens=max(rec.output_tokens, 0),
                max_tokens=req.max_tokens if req is not None else 0,
                session_id=req.session_id if req is not None else None,
                slo_ttft_s=req.slo_ttft_s if req is not None else None,
                slo_tpot_s=req.slo_tpot_s if req is not None else None,
                instance=rec.instance,
                decode_instance=rec.decode_instance,
                outcome=rec.outcome,
                http_status=rec.status or None,
                error_message=rec.error,
                chunk_times_s=rec.chunk_times,
                prefix_hashes=req.prefix_hashes if req is not None else None,
                block_tokens=req.block_tokens if req is not None else None,
                model=rec.model,
            )
        )


_PATHS = {v: k for k, v in GENERATION_PATHS.items()}


def _note_usage(rec: _Record, prompt: int, cached: int, output: int) -> None:
    if prompt >= 0:
        rec.prompt_tokens = prompt
    if cached >= 0:
        rec.cached_tokens = cached
    if output >= 0:
        rec.output_tokens = output
    elif rec.chunk_times is not None:
        rec.output_tokens = len(rec.chunk_times)


def _headers(scope: dict) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


def _ms_header(headers: dict[str, str], name: str) -> float | None:
    v = headers.get(name)
    if v is None:
        return None
    try:
        ms = float(v)
    except ValueError:
        raise _Reject(
            400, f"{name}: expected milliseconds (a number > 0); got {v!r}", name
        ) from None
    if not ms > 0 or ms == float("inf"):
        raise _Reject(400, f"{name}: expected milliseconds (a number > 0); got {v!r}", name)
    return ms / 1e3


def _budget(endpoint: str, body: dict[str, Any], chat_default: int) -> int:
    """The request's output budget (``max_tokens`` and its aliases), checked."""
    if endpoint == "generate":
        sp = body.get("sampling_params")
        if sp is None:
            return _DEFAULT_BUDGET["generate"]
        if not isinstance(sp, dict):
            raise _Reject(
                400, f"sampling_params: expected an object; got {sp!r}", "sampling_params"
            )
        name, value = "sampling_params.max_new_tokens", sp.get("max_new_tokens")
    elif endpoint == "chat" and body.get("max_completion_tokens") is not None:
        name, value = "max_completion_tokens", body["max_completion_tokens"]
    else:
        name, value = "max_tokens", body.get("max_tokens")
    if value is None:
        return _DEFAULT_BUDGET.get(endpoint, chat_default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _Reject(400, f"{name}: expected an integer >= 1; got {value!r}", name)
    return value


async def _read_body(receive: Callable, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise _ClientGone("client disconnected while sending the body")
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _Reject(413, f"the body is over {limit} bytes (max_body_bytes)")
        chunks.append(chunk)
        if not msg.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _read_all(resp: Any, timeout_s: float) -> bytes:
    try:
        async with asyncio.timeout(timeout_s):
            return await resp.read(limit=64 * 1024 * 1024)
    finally:
        resp.close()


class _Guard:
    """Watches a request from the side: the client going away, and a backend gone silent.

    Either cancels the handler's task, with the reason noted (``client`` or
    ``silent``), so that nothing wraps every await in a task or a timeout of
    its own: one task waits on the client's ``receive`` and one timer checks,
    every ``timeout_s``, that the stream made progress.
    """

    __slots__ = (
        "_handle",
        "_handler",
        "_loop",
        "_seen",
        "_task",
        "_timeout",
        "closed",
        "progress",
        "reason",
    )

    def __init__(self, receive: Callable, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._handler = asyncio.current_task()
        self._task = loop.create_task(receive())
        self._task.add_done_callback(self._client_done)
        self._handle: asyncio.TimerHandle | None = None
        self._timeout = 0.0
        self._seen = 0
        #: Bumped by the relay for every piece passed on.
        self.progress = 0
        self.reason: str | None = None
        self.closed = False

    def _client_done(self, task: asyncio.Task) -> None:
        if self.closed or task.cancelled() or task.exception() is not None:
            return
        if task.result().get("type") == "http.disconnect":
            self._fire("client")

    def _fire(self, reason: str) -> None:
        if self.reason is None and not self.closed and self._handler is not None:
            self.reason = reason
            self._handler.cancel()

    def watch_silence(self, timeout_s: float) -> None:
        """Cancel with ``silent`` if ``progress`` stands still for ``timeout_s``."""
        self._timeout, self._seen = timeout_s, self.progress
        self._handle = self._loop.call_later(timeout_s, self._check)

    def _check(self) -> None:
        if self.closed:
            return
        if self.progress == self._seen:
            self._fire("silent")
        else:
            self._seen = self.progress
            self._handle = self._loop.call_later(self._timeout, self._check)

    def stop_silence(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def claim(self, reason: str) -> bool:
        """After a CancelledError: whether it was this guard's, for ``reason`` (then undone)."""
        if self.reason != reason:
            return False
        self.reason = None
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            task.uncancel()
        return True

    def close(self) -> None:
        self.closed = True
        self.stop_silence()
        if not self._task.done():
            self._task.cancel()


class _Client:
    """The response to the client, over ASGI ``send``."""

    __slots__ = ("_rid", "_send", "guard", "started")

    def __init__(self, send: Callable, rid: str) -> None:
        self._send = send
        self._rid = rid.encode("latin-1", "replace")
        self.started = False
        self.guard: _Guard | None = None

    async def start(
        self, status: int, ctype: str = "application/json", extra: list | None = None
    ) -> None:
        self.started = True
        headers = [(b"content-type", ctype.encode("latin-1")), (b"x-request-id", self._rid)]
        if ctype.startswith("text/event-stream"):
            headers.append((b"cache-control", b"no-cache"))
        if extra:
            headers.extend(extra)
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self) -> None:
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def raw(self, status: int, data: bytes, ctype: str = "application/json") -> None:
        self.started = True
        headers = [
            (b"content-type", ctype.encode("latin-1")),
            (b"content-length", str(len(data)).encode()),
            (b"x-request-id", self._rid),
        ]
        await self._send({"type": "http.response.start", "status": status, "headers": headers})
        await self._send({"type": "http.response.body", "body": data, "more_body": False})

    async def error(
        self, status: int, message: str, param: str | None = None, extra: list | None = None
    ) -> None:
        if self.started:
            return
        data = error_body(status, message, param)
        self.started = True
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
            (b"x-request-id", self._rid),
            *(extra or []),
        ]
        await self._send({"type": "http.response.start", "status": status, "headers": headers})
        await self._send({"type": "http.response.body", "body": data, "more_body": False})


# -- the control endpoints ------------------------------------------------------------


class _WorkerBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str
    protocol: str | None = None
    role: str = "regular"
    name: str | None = None
    api_key: str | None = None
    bootstrap_port: int | None = None
    pools: tuple[str, ...] = ()


def control_app(router: Router) -> FastAPI:
    """``/health``, ``/readiness``, ``/metrics``, ``/v1/models`` and the admin API of ``router``."""
    app = FastAPI(title="llmsched router", docs_url=None, redoc_url=None, openapi_url=None)

    def err(
        status: int, message: str, param: str | None = None, headers: dict | None = None
    ) -> Response:
        return Response(
            error_body(status, message, param), status, headers, media_type="application/json"
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return err(404, f"no endpoint {request.method} {request.url.path}")
        if exc.status_code == 405:
            return err(405, f"{request.method} is not allowed on {request.url.path}")
        return err(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return err(
            400,
            f"{where}: {first.get('msg', 'invalid')}" if where else "invalid body",
            where or None,
        )

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> Response:
        log.exception("control endpoint failed", extra={"path": request.url.path})
        return err(500, f"internal router error ({type(exc).__name__}); see the router log")

    @app.get("/health")
    async def health() -> Response:
        if router.shutting_down:
            return err(503, "the router is shutting down")
        return JSONResponse({"status": "ok"})

    @app.get("/readiness")
    async def readiness() -> Response:
        ok, why = router.ready()
        if router.shutting_down:
            ok, why = False, "the router is shutting down"
        return JSONResponse({"ready": ok, "detail": why}, 200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        if router.cluster is not None:
            for name, n in router.cluster.queue_depths().items():
                router.metrics.queue_depth(name, n)
            for b in router.backends:
                if b is not None:
                    router.metrics.inflight(
                        b.label, router.cluster.view.instance(b.instance_id).outstanding
                    )
        data, ctype = router.metrics.render()
        return Response(data, media_type=ctype)

    @app.get("/v1/models")
    async def models() -> Response:
        now = time.monotonic()
        cached = router._models_cache
        if cached is not None and now - cached[0] < 5.0:
            return Response(cached[1], media_type="application/json")
        assert router.client is not None and router.cluster is not None
        for b in router.backends:
            if b is None or not router.cluster.view.instance(b.instance_id).healthy:
                continue
            try:
                r = await router.client.get(b.config.url + "/v1/models", headers=b.auth_headers)
            except httpx.HTTPError:
                continue
            if r.status_code == 200:
                router._models_cache = (now, r.content)
                return Response(r.content, media_type="application/json")
        return err(503, "no healthy backend answered /v1/models")

    def admin(request: Request) -> Response | None:
        key = router.config.admin_key
        if key is None:
            return err(
                403, "the admin API is off: start the router with an admin key (--admin-key)"
            )
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), key.get_secret_value().encode()):
            return err(
                401,
                "admin API: missing or wrong bearer token",
                headers={"www-authenticate": "Bearer"},
            )
        return None

    def worker_info(b: Backend) -> dict[str, Any]:
        assert router.cluster is not None and router.health is not None
        view = router.cluster.view.instance(b.instance_id)
        return {
            "id": b.instance_id,
            "url": b.config.url,
            "name": b.label,
            "protocol": b.config.protocol,
            "role": b.config.role,
            "pools": list(b.config.pools),
            "available": view.healthy,
            "outstanding": view.outstanding,
            "health": router.health.state(b.instance_id),
        }

    @app.get("/workers")
    async def workers(request: Request) -> Response:
        if (denied := admin(request)) is not None:
            return denied
        return JSONResponse({"workers": [worker_info(b) for b in router.backends if b is not None]})

    @app.post("/workers")
    async def add_worker(request: Request) -> Response:
        if (denied := admin(request)) is not None:
            return denied
        try:
            data = orjson.loads(await request.body())
            spec = _WorkerBody.model_validate(data)
        except orjson.JSONDecodeError as exc:
            return err(400, f"the body is not valid JSON: {exc}")
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            return err(400, f"{where}: {first['msg']}", where or None)
        if not router.config.host_allowed(spec.url):
            return err(
                403,
                f"{spec.url}: host or scheme not allowed (allowed hosts: "
                f"{', '.join(router.config.allowed_hosts)}; schemes: {', '.join(router.config.allowed_schemes)})",
                "url",
            )
        if router.find_backend(spec.url) is not None:
            return err(409, f"{spec.url} is already a backend", "url")
        fields = spec.model_dump(exclude_none=True)
        fields.setdefault("protocol", _default_protocol(router))
        try:
            cfg = BackendConfig.model_validate(fields)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            return err(400, f"{where}: {first['msg']}", where or None)
        if (cfg.role == "regular") == router.config.pd:
            return err(400, f"role {cfg.role!r} does not fit this router's backends", "role")
        i = await router.add_backend(cfg)
        b = router.backends[i]
        assert b is not None
        return JSONResponse(worker_info(b), 201)

    @app.delete("/workers/{url:path}")
    async def remove_worker(url: str, request: Request) -> Response:
        if (denied := admin(request)) is not None:
            return denied
        i = router.find_backend(url)
        if i is None:
            return err(404, f"{url} is not a backend", "url")
        router.remove_backend(i)
        return JSONResponse({"removed": url})

    return app


def _default_protocol(router: Router) -> str:
    for b in router.backends:
        if b is not None:
            return b.config.protocol
    return "vllm"
