"""``llmsched fidelity``: replay a trace against a live server and put its simulation beside it.

Example::

    llmsched calibrate --target http://127.0.0.1:8000 --model llama-3.1-8b --gpu h100 \\
        --out vllm.json
    llmsched fidelity --trace bundled:azure-code --target http://127.0.0.1:8000 \\
        --profile vllm.json --protocol vllm --load 2.5 --transform max_requests=300 \\
        --max-num-seqs 16 --max-num-batched-tokens 4096 --block-size 128 --out runs/fidelity

prints TTFT, TPOT and E2E at p50, p90 and p99 and the throughput, live and
simulated, with the relative error of each (:mod:`sim.fidelity`), and
writes ``live/`` and ``simulated/`` (run folders), ``fidelity.csv``,
``fidelity.md`` and ``report.html`` (both runs) into ``--out``. The engine
limits are the server's (the flags of ``llmsched simulate``, ``--engine``
included); ``--protocol vllm`` implies ``--engine vllm``, whose limits take
vLLM's names. A client that fell behind its schedule is named in a warning
(live TTFT counts from the scheduled time, so its lag is in every figure),
and ``fidelity.json`` keeps its send lag.
"""

from __future__ import annotations

import math
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from sim.cli._common import (
    NO_CLUSTER_FLAGS,
    ClusterFlags,
    TransformOpt,
    cluster_flags,
    console,
    errors_to_exit,
    parse_key_values,
)

__all__ = ["fidelity"]


class _Protocol(StrEnum):
    openai = "openai"
    vllm = "vllm"
    sglang = "sglang"


@cluster_flags
def fidelity(
    trace: Annotated[
        str, typer.Option("--trace", help="Trace file (any supported format), or bundled:NAME.")
    ],
    target: Annotated[
        str, typer.Option("--target", help="Server base URL, e.g. http://127.0.0.1:8000.")
    ],
    profile: Annotated[
        Path, typer.Option(help="The server's cost-model profile (llmsched calibrate).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    protocol: Annotated[
        _Protocol,
        typer.Option(help="openai (any OpenAI API), vllm (OpenAI API, vLLM's engine) or sglang."),
    ] = _Protocol.openai,
    cluster: ClusterFlags = NO_CLUSTER_FLAGS,  # replaced by the flags (cluster_flags)
    load_factor: Annotated[
        float, typer.Option("--load", help="Multiply the trace's arrival rate by this.", min=0)
    ] = 1.0,
    time_scale: Annotated[
        float,
        typer.Option(help="Trace seconds per wall second (an emulator's time scale).", min=0),
    ] = 1.0,
    transform: TransformOpt = None,
    band: Annotated[
        float | None,
        typer.Option(
            help="Also simulate with step costs scaled by 1 - BAND and 1 + BAND; show the range.",
            min=0,
            max=1,
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Simulated model, as given to calibrate (a catalogue name, a config.json, "
            "KEY=VALUE pairs); default: the profile's."
        ),
    ] = None,
    gpu: Annotated[
        str | None,
        typer.Option(
            help="Simulated device, as given to calibrate (a catalogue GPU, KEY=VALUE pairs, "
            "a JSON file); default: the profile's."
        ),
    ] = None,
    served_model: Annotated[
        str | None, typer.Option(help="The 'model' field of OpenAI requests.")
    ] = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option(help="The served model's tokenizer.json (default: the built-in one)."),
    ] = None,
    timeout_s: Annotated[
        float, typer.Option(help="Give a live request up after this many seconds.", min=0)
    ] = 600.0,
    seed: Annotated[int, typer.Option(help="Seed of the prompts and the simulation.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress line.")] = False,
) -> None:
    """Replay a trace live, simulate the same requests, and compare them figure by figure."""
    with errors_to_exit():
        from sim.fidelity import fidelity as run_fidelity

        if not quiet:
            console.print(
                f"replaying {trace} against {target}, then simulating it", highlight=False
            )
        result = run_fidelity(
            trace,
            target,
            profile,
            out,
            protocol=protocol.value,
            model=model,
            gpu=gpu,
            served_model=served_model,
            tokenizer=tokenizer,
            load=load_factor,
            time_scale=time_scale,
            transforms=parse_key_values(transform, "--transform"),
            timeout_s=timeout_s,
            seed=seed,
            band=band or None,
            progress=None if quiet else _progress,
            **cluster.limits,
            **cluster.options,
        )
    _print(result)
    if result.lag_warning is not None:
        console.print(f"[yellow]warning:[/yellow] {result.lag_warning}", highlight=False)
    if result.n_errors:
        console.print(
            f"[yellow]warning:[/yellow] {result.n_errors:,} live requests did not complete "
            f"(see {out / 'live' / 'results.parquet'})"
        )
    console.print(f"Wrote {out / 'fidelity.md'}, {out / 'fidelity.csv'}, {out / 'report.html'}")


def _progress(p) -> None:  # traces.replay.Progress
    print(f"\rsent {p.sent:,}/{p.total:,}  done {p.done:,}  errors {p.errors:,}", end="")
    if p.done + p.errors >= p.total:
        print(file=sys.stdout)


def _print(result) -> None:  # sim.fidelity.FidelityResult
    from rich.table import Table

    from sim.fidelity import format_figure as _fmt

    band = "simulated_low" in result.table.columns
    table = Table("figure", "live", "simulated", header_style="bold")
    if band:
        table.add_column("band")
    table.add_column("error", justify="right")
    for r in result.table.itertuples(index=False):
        cells = [f"{r.name} ({r.unit})", _fmt(r.live), _fmt(r.simulated)]
        if band:
            cells.append(f"{_fmt(r.simulated_low)} - {_fmt(r.simulated_high)}")
        cells.append("-" if math.isnan(r.error) else f"{r.error:+.1%}")
        table.add_row(*cells)
    console.print(table)
