"""Prefill/decode roles of an emulated instance, with SGLang's and vLLM's handshakes.

Under prefill/decode disaggregation a router sends a request's prompt to a
*prefill* server and lets a *decode* server produce the rest, once the KV
cache has moved between them. Each engine family has its own handshake,
and the emulator speaks both, so a real router (``sglang-router``,
``vllm-router``) can drive emulated PD pairs:

* **SGLang** (``disaggregation_mode`` ``prefill`` / ``decode``): the router
  adds ``bootstrap_host``, ``bootstrap_port`` and ``bootstrap_room`` (the
  prefill server's address, its bootstrap port and a random 63-bit room)
  to the request body and sends the *same* request to a prefill and a
  decode server at once. The prefill server computes the prompt and
  answers with the first token and ``finish_reason`` ``length`` (SGLang's
  prefill server does so once the transfer is done, with ``length`` 0; the
  router waits for both answers, so a client sees the decode server's
  timing either way); it serves a bootstrap endpoint on its bootstrap
  port (:func:`bootstrap_app`), from which the decode server learns when
  that room's prefill is done (real SGLang pushes this over ZMQ after an
  RDMA write; here the decode server long-polls
  ``GET /emulator/rooms/{room}``). The decode server counts the request
  as in flight from its arrival (:meth:`sim.engine.Engine.announce`),
  charges the KV transfer, then decodes and streams every token.
* **vLLM** (the NIXL connector's ``kv_transfer_params``): the router first
  sends the prefill server the request with ``max_tokens`` 1, no stream,
  and ``kv_transfer_params`` ``{"do_remote_decode": true, ...}``; the
  prefill server answers with ``kv_transfer_params`` naming itself
  (``remote_engine_id``, ``remote_host``, ``remote_port``,
  ``remote_block_ids``, ``do_remote_prefill: true``), which the router
  passes on in the decode request; the decode server charges the transfer
  and decodes. It need not ask the prefill server anything: the prefill
  is done when its response came back.

The transfer takes :meth:`scheduler.cost_model.StepCost.kv_transfer_time_s`
of the prompt's tokens (emulated seconds), counted from when the decode
server learns the prefill is done; the decode server's first token is the
prefill's, delivered when the KV cache lands, as :mod:`sim.loop` hands off
in the simulator. ``GET /emulator/pd`` on a PD instance says what it saw
(handshakes, rooms, transfer seconds charged), for tests and debugging.

Simplifications: block ids are the emulator's own numbering (the real
connector's are the prefill engine's KV blocks); the decode server does not
tell the prefill server to free them (the prefill engine frees a request's
KV slots at hand-off, :mod:`sim.engine`); a decode request with no
handshake is served by SGLang's decode server with a 400 and by vLLM's as
an ordinary request (prefill and decode on the decode instance), as the
real ones do.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse

from sim.emulator.instance import EmulatedInstance, TokenStream

__all__ = [
    "DEFAULT_BOOTSTRAP_PORT",
    "ROLES",
    "ROOM_WAIT_S",
    "Handshake",
    "PdRole",
    "bootstrap_app",
]

#: ``--role`` values: ``regular`` is the mixed (non-disaggregated) server.
ROLES: tuple[str, ...] = ("regular", "prefill", "decode")
#: SGLang's default ``--disaggregation-bootstrap-port``.
DEFAULT_BOOTSTRAP_PORT = 8998
#: How long (wall seconds) a decode server waits for a room's prefill.
ROOM_WAIT_S = 60.0
#: Rooms whose outcome is kept for a decode server that has not asked yet.
_MAX_ROOMS = 4096


class Handshake(ValueError):
    """A PD request whose handshake fields are missing or malformed (a 400)."""


class PdRole:
    """The PD side of one instance: handshakes in, transfer charged, what was seen.

    Args:
        instance: the emulated instance (its engine built with this role).
        role: ``prefill`` or ``decode``.
        protocol: ``sglang`` or ``vllm`` (whose handshake).
        host: the address the instance is reached at (named in handshakes).
        port: the instance's HTTP port.
        bootstrap_port: a prefill instance's bootstrap port.
    """

    def __init__(
        self,
        instance: EmulatedInstance,
        role: str,
        protocol: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        bootstrap_port: int | None = None,
    ) -> None:
        if role not in ("prefill", "decode"):
            raise ValueError(f"role: expected prefill or decode; got {role!r}")
        self.instance = instance
        self.role = role
        self.protocol = protocol
        self.host = host
        self.port = port
        self.bootstrap_port = bootstrap_port
        self.engine_id = f"llmsched-emulator-{uuid.uuid4().hex[:12]}"
        self._rooms: OrderedDict[int, asyncio.Future] = OrderedDict()
        self._room_of: dict[str, int] = {}
        self._block_ids = itertools.count()
        self._tasks: set[asyncio.Task] = set()
        self._client: httpx.AsyncClient | None = None
        #: What was seen: PD requests by handshake, transfers and their seconds.
        self.n_handshakes = 0
        self.n_transfers = 0
        self.kv_transfer_s_total = 0.0
        self.rooms_seen: list[int] = []
        self.kv_params_seen: list[dict] = []
        self.errors: list[str] = []
        instance.add_hooks(self)

    # -- requests ------------------------------------------------------------------

    def submit(
        self, prompt_ids: Sequence[int], max_tokens: int, request_id: str, extra: dict[str, Any]
    ) -> TokenStream:
        """Queue a request that arrived with ``extra`` (the body's unknown fields); its stream.

        Raises:
            Handshake: the handshake fields are missing or malformed.
            sim.emulator.instance.Rejected: the request can never fit.
        """
        if self.role == "prefill":
            return self._prefill(prompt_ids, max_tokens, request_id, extra)
        return self._decode(prompt_ids, max_tokens, request_id, extra)

    def response_fields(self, s: TokenStream) -> dict[str, Any]:
        """Fields to add to a finished non-streamed response (vLLM's ``kv_transfer_params``)."""
        if self.protocol != "vllm":
            return {}
        if self.role != "prefill" or self._room_of.pop(s.request_id, None) is None:
            return {"kv_transfer_params": None}
        blocks = math.ceil(s.prompt_tokens / self.instance.block_tokens)
        first = next(self._block_ids)
        port = self.bootstrap_port if self.bootstrap_port is not None else self.port
        for _ in range(blocks - 1):
            next(self._block_ids)
        return {
            "kv_transfer_params": {
                "do_remote_prefill": True,
                "do_remote_decode": False,
                "remote_block_ids": list(range(first, first + blocks)),
                "remote_engine_id": self.engine_id,
                "remote_host": self.host,
                "remote_port": port,
                "tp_size": 1,
                "remote_request_id": s.request_id,
            }
        }

    def server_info(self) -> dict[str, Any]:
        """SGLang's ``/get_server_info`` fields of a PD server."""
        return {
            "disaggregation_mode": self.role,
            "disaggregation_bootstrap_port": self.bootstrap_port or DEFAULT_BOOTSTRAP_PORT,
            "disaggregation_transfer_backend": "fake",
        }

    def stats(self) -> dict[str, Any]:
        """What ``GET /emulator/pd`` answers."""
        return {
            "role": self.role,
            "protocol": self.protocol,
            "engine_id": self.engine_id,
            "bootstrap_port": self.bootstrap_port,
            "handshakes": self.n_handshakes,
            "transfers": self.n_transfers,
            "kv_transfer_s_total": self.kv_transfer_s_total,
            "rooms": self.rooms_seen[-100:],
            "kv_transfer_params": self.kv_params_seen[-100:],
            "errors": self.errors[-100:],
        }

    def _prefill(
        self, prompt_ids: Sequence[int], max_tokens: int, request_id: str, extra: dict[str, Any]
    ) -> TokenStream:
        room: int | None = None
        if self.protocol == "sglang":
            if extra.get("bootstrap_room") is not None:
                room = _room(extra)
        else:
            params = extra.get("kv_transfer_params")
            if isinstance(params, dict) and params.get("do_remote_decode"):
                self.kv_params_seen.append(dict(params))
                room = -1
        try:
            s = self.instance.submit(prompt_ids, max_tokens, request_id)
        except Exception as exc:
            if room is not None and room >= 0:
                self._resolve(room, {"room": room, "status": "failed", "error": str(exc)})
            raise
        # The prefill server answers with the first token only.
        s.max_tokens = 1
        if room is not None:
            self.n_handshakes += 1
            self._room_of[request_id] = room
            if room >= 0:
                self.rooms_seen.append(room)
                self._future(room)
        return s

    def _decode(
        self, prompt_ids: Sequence[int], max_tokens: int, request_id: str, extra: dict[str, Any]
    ) -> TokenStream:
        inst = self.instance
        if self.protocol == "sglang":
            room = _room(extra)
            host = extra.get("bootstrap_host")
            port = extra.get("bootstrap_port")
            if not isinstance(host, str) or not host:
                raise Handshake("a decode server needs bootstrap_host (set by the PD router)")
            if not isinstance(port, int) or isinstance(port, bool):
                raise Handshake("a decode server needs an integer bootstrap_port")
            s, req = inst.expect(prompt_ids, max_tokens, request_id)
            self.n_handshakes += 1
            self.rooms_seen.append(room)
            self._spawn(self._await_room(req, prompt_ids, host, port, room))
            return s
        params = extra.get("kv_transfer_params")
        if not isinstance(params, dict) or not params.get("do_remote_prefill"):
            return inst.submit(prompt_ids, max_tokens, request_id)
        missing = [k for k in ("remote_engine_id", "remote_host", "remote_port") if k not in params]
        if missing:
            raise Handshake(f"kv_transfer_params: missing {', '.join(missing)}")
        self.kv_params_seen.append(dict(params))
        s, req = inst.expect(prompt_ids, max_tokens, request_id)
        self.n_handshakes += 1
        self._charge(req, len(prompt_ids), 0)
        return s

    async def _await_room(
        self, req: Any, prompt_ids: Sequence[int], host: str, port: int, room: int
    ) -> None:
        """Long-poll the prefill server's bootstrap port until ``room`` is prefilled, then charge."""
        url = f"http://{host}:{port}/emulator/rooms/{room}"
        if self._client is None:
            # One client for every room: a long-poll per request in flight, no pool limit.
            self._client = httpx.AsyncClient(
                timeout=ROOM_WAIT_S + 5.0,
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            )
        try:
            r = await self._client.get(url, params={"wait_s": ROOM_WAIT_S})
            info = r.json()
            if r.status_code != 200 or info.get("status") != "done":
                raise RuntimeError(info.get("error") or info.get("status") or r.status_code)
        except Exception as exc:  # the room never came: end the stream, say why
            why = f"KV transfer of room {room} from {host}:{port} failed: {exc}"
            self.errors.append(why)
            self.instance.abandon(req, why)
            return
        self._charge(req, len(prompt_ids), int(info.get("cached_tokens", 0)))

    def _charge(self, req: Any, tokens: int, cached_tokens: int) -> None:
        """Land ``req`` after the cost model's transfer time of ``tokens`` tokens."""
        inst = self.instance
        xfer = float(inst.cost.kv_transfer_time_s(tokens))
        self.n_transfers += 1
        self.kv_transfer_s_total += xfer
        timer = inst.timer
        assert timer is not None, "start() first"
        timer.call_at(timer.now + xfer, lambda: inst.land(req, cached_tokens=cached_tokens))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- rooms (prefill side) --------------------------------------------------------

    def _future(self, room: int) -> asyncio.Future:
        fut = self._rooms.get(room)
        if fut is None:
            fut = self._rooms[room] = asyncio.get_running_loop().create_future()
            while len(self._rooms) > _MAX_ROOMS:
                self._rooms.popitem(last=False)
        return fut

    def _resolve(self, room: int, info: dict[str, Any]) -> None:
        fut = self._future(room)
        if not fut.done():
            fut.set_result(info)

    async def wait_room(self, room: int, wait_s: float) -> dict[str, Any] | None:
        """The outcome of ``room``'s prefill once known (None after ``wait_s`` wall seconds)."""
        fut = self._future(room)
        try:
            info = await asyncio.wait_for(asyncio.shield(fut), timeout=wait_s)
        except TimeoutError:
            return None
        self._rooms.pop(room, None)
        return info

    # -- the instance's hooks ------------------------------------------------------

    def on_start(self, s: TokenStream) -> None:
        pass

    def on_first_token(self, s: TokenStream) -> None:
        pass

    def on_token(self, s: TokenStream, gap_s: float) -> None:
        pass

    def on_finish(self, s: TokenStream) -> None:
        if self.role != "prefill":
            return
        room = self._room_of.get(s.request_id)
        if self.protocol == "sglang":
            self._room_of.pop(s.request_id, None)
        if room is not None and room >= 0:
            self._resolve(
                room,
                {
                    "room": room,
                    "status": "done",
                    "prompt_tokens": s.prompt_tokens,
                    "cached_tokens": s.cached_tokens,
                    "output_ids": self.instance.output_ids(0, s.n_tokens),
                },
            )


def _room(extra: dict[str, Any]) -> int:
    room = extra.get("bootstrap_room")
    if not isinstance(room, int) or isinstance(room, bool) or room < 0:
        raise Handshake(
            f"bootstrap_room: expected a non-negative integer (set by the PD router); got {room!r}"
        )
    return room


def bootstrap_app(pd: PdRole) -> FastAPI:
    """The prefill server's bootstrap endpoint (served on its bootstrap port).

    ``GET /health``: ``OK``; ``GET /route``: the prefill server's parallel
    layout, as SGLang's bootstrap server gives it to a decode server;
    ``GET /emulator/rooms/{room}?wait_s=S``: waits until that room's prefill
    is done and answers ``{"status": "done", "prompt_tokens", "cached_tokens",
    "output_ids"}`` (``failed`` with ``error`` when the prefill server refused
    it; 404 ``unknown`` when nothing came within ``S`` wall seconds).
    """
    app = FastAPI(title="llmsched emulated bootstrap server", docs_url=None, redoc_url=None)

    @app.get("/health")
    async def health() -> PlainTextResponse:
        return PlainTextResponse("OK")

    @app.get("/route")
    async def route() -> dict:
        return {
            "prefill_attn_tp_size": 1,
            "prefill_dp_size": 1,
            "prefill_pp_size": 1,
            "prefill_page_size": pd.instance.block_tokens,
            "rank_ip": pd.host,
            "rank_port": pd.bootstrap_port,
        }

    @app.get("/emulator/rooms/{room}")
    async def room(room: int, wait_s: float = 10.0) -> JSONResponse:
        info = await pd.wait_room(room, max(0.0, min(wait_s, ROOM_WAIT_S)))
        if info is None:
            return JSONResponse({"room": room, "status": "unknown"}, status_code=404)
        return JSONResponse(info)

    return app
