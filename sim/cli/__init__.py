"""The ``llmsched`` command line.

Examples::

    llmsched demo                                # the bundled comparison and its report
    llmsched compare examples/demo.toml --out runs/demo
    llmsched report runs/demo runs/live --out runs/side-by-side
    llmsched policies                            # every policy and its parameters
    llmsched trace stats traces/data/*.csv       # workload statistics
    llmsched trace gen --rate-rps 5 --cv 3 --duration-s 600 -o burst.parquet
    llmsched trace convert mooncake.jsonl mc.parquet --window 0:600
    llmsched simulate --trace chat.parquet --model qwen2.5-32b --gpu h200 \
        --instances 8 --policy round_robin --out runs/rr
    llmsched router --port 8080 --policy laps --backend http://10.0.0.5:8000 --backend http://10.0.0.6:8000
    llmsched calibrate steps.csv --model llama-3.1-8b --gpu h100 -o h100.json

One thin module per command: it declares the command's flags and imports
the packages it runs inside the command function, so ``llmsched --help`` or
``llmsched policies`` loads no simulator, report or Ray (typer builds every
command's flags at start-up, so a module's top level is paid by all).
"""

from __future__ import annotations

import warnings

import typer

from sim.cli import (
    calibrate,
    compare,
    demo,
    emulate,
    fidelity,
    policies,
    replay,
    report,
    router,
    simulate,
    trace,
)
from sim.cli._common import BandCommand, show_warning

__all__ = ["app", "main"]

app = typer.Typer(
    name="llmsched",
    help="Length-aware LLM serving scheduler: simulate, compare and route.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(trace.app, name="trace")
app.command("demo")(demo.demo)
app.command("simulate", cls=BandCommand)(simulate.simulate)
app.command("compare", cls=BandCommand)(compare.compare)
app.command("report")(report.report)
app.command("policies")(policies.policies)
app.command("calibrate")(calibrate.calibrate)
app.command("emulate")(emulate.emulate)
app.command("replay")(replay.replay)
app.command("router")(router.router)
app.command("fidelity")(fidelity.fidelity)


def main() -> None:
    """Console-script entry point."""
    warnings.showwarning = show_warning
    app()
