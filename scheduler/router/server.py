"""Running the router: uvicorn on uvloop and httptools, JSON logs, graceful shutdown.

:class:`RouterServer` builds a :class:`scheduler.router.app.Router` from a
:class:`scheduler.router.config.RouterConfig` (the policy from the
registry, as the simulator builds it) and serves it until SIGINT or
SIGTERM. Shutting down is graceful: the router answers new requests 503,
lets the ones in flight finish for up to ``shutdown_grace_s``, then stops
the server, the health checks and the pollers, and flushes ``--record``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn

from scheduler import registry
from scheduler.router.app import Router
from scheduler.router.config import RouterConfig
from scheduler.serving import OwnedServer, stop_on_signals, wait_started
from traces.errors import ConfigError

__all__ = ["JsonFormatter", "RouterServer", "build_router", "running_in_thread", "setup_logging"]

log = logging.getLogger("llmsched.router")

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str) -> None:
    """JSON logs on stderr for the router (and uvicorn's errors)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("llmsched.router", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(level.upper())
        lg.propagate = False


def build_router(config: RouterConfig) -> Router:
    """The router of ``config``, its policy made by the registry (as the simulator makes it).

    Raises:
        ConfigError: an unknown policy or a bad parameter.
    """
    if config.decode_policy is not None:
        if not config.pd:
            raise ConfigError("decode_policy: needs prefill and decode backends")
        policy = registry.create_pd(
            config.policy,
            config.decode_policy,
            prefill_params=config.policy_params,
            decode_params=config.decode_policy_params,
            decode_choice=config.decode_choice,
        )
    else:
        policy = registry.create(config.policy, **config.policy_params)
    recorder = _recorder(config, policy.name) if config.record else None
    return Router(config, policy, recorder=recorder)


def _recorder(config: RouterConfig, policy: str) -> Any:
    """``--record``'s writer: the backends as instances, the options the policy was fed."""
    from scheduler.router.config import policy_role
    from scheduler.router.record import Recorder

    instances = [
        {
            "id": i,
            "name": b.label,
            "url": b.url,
            "role": policy_role(b.role),
            "pools": list(b.pools),
        }
        for i, b in enumerate(config.backends)
    ]
    options = {
        "policy_params": config.policy_params,
        "decode_policy": config.decode_policy,
        "poll_interval_s": config.poll_interval_s,
        "prefix_knowledge": "estimate",
        "batch_hints": "group",
        "tokenizer": config.tokenizer,
        "block_tokens": config.block_tokens,
    }
    assert config.record is not None
    return Recorder(
        config.record,
        policy=policy,
        instances=instances,
        target_url=f"http://{config.host}:{config.port}",
        options=options,
    )


class RouterServer:
    """Serves one router; see the module docstring."""

    def __init__(self, config: RouterConfig, router: Router | None = None) -> None:
        self.config = config
        self.router = router or build_router(config)
        self._server: OwnedServer | None = None
        self._stopping: asyncio.Task | None = None

    @property
    def started(self) -> bool:
        return self._server is not None and self._server.started

    @property
    def port(self) -> int:
        """The port listened on (the one picked, for ``port = 0``)."""
        s = self._server
        if s is not None and s.servers:
            return s.servers[0].sockets[0].getsockname()[1]
        return self.config.port

    def stop(self) -> None:
        """Begin a graceful shutdown (safe from a signal handler on the loop)."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._shutdown())

    async def _shutdown(self) -> None:
        done = await self.router.drain(self.config.shutdown_grace_s)
        if not done:
            log.warning(
                "shutdown grace over with requests in flight",
                extra={"in_flight": self.router.active},
            )
        if self._server is not None:
            self._server.should_exit = True

    async def serve(self, *, handle_signals: bool = True) -> None:
        """Start the router on the running loop and serve until :meth:`stop` or a signal."""
        await self.router.start()
        cfg = uvicorn.Config(
            self.router,
            host=self.config.host,
            port=self.config.port,
            http="httptools",
            loop="none",
            log_level="warning",
            log_config=None,  # keep setup_logging's JSON handler on uvicorn's logger
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=max(1, int(self.config.shutdown_grace_s)),
            timeout_keep_alive=30,
            backlog=4096,
            # The router is the edge a proxy header would name; and the hot path
            # does without the middleware and the per-response server header.
            proxy_headers=False,
            server_header=False,
        )
        self._server = OwnedServer(cfg)
        try:
            ok, why = self.router.ready()
            log.info(
                "router listening",
                extra={
                    "host": self.config.host,
                    "port": self.config.port,
                    "policy": self.router.policy.name,
                    "backends": [b.label for b in self.router.backends if b is not None],
                    "ready": ok,
                    "detail": why,
                },
            )
            with stop_on_signals(self.stop, handle_signals):
                await self._server.serve()
        finally:
            await self.router.stop()


def run(config: RouterConfig) -> None:
    """Serve ``config`` on uvloop (when installed) until SIGINT or SIGTERM."""
    setup_logging(config.log_level)
    server = RouterServer(config)
    try:
        import uvloop
    except ImportError:  # pragma: no cover (a platform without uvloop)
        asyncio.run(server.serve())
    else:
        uvloop.run(server.serve())


@contextlib.contextmanager
def running_in_thread(config: RouterConfig, *, timeout_s: float = 10.0) -> Iterator[RouterServer]:
    """Serve ``config`` from a background thread's event loop while the block runs (tests).

    Raises:
        RuntimeError: the router did not start within ``timeout_s``.
    """
    server = RouterServer(config)
    failed: list[BaseException] = []
    loop_box: list[asyncio.AbstractEventLoop] = []

    async def main() -> None:
        loop_box.append(asyncio.get_running_loop())
        await server.serve(handle_signals=False)

    def target() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # reported to the caller below
            failed.append(exc)

    thread = threading.Thread(target=target, name="llmsched-router", daemon=True)
    thread.start()
    try:
        if not wait_started(thread, lambda: server.started, failed, timeout_s):
            raise RuntimeError(f"router did not start: {failed or 'timeout'}")
        yield server
    finally:
        if loop_box:
            loop_box[0].call_soon_threadsafe(server.stop)
        thread.join(timeout=timeout_s + server.config.shutdown_grace_s)
