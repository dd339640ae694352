"""Fault injection: an emulated instance that fails the way real servers fail, on purpose.

A :class:`FaultSpec` (the ``--fault-*`` flags of ``llmsched emulate``) says
what goes wrong; :class:`FaultInjector` wraps an instance's ASGI app and
makes it so. Only *generation* requests (``POST`` to ``/v1/completions``,
``/v1/chat/completions`` and SGLang's ``/generate``) count and draw faults;
``/health``, ``/metrics`` and the rest answer as usual, except under a hang.
The faults, each off by default:

* **errors** (``error_rate``, ``error_status``): a request is answered at
  once with that status and the server's error body (vLLM's
  ``{"error": {...}}``, SGLang's ``{"object": "error", ...}`` on its
  OpenAI endpoints and ``{"error": {"message"}}`` on ``/generate``); it
  never reaches the engine;
* **latency spikes** (``spike_rate``, ``spike_s``): the request reaches the
  engine ``spike_s`` later, as if the front end had stalled, so its first
  token (and everything after) comes that much later;
* **slow stream** (``chunk_delay_s``): every streamed chunk is held that
  long before it is written; tokens made meanwhile come together in the
  next chunk, as a slow network would deliver them;
* **cut stream** (``cut_after_chunks``): a streamed response is cut after
  that many chunks: the connection closes mid-body, no ``[DONE]``, no
  closing chunk of the HTTP framing;
* **hang** (``hang_after``): after that many generation requests the
  instance accepts connections and reads requests, then never answers any
  (health checks included) until the process stops;
* **crash** (``crash_after``): the generation request after that many ends
  the process at once (exit status :data:`CRASH_EXIT_STATUS`), every
  instance of it and every request in flight with it.

Times are emulated seconds, like everything the emulator reports: at
``--time-scale 10`` a 1 s spike lasts 0.1 wall seconds. Deterministic for a
seed: whether request ``k`` (the k-th generation request the instance
received, from 0) errs or spikes depends only on the seed, the instance and
``k`` (:meth:`FaultSpec.draws`), so a client sending one request at a time
sees the same faults on every run.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from traces.errors import ConfigError

__all__ = ["CRASH_EXIT_STATUS", "GENERATION_PATHS", "FaultInjector", "FaultSpec", "error_body"]

#: The exit status of an emulated crash.
CRASH_EXIT_STATUS = 3
#: The paths whose requests count and draw faults.
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/generate"})
#: uvicorn's complaint when an app ends a response early (what a cut does on purpose).
_UNFINISHED = "ASGI callable returned without completing response"


@dataclass(frozen=True)
class FaultSpec:
    """What goes wrong, and how often (see the module docstring)."""

    error_rate: float = 0.0
    error_status: int = 503
    spike_rate: float = 0.0
    spike_s: float = 0.0
    chunk_delay_s: float = 0.0
    cut_after_chunks: int | None = None
    hang_after: int | None = None
    crash_after: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for flag, rate in (
            ("--fault-error-rate", self.error_rate),
            ("--fault-spike-rate", self.spike_rate),
        ):
            if not (0.0 <= rate <= 1.0):
                raise ConfigError(f"{flag}: expected a probability from 0 to 1; got {rate!r}")
        if not 400 <= self.error_status <= 599:
            raise ConfigError(
                f"--fault-status: expected an HTTP error status (400-599); got {self.error_status!r}"
            )
        for flag, s in (
            ("--fault-spike-s", self.spike_s),
            ("--fault-chunk-delay-s", self.chunk_delay_s),
        ):
            if not (s >= 0.0 and math.isfinite(s)):
                raise ConfigError(f"{flag}: expected seconds >= 0; got {s!r}")
        for flag, n in (
            ("--fault-cut-after-chunks", self.cut_after_chunks),
            ("--fault-hang-after", self.hang_after),
            ("--fault-crash-after", self.crash_after),
        ):
            if n is not None and n < 0:
                raise ConfigError(f"{flag}: expected a count >= 0; got {n!r}")

    @property
    def active(self) -> bool:
        """Whether any fault is on."""
        return bool(
            self.error_rate > 0
            or (self.spike_rate > 0 and self.spike_s > 0)
            or self.chunk_delay_s > 0
            or self.cut_after_chunks is not None
            or self.hang_after is not None
            or self.crash_after is not None
        )

    def draws(self, instance_id: int, k: int) -> tuple[bool, bool]:
        """Whether generation request ``k`` of instance ``instance_id`` errs, and whether it spikes."""
        rng = random.Random(f"{self.seed}:{instance_id}:{k}")
        errs, spikes = rng.random(), rng.random()
        return errs < self.error_rate, spikes < self.spike_rate


def error_body(
    protocol: str, path: str, status: int, message: str, param: str | None = None
) -> dict[str, Any]:
    """The body a real ``protocol`` server sends with error ``status`` on ``path``.

    SGLang's ``/generate`` sends only a message; its OpenAI endpoints type an
    error by the status phrase (``BadRequest``); vLLM by an error class
    (``BadRequestError``, ``InternalServerError``).
    """
    phrase = HTTPStatus(status).phrase.replace(" ", "").replace("-", "")
    if path == "/generate":
        return {"error": {"message": message}}
    if protocol == "vllm":
        kind = phrase if phrase.endswith("Error") else phrase + "Error"
        return {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return {"object": "error", "message": message, "type": phrase, "param": param, "code": status}


class _Cut(Exception):
    """Raised into the app to end a stream that is cut on purpose."""


class _QuietCuts(logging.Filter):
    """Drops uvicorn's error line for a response cut or hung on purpose (it is not a bug)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_UNFINISHED)


class FaultInjector:
    """An ASGI app: ``app`` (one instance's) with the faults of ``spec``.

    Args:
        app: the instance's app (:func:`sim.emulator.app.build_app`).
        spec: the faults.
        protocol: ``vllm`` or ``sglang`` (the error bodies).
        instance_id: which instance (the draws differ per instance).
        time_scale: emulated seconds per wall second (delays are emulated seconds).
        crash: what a crash calls with the exit status (default: :func:`os._exit`).
    """

    def __init__(
        self,
        app: Callable[..., Any],
        spec: FaultSpec,
        protocol: str,
        *,
        instance_id: int = 0,
        time_scale: float = 1.0,
        crash: Callable[[int], Any] | None = None,
    ) -> None:
        self.app, self.spec, self.protocol = app, spec, protocol
        self.instance_id, self.time_scale = instance_id, time_scale
        self._crash = crash or os._exit
        #: Generation requests received.
        self.n_requests = 0
        #: Faults injected, by kind (``error``, ``spike``, ``cut``, ``hang``).
        self.injected: dict[str, int] = {}
        self._hung = asyncio.Event()  # never set: a hang waits on it until cancelled
        if spec.cut_after_chunks is not None or spec.hang_after is not None:
            logging.getLogger("uvicorn.error").addFilter(_QuietCuts())

    def _count(self, kind: str) -> None:
        self.injected[kind] = self.injected.get(kind, 0) + 1

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        spec = self.spec
        hang = spec.hang_after is not None and self.n_requests >= spec.hang_after
        generation = scope["method"] == "POST" and scope["path"] in GENERATION_PATHS
        if generation and not hang:
            k = self.n_requests
            self.n_requests += 1
            if spec.crash_after is not None and k >= spec.crash_after:
                print(
                    f"llmsched emulate: emulated crash at generation request {k + 1} "
                    f"(--fault-crash-after {spec.crash_after})",
                    file=sys.stderr,
                    flush=True,
                )
                self._crash(CRASH_EXIT_STATUS)
                return
            errs, spikes = spec.draws(self.instance_id, k)
            if errs:
                self._count("error")
                await self._error(scope, receive, send)
                return
            if spikes and spec.spike_s > 0:
                self._count("spike")
                await asyncio.sleep(spec.spike_s / self.time_scale)
        if hang:
            self._count("hang")
            try:
                await self._hung.wait()
            except asyncio.CancelledError:
                return  # the server is stopping: end without a word, as hung
            return
        if generation and (spec.chunk_delay_s > 0 or spec.cut_after_chunks is not None):
            await self._stream(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _error(self, scope: dict, receive: Callable, send: Callable) -> None:
        import json

        while True:  # read the body, so the connection stays usable
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        status = self.spec.error_status
        text = f"emulated fault: {HTTPStatus(status).phrase} (--fault-status {status})"
        body = json.dumps(error_body(self.protocol, scope["path"], status, text)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _stream(self, scope: dict, receive: Callable, send: Callable) -> None:
        spec = self.spec
        delay = spec.chunk_delay_s / self.time_scale
        streaming = False
        chunks = 0

        async def wrapped(message: dict) -> None:
            nonlocal streaming, chunks
            if message["type"] == "http.response.start":
                kinds = dict(message.get("headers", ()))
                ctype = kinds.get(b"content-type", b"")
                streaming = message["status"] == 200 and ctype.startswith(b"text/event-stream")
            elif streaming and message["type"] == "http.response.body" and message.get("body"):
                if spec.cut_after_chunks is not None and chunks >= spec.cut_after_chunks:
                    raise _Cut
                if delay > 0:
                    await asyncio.sleep(delay)
                chunks += 1
            await send(message)

        try:
            await self.app(scope, receive, wrapped)
        except _Cut:
            # Returning mid-response makes uvicorn close the connection: the cut.
            self._count("cut")
