"""``llmsched calibrate``: fit the cost model to measured step latencies or to a live server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from sim.cli._common import console, errors_to_exit

__all__ = ["calibrate"]

_PLAN = "Measurement plan (with --target)"


def _ints(text: str, flag: str) -> tuple[int, ...]:
    """``"16,128,1024"`` as integers (an empty text: none)."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(
            f"expected comma-separated integers; got {text!r}", param_hint=flag
        ) from None


def calibrate(
    measurements: Annotated[
        Path | None,
        typer.Argument(
            help="CSV of measurements: kind (ttft|prefill|mixed|decode), batch_size, "
            "new_tokens, cached_tokens, context_tokens, decode_seqs, latency_s (see "
            "scheduler/calibration.py). Or measure a live server with --target.",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            help="Model: a catalogue name (qwen2.5-32b), a config.json, or "
            "layers=,hidden=,heads=,kv_heads=,ffn=,vocab=,dtype= pairs."
        ),
    ] = "",
    gpu: Annotated[
        str,
        typer.Option(
            help="Device: a catalogue GPU (a100, h100, h200), or name=,flops=,bandwidth=,memory= "
            "pairs (a CPU too), or a JSON file of them."
        ),
    ] = "",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Profile JSON to write (required).")
    ] = None,
    tp: Annotated[int, typer.Option(help="Tensor-parallel degree of the measured engine.")] = 1,
    source: Annotated[
        str, typer.Option(help="Where the measurements came from (engine, version, date).")
    ] = "",
    target: Annotated[
        str | None,
        typer.Option(help="Measure this server (http://host:port) instead of reading a CSV."),
    ] = None,
    protocol: Annotated[
        Literal["openai", "sglang"],
        typer.Option(help="The server's API: openai (/v1/completions) or sglang (/generate)."),
    ] = "openai",
    engine: Annotated[
        Literal["sglang", "vllm"] | None,
        typer.Option(
            help="Whose scheduler the server runs: vllm steps prefills with the decodes, "
            "sglang alternates. Default: vllm for --protocol openai, sglang for sglang.",
            show_default=False,
        ),
    ] = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option(help="The served model's tokenizer.json: prompts' ids come from it."),
    ] = None,
    model_name: Annotated[
        str | None,
        typer.Option(help="The OpenAI 'model' field. Default: the first of /v1/models."),
    ] = None,
    time_scale: Annotated[
        float,
        typer.Option(help="Engine seconds per wall second of the server (an emulator's)."),
    ] = 1.0,
    measurements_out: Annotated[
        Path | None,
        typer.Option(help="Also write the measured rows as a CSV (refit it without the server)."),
    ] = None,
    max_error: Annotated[
        float,
        typer.Option(
            min=0, help="Refuse a fit whose rms relative error on any row kind exceeds this, %."
        ),
    ] = 30.0,
    timeout_s: Annotated[
        float, typer.Option(min=0.001, help="Longest one measured request may take, s.")
    ] = 120.0,
    prompt_tokens: Annotated[
        str, typer.Option(help="Prompt lengths of lone-request TTFTs.", rich_help_panel=_PLAN)
    ] = "16,128,256,512,1024",
    repeats: Annotated[
        int,
        typer.Option(
            min=1, help="TTFTs per prompt length (the least is kept).", rich_help_panel=_PLAN
        ),
    ] = 3,
    prefix_tokens: Annotated[
        str,
        typer.Option(help="Cached-prefix lengths ('' skips them).", rich_help_panel=_PLAN),
    ] = "256,768",
    streams: Annotated[
        str, typer.Option(help="Concurrent decoding streams to time.", rich_help_panel=_PLAN)
    ] = "1,2,4,8",
    stream_prompt_tokens: Annotated[
        str, typer.Option(help="Prompt lengths of decoding streams.", rich_help_panel=_PLAN)
    ] = "64,512",
    decode_tokens: Annotated[
        int, typer.Option(min=8, help="max_tokens of each decoding stream.", rich_help_panel=_PLAN)
    ] = 24,
    mixed_prompt_tokens: Annotated[
        str,
        typer.Option(
            help="Prompt lengths arriving while streams decode ('' skips them).",
            rich_help_panel=_PLAN,
        ),
    ] = "64,256,512",
) -> None:
    """Write a cost-model profile that `simulate --profile`, `compare`, `emulate` and scenarios accept.

    With --target it measures the server: TTFTs one request at a time, decode steps of concurrent streams, prefills arriving while streams decode; the server's per-request overhead is fitted as its own term.
    """
    from traces.errors import ConfigError

    with errors_to_exit():
        if (measurements is None) == (target is None):
            raise ConfigError(
                "give a CSV of measurements or --target URL, not both and not neither"
            )
        for flag, value in (("--model", model), ("--gpu", gpu), ("--out", out)):
            if not value:
                raise ConfigError(f"{flag}: required")
    from rich.markup import escape
    from rich.table import Table

    from scheduler.calibration import calibrate as fit  # numpy and pandas: only for this command
    from scheduler.profile import save_profile

    with errors_to_exit():
        rows = measurements
        if target is not None:
            rows = _measure_live(
                target,
                protocol=protocol,
                engine=engine or ("vllm" if protocol == "openai" else "sglang"),
                tokenizer=tokenizer,
                model_name=model_name,
                time_scale=time_scale,
                timeout_s=timeout_s,
                plan_flags={
                    "prompt_tokens": _ints(prompt_tokens, "--prompt-tokens"),
                    "repeats": repeats,
                    "prefix_tokens": _ints(prefix_tokens, "--prefix-tokens"),
                    "streams": _ints(streams, "--streams"),
                    "stream_prompt_tokens": _ints(stream_prompt_tokens, "--stream-prompt-tokens"),
                    "decode_tokens": decode_tokens,
                    "mixed_prompt_tokens": _ints(mixed_prompt_tokens, "--mixed-prompt-tokens"),
                },
                measurements_out=measurements_out,
            )
            source = source or f"llmsched calibrate --target {target} --protocol {protocol}"
        result = fit(rows, model, gpu, tp, source=source, max_rms_rel_error=max_error / 100)
        save_profile(result.profile, out)
    profile = result.profile
    table = Table(
        "row kind", "points", "R²", "rms relative error", "max relative error", header_style="bold"
    )
    for kind, quality in profile.fit.items():
        r2 = "-" if quality.r2 is None else f"{quality.r2:.4f}"
        table.add_row(
            kind,
            f"{quality.points:,}",
            r2,
            f"{quality.rms_rel_error:.2%}",
            f"{quality.max_rel_error:.2%}",
        )
    console.print(table)
    console.print(_residual_table(result.residuals))
    k = profile.coefficients
    console.print(
        f"per-request overhead {k.request_overhead_s * 1e3:.2f} ms; per step: prefill "
        f"{k.prefill_overhead_s * 1e3:.2f} ms, decode {k.decode_overhead_s * 1e3:.2f} ms; "
        f"{k.linear_s_per_token * 1e6:.2f} µs per prefill token",
        highlight=False,
    )
    if profile.unfitted:
        console.print(
            "not fitted (values from the model and GPU): " + ", ".join(profile.unfitted),
            highlight=False,
        )
    for note in profile.notes:
        console.print(f"note: {escape(note)}", highlight=False)
    console.print(f"wrote {out}")


def _measure_live(
    target: str,
    *,
    protocol: Literal["openai", "sglang"],
    engine: Literal["sglang", "vllm"],
    tokenizer: Path | None,
    model_name: str | None,
    time_scale: float,
    timeout_s: float,
    plan_flags: dict,
    measurements_out: Path | None,
):
    """Measure ``target`` (:func:`sim.live_calibration.measure`); the rows as a DataFrame."""
    import pandas as pd

    from sim.live_calibration import MeasurePlan, measure
    from traces.tokenizer import load_tokenizer

    plan = MeasurePlan(**plan_flags)
    result = measure(
        target,
        protocol=protocol,
        engine=engine,
        model_name=model_name,
        tokenizer=load_tokenizer(tokenizer) if tokenizer is not None else None,
        plan=plan,
        time_scale=time_scale,
        timeout_s=timeout_s,
        progress=lambda line: console.print(f"measuring: {line}", highlight=False),
    )
    console.print(f"measured {len(result.rows)} rows in {result.wall_s:.1f} s", highlight=False)
    for note in result.notes:
        console.print(f"note: {note}", highlight=False)
    rows = pd.DataFrame(result.rows)
    if measurements_out is not None:
        rows.to_csv(measurements_out, index=False)
        console.print(f"wrote {measurements_out}")
    return rows


def _residual_table(residuals):
    """Each measured row beside the fitted prediction (the worst 20 when there are more)."""
    from rich.table import Table

    shown = residuals
    title = "residuals"
    if len(residuals) > 20:
        shown = residuals.reindex(residuals["rel_error"].abs().sort_values().index[::-1][:20])
        title = f"residuals: the worst 20 of {len(residuals)}"
    table = Table(
        "kind",
        "seqs",
        "new",
        "cached",
        "decodes",
        "context",
        "measured ms",
        "predicted ms",
        "error",
        title=title,
        header_style="bold",
    )
    for r in shown.itertuples():
        table.add_row(
            r.kind,
            f"{int(r.batch_size)}",
            f"{int(r.new_tokens)}",
            f"{int(r.cached_tokens)}",
            f"{int(r.decode_seqs)}",
            f"{int(r.context_tokens)}",
            f"{r.latency_s * 1e3:.3f}",
            f"{r.predicted_s * 1e3:.3f}",
            f"{r.rel_error:+.1%}",
        )
    return table
