"""Fidelity: one trace replayed against a live server and simulated for it, side by side.

::

    from sim.fidelity import fidelity

    result = fidelity(
        "bundled:azure-code",
        "http://127.0.0.1:8000",
        "cpu-vllm.json",                      # llmsched calibrate against that server
        "runs/fidelity",
        protocol="vllm",
        load=2.5,
        transforms={"max_requests": 300, "max_prompt_tokens": 1024},
        max_num_seqs=16, max_num_batched_tokens=4096, block_size=128,
    )
    result.table          # metric, live, simulated, error (relative, simulated vs live)
    result.error("ttft_p90_s")

:func:`fidelity` replays the trace open-loop against the server (the live
replay client, :mod:`traces.replay`), simulates the very same requests on
one instance with the profile's cost model and the server's engine limits
(:func:`sim.api.run`), and compares TTFT, TPOT and end-to-end latency at
p50, p90 and p99 and the throughput. ``out`` gets both runs (``live/`` and
``simulated/``, each a run folder any report reads), the comparison as
``fidelity.csv`` and ``fidelity.md``, and ``report.html`` from
:mod:`sim.report` with both runs in it.

**Band.** With ``band=b`` the simulation is run twice more with every step
cost scaled by ``1 - b`` and ``1 + b`` (a calibration error of ``b`` either
way; ``sim.run(band=)``, :mod:`sim.band`), and the table gets the range of
each figure.
Near saturation that range is wide: queueing multiplies a small error in
step cost, which is what a reader of a single simulated figure must know.

**Simplifications.** The requests are the trace's after its transforms,
their arrivals shifted so the first is at 0 (as the replay sends them), so
both runs see the same offered load and durations. Engine limits are not
read from the server; give them (the names :func:`sim.api.run` takes). With
``protocol="vllm"`` the simulated engine is vLLM V1's (``engine="vllm"``:
one token budget per step, decodes first, prefill chunks after) and the
limits take vLLM's names.
``time_scale`` is for emulated servers running faster than real time
(records stay on the trace's clock); a real engine is driven faster by
``load`` instead.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas

from scheduler.profile import load_profile
from sim import api
from sim.api import RunResult
from sim.report.tables import band_span
from sim.runner import load_workload
from sim.specs import TraceSpec
from traces.errors import ConfigError
from traces.trace import Trace

__all__ = ["METRICS", "FidelityResult", "compare_runs", "fidelity", "format_figure", "to_markdown"]

Protocol = Literal["openai", "vllm", "sglang"]

#: The compared figures: (summary key, label, unit scale, unit).
METRICS: tuple[tuple[str, str, float, str], ...] = (
    *(
        (f"{key}_{q}_s", f"{name} {q}", 1000.0, "ms")
        for key, name in (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e", "E2E"))
        for q in ("p50", "p90", "p99")
    ),
    ("throughput_rps", "throughput", 1.0, "req/s"),
    ("output_tokens_per_s", "output throughput", 1.0, "tok/s"),
)


@dataclass
class FidelityResult:
    """A live run, its simulation and how far apart they are.

    Attributes:
        table: one row per figure of :data:`METRICS`: ``metric`` (the summary
            key), ``name``, ``unit``, ``live`` and ``simulated`` (in the
            unit), ``error`` (``simulated / live - 1``), and with a band
            ``simulated_low`` and ``simulated_high``.
        live: the replayed run, as read back from ``out/live``.
        simulated: the simulated run, as read back from ``out/simulated``.
        out: the folder everything was written to.
        n_errors: live requests that did not complete (errors, timeouts, cancelled).
        send_lag: how late the replay client sent its requests, wall seconds
            (:func:`traces.replay.lag_report`: ``n_late``, ``lag_p50_s``,
            ``lag_p99_s``, ``lag_max_s``). Live TTFT counts from the scheduled
            time, so a client that fell behind makes the server look slower
            than it is; :attr:`lag_warning` says so.
    """

    table: pandas.DataFrame
    live: RunResult
    simulated: RunResult
    out: Path
    n_errors: int
    send_lag: dict[str, Any]

    @property
    def lag_warning(self) -> str | None:
        """A sentence on the client's own lateness, or None when no request left late."""
        from traces.replay.results import lag_warning

        return lag_warning(self.send_lag)

    def error(self, metric: str) -> float:
        """The relative error of one figure (a :data:`METRICS` key, e.g. ``ttft_p50_s``)."""
        row = self.table.loc[self.table["metric"] == metric]
        if row.empty:
            raise KeyError(f"no figure {metric!r}; figures: {', '.join(self.table['metric'])}")
        return float(row["error"].iloc[0])

    def markdown(self) -> str:
        """The table as Markdown (what ``fidelity.md`` holds)."""
        return to_markdown(self.table)


def compare_runs(
    live: Mapping[str, Any],
    simulated: Mapping[str, Any],
    low: Mapping[str, Any] | None = None,
    high: Mapping[str, Any] | None = None,
) -> pandas.DataFrame:
    """The fidelity table of two summaries (``summary.json`` dicts), optionally with a band.

    ``error`` is ``simulated / live - 1``: positive when the simulation
    predicts more (slower latency, higher throughput); NaN where either is
    undefined or the live figure is 0.
    """
    rows = []
    for key, name, scale, unit in METRICS:
        got, want = _number(simulated.get(key)), _number(live.get(key))
        row: dict[str, Any] = {
            "metric": key,
            "name": name,
            "unit": unit,
            "live": want * scale,
            "simulated": got * scale,
            "error": got / want - 1.0 if want and math.isfinite(want) else math.nan,
        }
        if low is not None and high is not None:
            # The range the three runs span: near saturation a tail figure need not move
            # with the step cost (a run at 1+e once had a lower TTFT p90 than at 1).
            span = band_span(
                _number(low.get(key)) * scale, row["simulated"], _number(high.get(key)) * scale
            )
            row["simulated_low"], row["simulated_high"] = span or (math.nan, math.nan)
        rows.append(row)
    return pandas.DataFrame(rows)


def to_markdown(table: pandas.DataFrame) -> str:
    """A fidelity table as a Markdown table, figures in their units, errors in percent."""
    band = "simulated_low" in table.columns
    head = ["figure", "live", "simulated", *(["band"] if band else []), "error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.itertuples(index=False):
        cells = [f"{r.name} ({r.unit})", format_figure(r.live), format_figure(r.simulated)]
        if band:
            cells.append(f"{format_figure(r.simulated_low)} - {format_figure(r.simulated_high)}")
        cells.append("-" if math.isnan(r.error) else f"{r.error:+.1%}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def fidelity(
    trace: str | os.PathLike | Trace,
    target: str,
    profile: str | os.PathLike,
    out: str | os.PathLike,
    *,
    protocol: Protocol = "openai",
    engine: str | None = None,
    model: str | None = None,
    gpu: str | None = None,
    served_model: str | None = None,
    tokenizer: str | os.PathLike | None = None,
    load: float = 1.0,
    time_scale: float = 1.0,
    transforms: Mapping[str, Any] | None = None,
    timeout_s: float = 600.0,
    seed: int = 0,
    band: float | None = None,
    label: str = "live",
    progress: Any = None,
    **limits: Any,
) -> FidelityResult:
    """Replay ``trace`` against ``target``, simulate it with ``profile``, and compare.

    Args:
        trace: a trace file, ``bundled:NAME`` or an in-memory trace.
        target: the server's base URL.
        profile: the server's cost-model profile (``llmsched calibrate``);
            its tensor parallelism (and unless given, model and GPU) are
            the simulated engine's.
        out: the folder to write (``live/``, ``simulated/``, ``fidelity.csv``,
            ``fidelity.md``, ``report.html``).
        protocol: ``openai``, ``vllm`` (the OpenAI API) or ``sglang``.
        engine: whose scheduler the simulation follows, ``sglang`` or
            ``vllm`` (default: ``vllm`` for ``protocol="vllm"``, else the
            simulator's default, SGLang's).
        model, gpu: the simulated model and device, as ``llmsched calibrate``
            took them (a catalogue name or a description: a ``config.json``,
            ``KEY=VALUE`` pairs); default: the names the profile records,
            which must then be in the catalogue.
        served_model: the ``model`` field of OpenAI requests.
        tokenizer: the served model's ``tokenizer.json``, for text prompts.
        load: arrival-rate multiplier, for both runs.
        time_scale: trace seconds per wall second of the replay (emulators).
        transforms: trace transforms (``max_requests``, ``max_prompt_tokens``, ...).
        timeout_s: wall seconds a live request may take.
        seed: seeds the prompts' tokens and the simulation.
        band: simulate again with step costs scaled by ``1 - band`` and
            ``1 + band`` and report the range.
        label: the live run's label in the report (the simulation is
            ``simulated``).
        progress: called with the replay's :class:`~traces.replay.Progress`
            every half second.
        **limits: the server's engine limits under its engine's names
            (vLLM's ``max_num_seqs``, ``max_num_batched_tokens``,
            ``block_size``, ``num_gpu_blocks_override``; SGLang's
            ``max_running_requests``, ``chunked_prefill_size``, ...).

    Raises:
        ConfigError: a bad trace, profile, limit or URL (the message names it),
            or a live run in which no request completed.
    """
    from traces.replay import Replay, ReplayConfig, lag_report, run_replay, write_run
    from traces.tokenizer import load_tokenizer

    if not str(target).startswith(("http://", "https://")):
        raise ConfigError(f"target: expected an http:// or https:// URL; got {target!r}")
    if band is not None and not 0 < band < 1:
        raise ConfigError(f"band: expected a fraction between 0 and 1; got {band}")
    cal = load_profile(profile)
    workload = _workload(trace, transforms, seed)
    if not len(workload):
        raise ConfigError("trace: no requests left after the transforms")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if engine is None and protocol == "vllm":
        engine = "vllm"

    # The simulation first: a bad limit or model is refused before any load is sent.
    common = dict(
        model=model or cal.model,
        gpu=gpu or cal.gpu,
        tp=cal.tp,
        engine=engine,
        instances=1,
        load=load,
        seed=seed,
        **limits,
    )
    simulated = api.run(workload, "fcfs", profile=profile, label="simulated", band=band, **common)
    simulated.write(out / "simulated")
    low = high = None
    if band is not None:
        s = simulated.summary
        low = {key: s.get(f"{key}_lo") for key, *_ in METRICS}
        high = {key: s.get(f"{key}_hi") for key, *_ in METRICS}

    try:
        config = ReplayConfig(
            target_url=str(target),
            protocol="sglang" if protocol == "sglang" else "openai",
            load=load,
            time_scale=time_scale,
            timeout_s=timeout_s,
            model=served_model,
            seed=seed,
            label=label,
        )
    except ValueError as exc:
        raise ConfigError(f"fidelity: {exc}") from None
    replay = Replay(
        workload, config, load_tokenizer(None if tokenizer is None else Path(tokenizer))
    )
    run_replay(replay, progress)
    write_run(replay, out / "live")
    send_lag = lag_report(replay)

    live = load_run(out / "live")
    if not live.summary.get("n_completed"):
        raise ConfigError(
            f"{target}: no request completed ({live.summary.get('n_error', 0)} errors); "
            f"see {out / 'live' / 'results.parquet'}"
        )
    table = compare_runs(live.summary, simulated.summary, low, high)
    table.to_csv(out / "fidelity.csv", index=False)
    (out / "fidelity.md").write_text(to_markdown(table))
    (out / "fidelity.json").write_text(
        json.dumps(
            {
                "target": str(target),
                "protocol": protocol,
                "profile": str(profile),
                "load": load,
                "time_scale": time_scale,
                "band": band,
                "engine": engine,
                "limits": dict(limits),
                "n_requests": len(workload),
                "send_lag": send_lag,
            },
            indent=2,
        )
        + "\n"
    )
    _write_report(out, f"Fidelity: {target} against its simulation")
    n_errors = int(live.summary.get("n_requests", 0)) - int(live.summary.get("n_completed", 0))
    return FidelityResult(table, live, load_run(out / "simulated"), out, n_errors, send_lag)


# -- helpers ---------------------------------------------------------------------------


def load_run(path: Path) -> RunResult:
    """One run folder, as :func:`sim.api.load` reads it."""
    result = api.load(path)
    assert isinstance(result, RunResult)  # a folder with results.parquet loads as one run
    return result


def _workload(trace: Any, transforms: Mapping[str, Any] | None, seed: int) -> Trace:
    """The requests both runs see: the trace after its transforms, first arrival at 0."""
    if isinstance(trace, Trace):
        if transforms:
            raise ConfigError("transforms: apply them to an in-memory trace beforehand")
        workload = trace
    else:
        source = api._trace_source(trace, "fidelity")
        assert not isinstance(source, Trace)
        spec = TraceSpec.model_validate({**source, "transforms": dict(transforms or {})})
        workload = load_workload(spec, seed)
    frame = workload.frame
    if len(frame) and frame["arrival_s"].iloc[0] != 0.0:
        frame = frame.assign(arrival_s=frame["arrival_s"] - frame["arrival_s"].iloc[0])
        workload = Trace(frame, name=workload.name)
    return workload


def _write_report(out: Path, title: str) -> None:
    from sim.report import ReportOptions, write_report

    command = f"llmsched report {out / 'live'} {out / 'simulated'} --out {out}"
    write_report(
        [out / "live", out / "simulated"], out, ReportOptions(title=title, command=command)
    )


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def format_figure(value: float) -> str:
    """A figure for a table: one decimal from 10 up, three significant digits below."""
    if not math.isfinite(value):
        return "-"
    return f"{value:,.1f}" if abs(value) >= 10 else f"{value:,.3g}"
