"""``llmsched simulate``: replay a trace against a policy on a simulated cluster.

Example::

    llmsched simulate --trace conversation_trace.jsonl --model qwen2.5-32b --gpu h200 \\
        --instances 4 --policy fcfs --slo-ttft-ms 400 --slo-tpot-ms 50 --out runs/fcfs
    llmsched simulate --trace bundled:azure-code --transform window_s=[0,600] --load 2 \\
        --pd 1:3 --policy least_load --decode-policy round_robin --out runs/pd

writes ``runs/fcfs/results.parquet`` (one row per request),
``summary.json`` and ``queue.parquet`` (queue lengths at state changes);
``--step-log`` adds ``steps.parquet``, one row per engine step of every
instance (columns: :class:`sim.step.StepLog`).
"""

from __future__ import annotations

import typing
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sim.cli._common import (
    BAND_HELP,
    NO_CLUSTER_FLAGS,
    ClusterFlags,
    LoadOptionOpt,
    ProgressLines,
    TraceFormatOpt,
    TransformOpt,
    check_out_folder,
    cluster_flag_names,
    cluster_flags,
    console,
    errors_to_exit,
    parse_band,
    parse_key_values,
    trace_keys,
    warn,
)
from sim.specs import PolicySpec, TraceSpec

if TYPE_CHECKING:
    from sim.metrics import SimResult
    from sim.runner import PreparedRun

__all__ = ["simulate"]

#: Traces at least this long get a progress bar.
_PROGRESS_MIN_REQUESTS = 20_000


#: The choices of ``--decode-choice``: an Enum is how typer offers choices, and
#: click's error then names the flag and lists them.
_DecodeChoice = Enum(  # type: ignore[misc]
    "DecodeChoice",
    {c: c for c in typing.get_args(PolicySpec.model_fields["decode_choice"].annotation)},
    type=str,
)


@cluster_flags
def simulate(
    trace: Annotated[
        Path,
        typer.Option(
            "--trace",
            help="Trace file (any supported format), or bundled:NAME (e.g. bundled:ragpulse).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    model: Annotated[str, typer.Option(help="Served model, e.g. qwen2.5-32b.")] = "qwen2.5-32b",
    gpu: Annotated[str, typer.Option(help="GPU of every instance, e.g. h200.")] = "h200",
    instances: Annotated[
        int | None, typer.Option(help="Serving instances (mixed role). Default: 1.")
    ] = None,
    tp: Annotated[int, typer.Option(help="Tensor parallelism of each instance.")] = 1,
    pd: Annotated[
        str | None,
        typer.Option(help="Prefill/decode disaggregation P:D (replaces --instances)."),
    ] = None,
    policy: Annotated[str, typer.Option(help="Scheduling policy (llmsched policies).")] = "fcfs",
    policy_param: Annotated[
        list[str] | None,
        typer.Option("--policy-param", metavar="KEY=VALUE", help="Policy parameter, repeatable."),
    ] = None,
    decode_policy: Annotated[
        str | None,
        typer.Option(help="Routing policy choosing decode instances (with --pd)."),
    ] = None,
    decode_policy_param: Annotated[
        list[str] | None,
        typer.Option(
            "--decode-policy-param",
            metavar="KEY=VALUE",
            help="Decode policy parameter, repeatable.",
        ),
    ] = None,
    decode_choice: Annotated[
        _DecodeChoice,
        typer.Option(
            help="When the decode policy chooses: handoff (when the prefill ends, vLLM's "
            "flow) or dispatch (when the request is sent, SGLang's PD router).",
        ),
    ] = _DecodeChoice.handoff,
    slo_ttft_ms: Annotated[
        float | None, typer.Option(help="TTFT SLO, ms (per-request SLOs in the trace win).")
    ] = None,
    slo_tpot_ms: Annotated[float | None, typer.Option(help="TPOT SLO, ms.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for policies that draw random numbers.")] = 0,
    load_factor: Annotated[
        float, typer.Option("--load", help="Multiply the trace's arrival rate by this.")
    ] = 1.0,
    transform: TransformOpt = None,
    cluster: ClusterFlags = NO_CLUSTER_FLAGS,  # replaced by the flags (cluster_flags)
    profile: Annotated[
        Path | None, typer.Option(help="Calibrated cost profile (llmsched calibrate).")
    ] = None,
    band: Annotated[
        str | None, typer.Option("--band", metavar="[REL]", help=BAND_HELP, show_default=False)
    ] = None,
    fast_forward: Annotated[
        bool,
        typer.Option(
            "--fast-forward/--no-fast-forward",
            help="Advance unchanged decode batches in one event (same results, faster).",
        ),
    ] = True,
    step_log: Annotated[
        bool,
        typer.Option(
            "--step-log",
            help="Also write steps.parquet: one row per engine step (a decode stretch as one).",
        ),
    ] = False,
    fmt: TraceFormatOpt = None,
    load_option: LoadOptionOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No table, no progress.")] = False,
) -> None:
    """Simulate a trace on a cluster under a policy; write results, summary and queue files.

    Engine limits default to SGLang's for the model and GPU. The run is built
    as one point of a scenario (sim.runner), so it matches ``llmsched compare``.
    """
    with errors_to_exit():
        from sim.diagnose import diagnose
        from sim.runner import prepare
        from sim.scenario import parse_run

        check_out_folder(out)
        source = TraceSpec.source_keys(str(trace))
        _check_policy_flags(policy, decode_policy)
        policy_spec: dict[str, Any] = {
            "name": policy,
            "params": parse_key_values(policy_param, "--policy-param"),
        }
        if decode_policy is not None or decode_policy_param:
            policy_spec["decode"] = decode_policy
            policy_spec["decode_params"] = parse_key_values(
                decode_policy_param, "--decode-policy-param"
            )
            policy_spec["decode_choice"] = _DecodeChoice(decode_choice).value
        spec = parse_run(
            {
                "trace": trace_keys(source, fmt, load_option, transform),
                "cluster": {
                    "model": model,
                    "gpu": gpu,
                    "instances": 1 if instances is None else instances,
                    "tp": tp,
                    "pd": pd,
                    "profile": None if profile is None else str(profile),
                    "limits": cluster.limits,
                    **cluster.options,
                },
                "policy": policy_spec,
                "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms},
                "load": load_factor,
                "seed": seed,
                "fast_forward": fast_forward,
                "band": parse_band(band, profile, profile_flag="--profile"),
            },
            source="options",
            flags=_flag_of_key(),
        )
        if instances is not None and pd is not None:
            warn(f"--instances {instances} is ignored: --pd {pd} sets the instances")
        run = prepare(spec)
        result = _run(run, quiet)
        slo = spec.slo
        paths = result.write(
            out, slo_ttft_s=slo.ttft_s, slo_tpot_s=slo.tpot_s, config=run.config(), steps=step_log
        )
        findings = diagnose(result.frame(), run.config()).messages()
    if not quiet:
        _print_summary(
            result.summary(slo.ttft_s, slo.tpot_s),
            run.timing["wall_s"],
            run.timing["cpu_s"],
            run.config(),
        )
        console.print("Wrote " + ", ".join(str(p) for p in paths.values()))
    for message in findings:
        warn(message)


def _flag_of_key() -> dict[str, str]:
    """The flag of ``simulate`` that sets each key path of the run it builds."""
    return {
        "trace": "--trace",
        "trace.format": "--format",
        "trace.options": "--load-option",
        "trace.transforms": "--transform",
        "policy": "--policy",
        "policy.params": "--policy-param",
        "policy.decode": "--decode-policy",
        "policy.decode_params": "--decode-policy-param",
        "policy.decode_choice": "--decode-choice",
        "slo.ttft_ms": "--slo-ttft-ms",
        "slo.tpot_ms": "--slo-tpot-ms",
        "load": "--load",
        "seed": "--seed",
        **{f"cluster.{key}": f"--{key}" for key in ("model", "gpu", "instances", "tp", "pd")},
        "cluster.profile": "--profile",
        "band": "--band",
        **cluster_flag_names("cluster."),
    }


def _check_policy_flags(policy: str, decode_policy: str | None) -> None:
    """Refuse an unknown policy, or a decode policy that cannot choose decode instances, by flag."""
    from scheduler.registry import check_decode_policy, policy_class
    from traces.errors import ConfigError

    try:
        policy_class(policy)
    except ConfigError as exc:
        raise ConfigError(f"--policy: {exc}") from None
    if decode_policy is not None:
        try:
            check_decode_policy(decode_policy)
        except ConfigError as exc:
            raise ConfigError(f"--decode-policy: {exc}") from None


def _run(run: PreparedRun, quiet: bool) -> SimResult:
    n = len(run.trace) * run.n_simulations  # a band simulates the trace three times
    if not quiet and not console.is_terminal:  # a log or a pipe: a bar would draw nothing
        lines = ProgressLines("simulated requests", n)
        return run.run(progress=lines.update, progress_every=max(1, n // 100))
    if quiet or n < _PROGRESS_MIN_REQUESTS:
        return run.run()
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("simulating"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,}"),
    )
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("simulate", total=n)
        return run.run(
            progress=lambda done: bar.update(task, completed=done),
            progress_every=max(1, n // 100),
        )


def _fed(config: dict[str, Any]) -> str:
    """How the policy was fed, in a few words (the simulator options of the run)."""
    prefix = {
        "estimate": "prefixes from its own record",
        "oracle": "prefixes from the caches (oracle)",
    }
    poll = config.get("poll_interval_ms") or 0
    gauges = f"gauges polled every {poll:g} ms" if poll else "gauges live"
    hints = {"graph": "hints as graph prefills", "group": "hints as released groups"}
    return ", ".join(
        (
            prefix.get(config.get("prefix_knowledge", "estimate"), "?"),
            gauges,
            hints.get(config.get("batch_hints", "graph"), "?"),
        )
    )


def _or_dash(value: float | None, fmt: str) -> str:
    """``fmt`` of ``value``, or ``-`` where there is none (nothing completed: NaN)."""
    return "-" if value is None or value != value else fmt.format(value)


def _ranged(s: dict[str, Any], key: str, fmt: str, unit: str = "", scale: float = 1.0) -> str:
    """``fmt`` of ``s[key] * scale`` and beside it the figure's band (``<key>_lo`` to
    ``<key>_hi``, see ``sim.band``), then ``unit``; ``-`` where there is no figure."""
    value, lo, hi = s[key], s.get(f"{key}_lo"), s.get(f"{key}_hi")
    if value is None or value != value:
        return "-"
    text = fmt.format(value * scale)
    if lo is not None and hi is not None and lo == lo and hi == hi:
        low, high = sorted((lo, hi))
        text += f" ({fmt.format(low * scale)}–{fmt.format(high * scale)})"
    return text + unit


def _print_summary(
    s: dict[str, Any], wall_s: float, cpu_s: float, config: dict[str, Any] | None = None
) -> None:
    from rich.table import Table

    banded = "band_cost_scale_lo" in s
    table = Table(
        title=f"{s['policy']} on {s['n_instances']} instance(s)",
        caption=f"(ranges: every step cost ×{s['band_cost_scale_lo']:g} and "
        f"×{s['band_cost_scale_hi']:g})"
        if banded
        else None,
        show_header=True,
    )
    table.add_column("metric")
    for col in ("mean", "p50", "p90", "p99"):
        table.add_column(col, justify="right")
    for name, key in (
        ("TTFT ms", "ttft"),
        ("TPOT ms", "tpot"),
        ("ITL ms", "itl"),
        ("E2E ms", "e2e"),
        ("queue delay ms", "queue_delay"),
    ):
        quartet = (f"{key}_{q}_s" for q in ("mean", "p50", "p90", "p99"))
        table.add_row(name, *(_ranged(s, k, "{:,.1f}", scale=1000.0) for k in quartet))
    console.print(table)
    util = s["utilization"]
    facts = Table(show_header=False, box=None)
    facts.add_column(style="bold")
    facts.add_column(justify="right")
    rows = [
        (
            "requests",
            f"{s['n_requests']:,} ({s['n_completed']:,} completed, "
            f"{s['n_failed']:,} failed, {s['n_rejected']:,} rejected)",
        ),
        ("throughput", _ranged(s, "throughput_rps", "{:.2f}", " req/s")),
        (
            "tokens/s in / out",
            _or_dash(s["input_tokens_per_s"], "{:,.0f}")
            + " / "
            + _or_dash(s["output_tokens_per_s"], "{:,.0f}"),
        ),
        ("SLO attainment", _ranged(s, "slo_attainment", "{:.1%}")),
        (
            "goodput",
            _ranged(s, "goodput_rps", "{:.2f}", " req/s")
            if s["goodput_rps"] == s["goodput_rps"]
            else "- (no SLO)",
        ),
        (
            "time running steps",
            _or_dash(sum(util) / len(util) if util else None, "{:.1%} (mean of instances)"),
        ),
        (
            "prefix hit rate",
            f"{s['prefix_hit_rate']:.1%}" if s["prefix_hit_rate"] == s["prefix_hit_rate"] else "-",
        ),
        ("preemptions", f"{s['n_preemptions']:,}"),
        ("policy saw", _fed(config or {})),
        (
            "simulated / wall",
            f"{s['duration_s']:,.0f} s / {wall_s:,.1f} s "
            f"({s['duration_s'] / wall_s:,.0f}x), {s['n_requests'] / max(cpu_s, 1e-9):,.0f} req/CPU-s",
        ),
    ]
    for key, value in rows:
        facts.add_row(key, value)
    console.print(facts)
