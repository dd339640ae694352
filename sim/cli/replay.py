"""``llmsched replay``: play a trace open-loop against a live server and record what it did.

Example::

    llmsched replay --trace bundled:azure-conv --target http://127.0.0.1:30000 \\
        --protocol sglang --max-requests 500 --out runs/live
    llmsched report runs/live runs/simulated

writes ``runs/live/results.parquet`` (the shared records), ``summary.json``
and ``run.json`` (source ``replay``, the target's URL). ``--load`` multiplies
the arrival rate (as in ``simulate``); ``--time-scale`` is trace seconds per
wall second (records stay on the trace's clock). Ctrl-C or SIGTERM stops
sending, cancels what is in flight and writes what was measured.
"""

from __future__ import annotations

import sys
import warnings
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sim.cli._common import (
    LoadOptionOpt,
    TraceFormatOpt,
    TransformOpt,
    console,
    errors_to_exit,
    trace_keys,
)

if TYPE_CHECKING:
    from traces.replay import Progress, Replay

__all__ = ["replay"]


class _Protocol(StrEnum):
    openai = "openai"
    sglang = "sglang"


class _Endpoint(StrEnum):
    completions = "completions"
    chat = "chat"
    generate = "generate"


class _PromptFormat(StrEnum):
    auto = "auto"
    ids = "ids"
    text = "text"


def replay(
    trace: Annotated[
        Path,
        typer.Option("--trace", help="Trace file (any supported format), or bundled:NAME."),
    ],
    target: Annotated[
        str, typer.Option("--target", help="Server base URL, e.g. http://127.0.0.1:30000.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    protocol: Annotated[
        _Protocol, typer.Option(help="Wire protocol: openai (vLLM, SGLang's OpenAI API) or sglang.")
    ] = _Protocol.openai,
    endpoint: Annotated[
        _Endpoint | None,
        typer.Option(help="Endpoint (default: completions for openai, generate for sglang)."),
    ] = None,
    load_factor: Annotated[
        float, typer.Option("--load", help="Multiply the trace's arrival rate by this.", min=0)
    ] = 1.0,
    time_scale: Annotated[
        float,
        typer.Option(help="Trace seconds per wall second (10: ten times faster).", min=0),
    ] = 1.0,
    max_requests: Annotated[
        int | None, typer.Option(help="Replay at most the trace's first N requests.", min=0)
    ] = None,
    duration_s: Annotated[
        float | None,
        typer.Option(help="Replay only requests due in the first S trace seconds.", min=0),
    ] = None,
    timeout_s: Annotated[
        float, typer.Option(help="Give a request up after this many seconds.", min=0)
    ] = 600.0,
    tokenizer: Annotated[
        Path | None,
        typer.Option(help="The served model's tokenizer.json (default: the built-in one)."),
    ] = None,
    model: Annotated[str | None, typer.Option(help="The 'model' field of OpenAI requests.")] = None,
    prompt_format: Annotated[
        _PromptFormat,
        typer.Option(
            "--prompt",
            help="Prompts as token ids, text, or auto (ids unless the endpoint is chat).",
        ),
    ] = _PromptFormat.auto,
    slo_ttft_ms: Annotated[
        float | None,
        typer.Option(help="TTFT SLO, ms, for requests without their own (sent as x-slo-ttft-ms)."),
    ] = None,
    slo_tpot_ms: Annotated[float | None, typer.Option(help="TPOT SLO, ms.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the prompts' tokens.")] = 0,
    max_connect_errors: Annotated[
        int, typer.Option(help="Stop after this many connection failures in a row.", min=1)
    ] = 50,
    label: Annotated[str, typer.Option(help="The run's label in reports.")] = "replay",
    fmt: TraceFormatOpt = None,
    load_option: LoadOptionOpt = None,
    transform: TransformOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress line.")] = False,
) -> None:
    """Replay a trace open-loop against a server; write results, summary and run.json.

    Every request leaves at its trace time whether or not earlier ones have
    finished; how late each actually left is recorded (send_s) and warned about.
    """
    with errors_to_exit():
        from sim.runner import load_workload
        from sim.specs import TraceSpec
        from traces.errors import ConfigError
        from traces.replay import Replay, ReplayConfig, write_run
        from traces.tokenizer import load_tokenizer

        source = TraceSpec.source_keys(str(trace))
        spec = TraceSpec.model_validate(trace_keys(source, fmt, load_option, transform))
        workload = load_workload(spec, seed)
        try:
            config = ReplayConfig(
                target_url=target,
                protocol=protocol.value,
                endpoint=None if endpoint is None else endpoint.value,
                load=load_factor,
                time_scale=time_scale,
                max_requests=max_requests,
                duration_s=duration_s,
                timeout_s=timeout_s,
                model=model,
                prompt_format=prompt_format.value,
                seed=seed,
                slo_ttft_s=None if slo_ttft_ms is None else slo_ttft_ms / 1000,
                slo_tpot_s=None if slo_tpot_ms is None else slo_tpot_ms / 1000,
                max_connect_errors=max_connect_errors,
                label=label,
            )
        except ValueError as exc:
            raise ConfigError(f"replay: {exc}") from None
        if not target.startswith(("http://", "https://")):
            raise ConfigError(f"--target: expected an http:// or https:// URL; got {target!r}")
        run = Replay(workload, config, load_tokenizer(tokenizer))
        n = len(run.m.send)
        if not quiet:
            console.print(
                f"replaying {n:,} requests of {spec.describe()} against {config.url} "
                f"(load {load_factor:g}, time scale {time_scale:g})",
                highlight=False,
            )
        _run(run, quiet)
        paths = write_run(run, out)
    from traces.records import OUTCOME_OK

    _report(run)
    if not quiet:
        _print_summary(out)
        console.print("Wrote " + ", ".join(str(p) for p in paths.values()))
    if run.n_sent and not (run.m.outcome == OUTCOME_OK).any():
        # Nothing came back: a script must notice (the records are written all the same).
        raise typer.Exit(1)


def _line(p: Progress) -> str:
    ttft = "-" if p.ttft_p50_s != p.ttft_p50_s else f"{p.ttft_p50_s * 1000:,.0f} ms"
    return (
        f"sent {p.sent:,}/{p.total:,}  in flight {p.in_flight:,}  done {p.done:,}  "
        f"errors {p.errors:,}  p50 TTFT {ttft}  {p.elapsed_s:,.0f} s"
    )


def _run(run: Replay, quiet: bool) -> None:
    from traces.replay import run_replay

    if quiet:
        run_replay(run)
        return
    if console.is_terminal:
        from rich.live import Live
        from rich.text import Text

        with Live(Text(""), console=console, transient=False, refresh_per_second=4) as live:
            run_replay(run, lambda p: live.update(Text(_line(p))), 0.25)
        return
    # Not a terminal: a plain line every few seconds, for logs.
    run_replay(run, lambda p: print(_line(p), file=sys.stdout, flush=True), 5.0)


def _ms(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value * 1000:,.1f}"


def _print_summary(out: Path) -> None:
    """The headline figures, as the written summary has them (trace seconds shown in ms)."""
    import json

    s = json.loads((out / "summary.json").read_text())
    console.print(
        f"{s['n_completed']:,} of {s['n_requests']:,} completed ({s['n_error']:,} errors, "
        f"{s['n_timeout']:,} timeouts, {s['n_cancelled']:,} cancelled, "
        f"{s['n_failed']:,} failed in the trace)",
        highlight=False,
    )
    for name, key in (("TTFT", "ttft"), ("TPOT", "tpot"), ("E2E", "e2e")):
        console.print(
            f"{name} ms  p50 {_ms(s.get(key + '_p50_s'))}  p90 {_ms(s.get(key + '_p90_s'))}  "
            f"p99 {_ms(s.get(key + '_p99_s'))}",
            highlight=False,
        )


def _report(run: Replay) -> None:
    """Warnings a user must see: the client fell behind, errors by kind, an early stop."""
    from traces.records import OUTCOME_CANCELLED, OUTCOME_PENDING
    from traces.replay import lag_report, lag_warning

    late = lag_warning(lag_report(run))
    if late is not None:
        warnings.warn(late, stacklevel=1)
    if run.errors:
        kinds = ", ".join(f"{n:,} {kind}" for kind, n in run.errors.most_common())
        warnings.warn(f"{sum(run.errors.values()):,} requests failed: {kinds}", stacklevel=1)
    if run.stopped_reason:
        cancelled = int((run.m.outcome == OUTCOME_CANCELLED).sum())
        unsent = int((run.m.outcome == OUTCOME_PENDING).sum())
        warnings.warn(
            f"run {run.stopped_reason}: {cancelled:,} in flight cancelled, "
            f"{unsent:,} never sent (left out of the records)",
            stacklevel=1,
        )
