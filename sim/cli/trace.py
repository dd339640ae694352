"""``llmsched trace``: inspect, generate and convert workload traces."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.table import Table

from sim.cli._common import LoadOptionOpt, console, errors_to_exit, parse_key_values
from traces.bundled import BUNDLED_PREFIX
from traces.generator import PRESETS, generate, preset
from traces.loaders import FORMATS, load, save
from traces.stats import TraceStats, trace_stats
from traces.transforms import TraceTransforms

__all__ = ["app", "print_stats_table"]

app = typer.Typer(help="Inspect, generate and convert workload traces.", no_args_is_help=True)

FormatOpt = Annotated[
    str | None,
    typer.Option("--format", help=f"Input format, instead of detecting it: {', '.join(FORMATS)}."),
]


@app.command()
def stats(
    files: Annotated[
        list[Path],
        typer.Argument(
            help="Trace files (any supported format), or bundled:NAME (bundled:ragpulse)."
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    fmt: FormatOpt = None,
    load_option: LoadOptionOpt = None,
) -> None:
    """Rows, span, rates, burstiness, token percentiles and sessions of each trace.

    Each trace is labelled by its file's name (a bundled one by its short
    name), whatever name a converted file recorded for its source.
    """
    options = parse_key_values(load_option, "--load-option")
    with errors_to_exit():
        results = []
        for f in files:
            trace = load(f, format=fmt, **options)
            if not str(f).startswith(BUNDLED_PREFIX):
                trace.name = f.name
            results.append(trace_stats(trace))
    if as_json:
        payload = [s.model_dump() for s in results]
        typer.echo(json.dumps(payload[0] if len(payload) == 1 else payload, indent=2))
    else:
        print_stats_table(results)


@app.command()
def gen(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output: .parquet, .jsonl or .csv.")],
    preset_name: Annotated[
        str, typer.Option("--preset", help=f"Starting configuration: {', '.join(PRESETS)}.")
    ] = "burstgpt",
    rate_rps: Annotated[float | None, typer.Option(help="Mean arrival rate, req/s.")] = None,
    cv: Annotated[
        float | None,
        typer.Option(
            help="Inter-arrival coefficient of variation of one-shot requests and session "
            "starts (1: Poisson). Later turns follow think times, so the CV that trace stats "
            "measures over all rows is pulled toward 1 (--set conversation_share=0 keeps it)."
        ),
    ] = None,
    duration_s: Annotated[float | None, typer.Option(help="Length of the trace, s.")] = None,
    n_requests: Annotated[int | None, typer.Option(help="Number of requests.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="KEY=VALUE", help="Any generator parameter, repeatable."),
    ] = None,
) -> None:
    """Write a synthetic BurstGPT-style trace (.csv writes BurstGPT's 8-column schema)."""
    with errors_to_exit():
        updates = parse_key_values(set_, "--set")
        flags = {
            "rate_rps": rate_rps,
            "cv": cv,
            "duration_s": duration_s,
            "n_requests": n_requests,
            "seed": seed,
        }
        updates.update({k: v for k, v in flags.items() if v is not None})
        config = preset(preset_name, **updates)
        trace = generate(config)
        save(trace, out)
    console.print(f"wrote {len(trace):,} requests over {trace.span_s:,.1f} s to {out}")


@app.command()
def convert(
    src: Annotated[
        Path, typer.Argument(help="Input trace, any supported format, or bundled:NAME.")
    ],
    dst: Annotated[Path, typer.Argument(help="Output: .parquet, .jsonl or .jsonl.gz.")],
    fmt: FormatOpt = None,
    load_option: LoadOptionOpt = None,
    window: Annotated[
        str | None,
        typer.Option(metavar="START:END", help="Keep arrivals in [START, END) s, e.g. 0:600."),
    ] = None,
    time_scale: Annotated[
        float | None, typer.Option(help="Multiply arrival times (<1 compresses).")
    ] = None,
    rate_rps: Annotated[float | None, typer.Option(help="Rescale time to this mean rate.")] = None,
    sample: Annotated[float | None, typer.Option(help="Keep this fraction of rows.")] = None,
    sample_seed: Annotated[int, typer.Option(help="Seed for --sample.")] = 0,
    sample_by_session: Annotated[
        bool, typer.Option(help="Sample whole sessions, keeping conversations intact.")
    ] = False,
    model: Annotated[list[str] | None, typer.Option(help="Keep this model, repeatable.")] = None,
    log_type: Annotated[
        list[str] | None, typer.Option(help="Keep this log type, repeatable.")
    ] = None,
    drop_failed: Annotated[bool, typer.Option(help="Drop failed requests.")] = False,
    max_prompt_tokens: Annotated[int | None, typer.Option(help="Cap prompt length.")] = None,
    max_requests: Annotated[int | None, typer.Option(help="Keep the first N requests.")] = None,
) -> None:
    """Write a trace in the canonical format, with transforms applied."""
    options = parse_key_values(load_option, "--load-option")
    with errors_to_exit():
        transforms = _convert_transforms(
            window_s=window,
            time_scale=time_scale,
            rate_rps=rate_rps,
            sample=sample,
            sample_seed=sample_seed,
            sample_by_session=sample_by_session,
            models=model or None,
            log_types=log_type or None,
            drop_failed=drop_failed,
            max_prompt_tokens=max_prompt_tokens,
            max_requests=max_requests,
        )
        trace = transforms.apply(load(src, format=fmt, **options))
        # The new file is a trace of its own: it goes by its own name from now on.
        trace = trace.replace(trace.frame, name=dst.name)
        save(trace, dst)
    console.print(f"wrote {len(trace):,} requests over {trace.span_s:,.1f} s to {dst}")


#: The ``convert`` flag of each transform whose flag is not its name with dashes.
_CONVERT_FLAGS = {"window_s": "--window", "models": "--model", "log_types": "--log-type"}


def _convert_transforms(**values: object) -> TraceTransforms:
    """The transforms ``convert``'s flags ask for; a bad value is reported under its flag."""
    try:
        return TraceTransforms.model_validate(values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else None
        msg = err["msg"]
        if err["type"] == "value_error":
            msg = str(err.get("ctx", {}).get("error", msg.removeprefix("Value error, ")))
        flag = None if field is None else _CONVERT_FLAGS.get(field, "--" + field.replace("_", "-"))
        raise typer.BadParameter(msg, param_hint=flag) from None


#: (label, fields shown joined by " / ", format of each value)
_ROWS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("requests", ("n_requests",), "{:,}"),
    ("failed", ("n_failed",), "{:,}"),
    ("span, s", ("span_s",), "{:,.0f}"),
    ("mean rate, req/s", ("rate_mean_rps",), "{:.3g}"),
    ("peak rate 1 s / 60 s, req/s", ("rate_peak_1s_rps", "rate_peak_60s_rps"), "{:.3g}"),
    ("inter-arrival CV", ("interarrival_cv",), "{:.2f}"),
    ("dispersion 1 s / 60 s", ("dispersion_1s", "dispersion_60s"), "{:.2f}"),
    ("prompt mean / p50", ("prompt_tokens_mean", "prompt_tokens_p50"), "{:,.0f}"),
    (
        "prompt p90 / p99 / max",
        ("prompt_tokens_p90", "prompt_tokens_p99", "prompt_tokens_max"),
        "{:,.0f}",
    ),
    ("output mean / p50", ("output_tokens_mean", "output_tokens_p50"), "{:,.0f}"),
    (
        "output p90 / p99 / max",
        ("output_tokens_p90", "output_tokens_p99", "output_tokens_max"),
        "{:,.0f}",
    ),
    (
        "prompts > 1k / 2k / 4k",
        ("prompt_share_over_1024", "prompt_share_over_2048", "prompt_share_over_4096"),
        "{:.1%}",
    ),
    ("sessions / multi-turn", ("n_sessions", "n_multi_turn_sessions"), "{:,}"),
    ("turns per session mean", ("turns_per_session_mean",), "{:.2f}"),
    ("prefix reuse", ("prefix_reuse_share",), "{:.1%}"),
)


#: Columns of the side-by-side table (several traces): (header, field, format).
_WIDE: tuple[tuple[str, str, str], ...] = (
    ("requests", "n_requests", "{:,}"),
    ("span s", "span_s", "{:,.0f}"),
    ("req/s", "rate_mean_rps", "{:.3g}"),
    ("peak 1s", "rate_peak_1s_rps", "{:.3g}"),
    ("CV", "interarrival_cv", "{:.2f}"),
    ("prompt p50", "prompt_tokens_p50", "{:,.0f}"),
    ("prompt p99", "prompt_tokens_p99", "{:,.0f}"),
    ("output p50", "output_tokens_p50", "{:,.0f}"),
    (">4k", "prompt_share_over_4096", "{:.0%}"),
    ("sessions", "n_sessions", "{:,}"),
    ("reuse", "prefix_reuse_share", "{:.0%}"),
)


def _fmt(value: object, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def print_stats_table(results: list[TraceStats]) -> None:
    """One trace: a statistic per row. Several: a trace per row, the key statistics."""
    dumps = [s.model_dump() for s in results]
    if len(dumps) == 1:
        table = Table("statistic", results[0].name, header_style="bold")
        for label, fields, fmt in _ROWS:
            table.add_row(label, " / ".join(_fmt(dumps[0][f], fmt) for f in fields))
    else:
        table = Table("trace", *(h for h, _, _ in _WIDE), header_style="bold")
        for d in dumps:
            table.add_row(d["name"], *(_fmt(d[f], fmt) for _, f, fmt in _WIDE))
    console.print(table)
