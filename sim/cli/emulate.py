"""``llmsched emulate``: serve the simulator's engine model over SGLang's or vLLM's HTTP API.

Example::

    llmsched emulate --protocol vllm --model llama-3.1-8b --gpu h100 --port 8000
    llmsched emulate --protocol sglang --model qwen2.5-32b --gpu h200 --tp 2 \\
        --instances 8 --port 30000 --time-scale 10 --max-running-requests 64

serves one emulated instance per port (``--instances 8``: ports 30000 to
30007, one process, one event loop) until Ctrl-C or SIGTERM. The engine
model and its limits take the flags of ``llmsched simulate`` (``--engine``,
default ``sglang`` whatever the protocol; ``--engine vllm`` for vLLM's
scheduler, limit names and defaults), so an emulated instance steps exactly
as a simulated one given the same flags.

The ``--fault-*`` flags make it fail on purpose (:mod:`sim.emulator.faults`)::

    llmsched emulate --port 8000 --fault-error-rate 0.1 --fault-status 503
    llmsched emulate --port 8000 --fault-spike-rate 0.05 --fault-spike-s 2
    llmsched emulate --port 8000 --fault-cut-after-chunks 5 --fault-crash-after 1000

``--role prefill|decode`` makes a PD pair with the protocol's handshake
(:mod:`sim.emulator.pd`), e.g. behind ``sglang-router launch
--pd-disaggregation --prefill http://127.0.0.1:30000 8998 --decode
http://127.0.0.1:30001``::

    llmsched emulate --protocol sglang --role prefill --port 30000 --bootstrap-port 8998
    llmsched emulate --protocol sglang --role decode --port 30001
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from sim.cli._common import NO_CLUSTER_FLAGS, ClusterFlags, cluster_flags, console, errors_to_exit

__all__ = ["emulate"]


class _Protocol(StrEnum):
    sglang = "sglang"
    vllm = "vllm"


class _Role(StrEnum):
    regular = "regular"
    prefill = "prefill"
    decode = "decode"


@cluster_flags
def emulate(
    port: Annotated[int, typer.Option(help="Port of the first instance (the next ones follow).")],
    protocol: Annotated[_Protocol, typer.Option(help="Wire protocol to speak.")] = _Protocol.vllm,
    model: Annotated[str, typer.Option(help="Served model, e.g. llama-3.1-8b.")] = "llama-3.1-8b",
    gpu: Annotated[str, typer.Option(help="GPU of every instance, e.g. h100.")] = "h100",
    tp: Annotated[int, typer.Option(help="Tensor parallelism of each instance.", min=1)] = 1,
    profile: Annotated[
        Path | None, typer.Option(help="Calibrated cost profile (llmsched calibrate).")
    ] = None,
    cluster: ClusterFlags = NO_CLUSTER_FLAGS,  # replaced by the flags (cluster_flags)
    time_scale: Annotated[
        float,
        typer.Option(
            help="Emulated seconds per wall second (10: ten times faster than a GPU).", min=0.0
        ),
    ] = 1.0,
    tokenizer: Annotated[
        Path | None,
        typer.Option(help="HF tokenizer.json of the served model (default: one token per word)."),
    ] = None,
    instances: Annotated[
        int, typer.Option(help="Independent instances, one port each.", min=1)
    ] = 1,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    seed: Annotated[int, typer.Option(help="Seed of the output tokens.")] = 0,
    block_tokens: Annotated[
        int, typer.Option(help="Tokens per prefix-cache block (hashing of prompts).", min=1)
    ] = 16,
    role: Annotated[
        _Role,
        typer.Option(
            help="Prefill or decode server of a PD pair (the protocol's handshake), or regular."
        ),
    ] = _Role.regular,
    bootstrap_port: Annotated[
        int,
        typer.Option(help="A prefill instance's bootstrap port (the next ones follow).", min=1),
    ] = 8998,
    fault_error_rate: Annotated[
        float,
        typer.Option(help="Share of generation requests answered with --fault-status.", min=0.0),
    ] = 0.0,
    fault_status: Annotated[
        int, typer.Option(help="HTTP status of an injected error (429, 500, 503...).")
    ] = 503,
    fault_spike_rate: Annotated[
        float, typer.Option(help="Share of generation requests held --fault-spike-s.", min=0.0)
    ] = 0.0,
    fault_spike_s: Annotated[
        float, typer.Option(help="Seconds a latency spike adds before the first token.", min=0.0)
    ] = 0.0,
    fault_chunk_delay_s: Annotated[
        float, typer.Option(help="Seconds every streamed chunk is held (a slow stream).", min=0.0)
    ] = 0.0,
    fault_cut_after_chunks: Annotated[
        int | None, typer.Option(help="Cut every stream after this many chunks.", min=0)
    ] = None,
    fault_hang_after: Annotated[
        int | None,
        typer.Option(help="After this many generation requests, answer nothing more.", min=0),
    ] = None,
    fault_crash_after: Annotated[
        int | None,
        typer.Option(help="Exit (status 3) on the generation request after this many.", min=0),
    ] = None,
) -> None:
    """Serve emulated instances: the simulator's engine in real time behind a real server's API.

    The emulated model always produces max_tokens tokens; prompts are counted
    by the tokenizer; a repeated prefix hits the prefix cache.
    """
    with errors_to_exit():
        import asyncio

        from sim.emulator.faults import FaultSpec
        from sim.emulator.server import EmulatorConfig, EmulatorServer

        options = {k: v for k, v in cluster.options.items() if k != "engine"}
        # As in simulate, so that an emulated instance steps as a simulated one
        # with the same flags, whatever protocol it speaks.
        engine = cluster.options.get("engine", "sglang")
        if options:
            console.print(
                "[yellow]warning:[/yellow] simulator options ("
                + ", ".join(sorted(options))
                + ") concern policies, not an engine; emulate ignores them",
                highlight=False,
            )
        config = EmulatorConfig(
            protocol=protocol.value,
            model=model,
            gpu=gpu,
            tp=tp,
            profile=None if profile is None else str(profile),
            engine=engine,
            limits=cluster.limits,
            time_scale=time_scale,
            tokenizer=None if tokenizer is None else str(tokenizer),
            instances=instances,
            host=host,
            port=port,
            seed=seed,
            block_tokens=block_tokens,
            role=role.value,
            bootstrap_port=bootstrap_port,
            faults=FaultSpec(
                error_rate=fault_error_rate,
                error_status=fault_status,
                spike_rate=fault_spike_rate,
                spike_s=fault_spike_s,
                chunk_delay_s=fault_chunk_delay_s,
                cut_after_chunks=fault_cut_after_chunks,
                hang_after=fault_hang_after,
                crash_after=fault_crash_after,
                seed=seed,
            ),
        )
        server = EmulatorServer(config)
        first, last = server.ports[0], server.ports[-1]
        where = f"{host}:{first}" if first == last else f"{host}:{first}-{last}"
        limits = server.instances[0].limits
        if role is not _Role.regular:
            boot = server.bootstrap_ports
            where_boot = f"{boot[0]}" + (f"-{boot[-1]}" if len(boot) > 1 else "") if boot else ""
            console.print(
                f"Role {role.value}" + (f"; bootstrap port {where_boot}" if boot else ""),
                highlight=False,
            )
        console.print(
            f"Emulating {instances} x {model} on {gpu} (tp {tp}) over {protocol.value}'s API "
            f"at {where}; {engine} engine; time scale {time_scale:g}; "
            + (
                f"max_num_seqs {limits.max_running_requests}, "
                f"max_num_batched_tokens {limits.max_prefill_tokens}, "
                f"{limits.max_total_tokens // limits.block_tokens} KV blocks of "
                f"{limits.block_tokens}"
                if engine == "vllm"
                else f"max_running_requests {limits.max_running_requests}, "
                f"max_total_tokens {limits.max_total_tokens}"
            ),
            highlight=False,
        )
        if config.faults is not None and config.faults.active:
            default = vars(FaultSpec())
            on = {k: v for k, v in vars(config.faults).items() if v != default[k] and k != "seed"}
            console.print(
                "Faults on: " + ", ".join(f"{k} {v}" for k, v in on.items()), highlight=False
            )
        asyncio.run(server.serve())
        console.print("Stopped.", highlight=False)
