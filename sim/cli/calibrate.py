"""``llmsched calibrate``: fit the cost model to measured step latencies."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sim.cli._common import console, errors_to_exit

__all__ = ["calibrate"]


def calibrate(
    measurements: Annotated[
        Path,
        typer.Argument(
            help="CSV of measured steps: kind (prefill|decode), batch_size, new_tokens, "
            "cached_tokens, context_tokens, latency_s (see scheduler/calibration.py)."
        ),
    ],
    model: Annotated[str, typer.Option(help="Model name, e.g. qwen2.5-32b.")],
    gpu: Annotated[str, typer.Option(help="GPU name: a100, h100, h200.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Profile JSON to write.")],
    tp: Annotated[int, typer.Option(help="Tensor-parallel degree of the measured engine.")] = 1,
    source: Annotated[
        str, typer.Option(help="Where the measurements came from (engine, version, date).")
    ] = "",
) -> None:
    """Write a cost-model profile that `simulate --profile` and scenario files accept."""
    from rich.table import Table

    from scheduler.calibration import fit_profile  # numpy and pandas: only for this command
    from scheduler.profile import save_profile

    with errors_to_exit():
        profile = fit_profile(measurements, model, gpu, tp, source=source)
        save_profile(profile, out)
    table = Table("step kind", "points", "R²", "rms relative error", header_style="bold")
    for kind, quality in profile.fit.items():
        table.add_row(
            kind, f"{quality.points:,}", f"{quality.r2:.4f}", f"{quality.rms_rel_error:.2%}"
        )
    console.print(table)
    for note in profile.notes:
        console.print(f"note: {note}")
    console.print(f"wrote {out}")
