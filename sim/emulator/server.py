"""Serving emulated instances: N instances on N consecutive ports, one process, one event loop.

:func:`build_instances` makes the instances exactly as the simulator makes
its engines (:func:`sim.runner.build_engine` on a
:class:`sim.specs.ClusterSpec`, so ``--profile`` and the engine-limit flags
mean what they mean to ``llmsched simulate``); :class:`EmulatorServer` puts
each behind its own uvicorn server on ``port``, ``port + 1``, ... and stops
them all on SIGINT or SIGTERM (uvicorn's own per-server signal handling is
off: several servers on one loop would take the signal from each other).
Every instance is independent: its own engine, cache, metrics and clock.

``role`` makes every instance a prefill or a decode server of a PD pair
(:mod:`sim.emulator.pd`, SGLang's or vLLM's handshake by protocol); a
prefill instance also serves its bootstrap endpoint on ``bootstrap_port``,
``bootstrap_port + 1``, ... in the same process.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn

from scheduler.hardware import model_spec
from scheduler.serving import OwnedServer, stop_on_signals, wait_started
from sim.emulator.app import build_app
from sim.emulator.faults import FaultInjector, FaultSpec
from sim.emulator.instance import EmulatedInstance
from sim.emulator.pd import DEFAULT_BOOTSTRAP_PORT, ROLES, PdRole, bootstrap_app
from sim.specs import ClusterSpec
from traces.hashing import DEFAULT_BLOCK_TOKENS
from traces.tokenizer import Tokenizer, load_tokenizer

__all__ = ["EmulatorConfig", "EmulatorServer", "build_instances", "running_in_thread"]


@dataclass(frozen=True)
class EmulatorConfig:
    """What ``llmsched emulate`` serves.

    ``limits``: ``[cluster.limits]`` keys (:data:`sim.limits.LIMIT_OPTIONS`);
    ``time_scale``: emulated seconds per wall second; ``block_tokens``: the
    prefix-cache block; ``seed``: the output tokens (and the fault draws);
    ``faults``: what goes wrong on purpose (:mod:`sim.emulator.faults`).
    """

    protocol: str = "vllm"
    model: str = "llama-3.1-8b"
    gpu: str = "h100"
    tp: int = 1
    profile: str | None = None
    #: Whose scheduler and limits the instances follow (``sglang`` or ``vllm``).
    engine: str = "sglang"
    limits: dict[str, Any] | None = None
    time_scale: float = 1.0
    tokenizer: str | None = None
    instances: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    seed: int = 0
    block_tokens: int = DEFAULT_BLOCK_TOKENS
    #: ``regular``, ``prefill`` or ``decode`` (:mod:`sim.emulator.pd`); a prefill
    #: instance serves its bootstrap endpoint on ``bootstrap_port`` (+ i).
    role: str = "regular"
    bootstrap_port: int = DEFAULT_BOOTSTRAP_PORT
    faults: FaultSpec | None = None

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
                "engine": self.engine,
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
    if config.role not in ROLES:
        from traces.errors import ConfigError

        raise ConfigError(f"--role: expected one of {', '.join(ROLES)}; got {config.role!r}")
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
            role="mixed" if config.role == "regular" else config.role,
        )
        for i in range(config.instances)
    ]


class EmulatorServer:
    """The instances of ``config`` served on consecutive ports from ``config.port``."""

    def __init__(self, config: EmulatorConfig, tokenizer: Tokenizer | None = None) -> None:
        self.config = config
        self.instances = build_instances(config, tokenizer)
        self.context_length = model_spec(config.model).context_length
        self._servers: list[OwnedServer] = []
        #: The PD side of each instance (prefill or decode roles only).
        self.pd_roles: list[PdRole] = []

    @property
    def ports(self) -> list[int]:
        """The port of each instance."""
        return [self.config.port + i for i in range(len(self.instances))]

    @property
    def bootstrap_ports(self) -> list[int]:
        """The bootstrap port of each prefill instance (none for other roles)."""
        if self.config.role != "prefill":
            return []
        return [self.config.bootstrap_port + i for i in range(len(self.instances))]

    def _pd_role(self, inst: EmulatedInstance, port: int) -> PdRole | None:
        c = self.config
        if c.role == "regular":
            return None
        boot = self.bootstrap_ports[inst.instance_id] if c.role == "prefill" else None
        pd = PdRole(inst, c.role, c.protocol, host=c.host, port=port, bootstrap_port=boot)
        self.pd_roles.append(pd)
        return pd

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
            pd = self._pd_role(inst, port)
            app: Any = build_app(
                inst,
                c.protocol,  # type: ignore[arg-type]
                c.model,
                context_length=self.context_length,
                pd=pd,
            )
            if c.faults is not None and c.faults.active:
                app = FaultInjector(
                    app, c.faults, c.protocol, instance_id=inst.instance_id, time_scale=c.time_scale
                )
            self._servers.append(OwnedServer(_quiet(app, c.host, port)))
            if pd is not None and pd.role == "prefill" and pd.bootstrap_port is not None:
                boot = _quiet(bootstrap_app(pd), c.host, pd.bootstrap_port)
                self._servers.append(OwnedServer(boot))
        with stop_on_signals(self.stop, handle_signals):
            await asyncio.gather(*(s.serve() for s in self._servers))


def _quiet(app: Any, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=2,
    )


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
        if not wait_started(thread, lambda: server.started, failed, timeout_s):
            raise RuntimeError(
                f"emulator did not start on ports {server.ports}: {failed or 'timeout'}"
            )
        yield server
    finally:
        server.stop()
        thread.join(timeout=timeout_s)
