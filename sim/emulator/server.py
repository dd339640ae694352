"""Serving emulated instances: N instances on N consecutive ports, one process, one event loop.

:func:`build_instances` makes the instances exactly as the simulator makes
its engines (:func:`sim.runner.build_engine` on a
:class:`sim.specs.ClusterSpec`, so ``--profile`` and the engine-limit flags
mean what they mean to ``llmsched simulate``); :class:`EmulatorServer` puts
each behind its own uvicorn server on ``port``, ``port + 1``, ... and stops
them all on SIGINT or SIGTERM (uvicorn's own per-server signal handling is
off: several servers on one loop would take the signal from each other).
Every instance is independent: its own engine, cache, metrics and clock.

The role of an instance is ``mixed`` today; prefill and decode roles (and
their PD handshakes) will be one more argument here and in the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn

from scheduler.hardware import model_spec
from sim.emulator.app import build_app
from sim.emulator.instance import EmulatedInstance
from sim.specs import ClusterSpec
from traces.hashing import DEFAULT_BLOCK_TOKENS
from traces.tokenizer import Tokenizer, load_tokenizer

__all__ = ["EmulatorConfig", "EmulatorServer", "build_instances", "running_in_thread"]


@dataclass(frozen=True)
class EmulatorConfig:
    """What ``llmsched emulate`` serves.

    ``limits``: ``[cluster.limits]`` keys (:data:`sim.limits.LIMIT_OPTIONS`);
    ``time_scale``: emulated seconds per wall second; ``block_tokens``: the
    prefix-cache block; ``seed``: the output tokens.
    """

    protocol: str = "vllm"
    model: str = "llama-3.1-8b"
    gpu: str = "h100"
    tp: int = 1
    profile: str | None = None
    limits: dict[str, Any] | None = None
    time_scale: float = 1.0
    tokenizer: str | None = None
    instances: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    seed: int = 0
    block_tokens: int = DEFAULT_BLOCK_TOKENS

    def cluster(self) -> ClusterSpec:
        """The cluster spec the simulator would build these instances from.

        Raises:
            pydantic.ValidationError: a bad model, GPU, profile or limit.
        """
        return ClusterSpec.model_validate(
            {
                "model": self.model,
                "gpu": self.gpu,
                "tp": self.tp,
                "profile": self.profile,
                "instances": self.instances,
                "limits": self.limits or {},
            }
        )


def build_instances(
    config: EmulatorConfig, tokenizer: Tokenizer | None = None
) -> list[EmulatedInstance]:
    """The instances of ``config``, not yet started (see :meth:`EmulatedInstance.start`)."""
    from sim.runner import build_engine

    if not config.time_scale > 0:
        from traces.errors import ConfigError

        raise ConfigError(f"--time-scale: expected a number > 0; got {config.time_scale!r}")
    cost, limits = build_engine(config.cluster())
    tok = tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer)
    return [
        EmulatedInstance(
            cost,
            limits,
            tok,
            instance_id=i,
            time_scale=config.time_scale,
            block_tokens=config.block_tokens,
            seed=config.seed,
        )
        for i in range(config.instances)
    ]


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to :class:`EmulatorServer`."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class EmulatorServer:
    """The instances of ``config`` served on consecutive ports from ``config.port``."""

    def __init__(self, config: EmulatorConfig, tokenizer: Tokenizer | None = None) -> None:
        self.config = config
        self.instances = build_instances(config, tokenizer)
        self.context_length = model_spec(config.model).context_length
        self._servers: list[_Server] = []

    @property
    def ports(self) -> list[int]:
        """The port of each instance."""
        return [self.config.port + i for i in range(len(self.instances))]

    @property
    def started(self) -> bool:
        """Whether every server accepts connections."""
        return bool(self._servers) and all(s.started for s in self._servers)

    def stop(self) -> None:
        """Ask every server to finish (safe from a signal handler or the loop)."""
        for s in self._servers:
            s.should_exit = True

    async def serve(self, *, handle_signals: bool = True) -> None:
        """Start the instances on the running loop and serve until :meth:`stop` or a signal."""
        loop = asyncio.get_running_loop()
        c = self.config
        for inst, port in zip(self.instances, self.ports, strict=True):
            inst.start(loop)
            app = build_app(inst, c.protocol, c.model, context_length=self.context_length)  # type: ignore[arg-type]
            cfg = uvicorn.Config(
                app,
                host=c.host,
                port=port,
                log_level="warning",
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=2,
            )
            self._servers.append(_Server(cfg))
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.stop)
        try:
            await asyncio.gather(*(s.serve() for s in self._servers))
        finally:
            if handle_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)


@contextlib.contextmanager
def running_in_thread(
    config: EmulatorConfig, tokenizer: Tokenizer | None = None, *, timeout_s: float = 10.0
) -> Iterator[EmulatorServer]:
    """Serve ``config`` from a background thread's event loop while the block runs (tests, notebooks).

    Raises:
        RuntimeError: the servers did not start within ``timeout_s``.
    """
    server = EmulatorServer(config, tokenizer)
    failed: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(server.serve(handle_signals=False))
        except BaseException as exc:  # reported to the caller below
            failed.append(exc)

    thread = threading.Thread(target=run, name="llmsched-emulator", daemon=True)
    thread.start()
    try:
        for _ in range(int(timeout_s / 0.01)):
            if server.started or failed or not thread.is_alive():
                break
            threading.Event().wait(0.01)
        if not server.started:
            raise RuntimeError(
                f"emulator did not start on ports {server.ports}: {failed or 'timeout'}"
            )
        yield server
    finally:
        server.stop()
        thread.join(timeout=timeout_s)
