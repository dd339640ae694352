"""The Python API: simulate one configuration, compare policies, load results from disk.

::

    import sim

    one = sim.run("bundled:azure-code", "laps", instances=4, slo_ttft_ms=400)
    one.summary["ttft_p90_s"], one.records          # a dict; one row per request

    cmp = sim.compare(
        trace="bundled:azure-code",
        policies=["fcfs", "least_load", "laps"],
        loads=[0.5, 1.0],
        seeds=[0, 1],
        instances=4,
        slo_ttft_ms=400,
    )
    cmp.summaries                                   # one row per policy x load x seed
    cmp.mean()                                      # averaged over seeds, with n_seeds

    again = sim.load("runs/chat")                   # what llmsched compare wrote

**One path for every run.** Arguments become the specs ``llmsched simulate``
and ``llmsched compare`` build from their flags and files (:mod:`sim.specs`,
:mod:`sim.scenario`), so a mistake raises the same
:class:`~sim.scenario.ScenarioError` (a :class:`~traces.errors.ConfigError`)
naming the key path (``cluster.instances: Input should be greater than 0``;
flat keywords such as ``instances`` land under ``cluster``, ``slo_ttft_ms``
under ``slo.ttft_ms``, engine limits under ``cluster.limits``). Each point is
run by :func:`sim.sweep.execute`, which every executor uses, and kept as the
files it produced (``results.parquet``, ``summary.json``, ``queue.parquet``
and whatever else the simulator writes); frames are read from them on first
use. So a result in memory is exactly what the command line writes and
:func:`load` reads back, columns added by later versions included.

**Simplifications.** An in-memory trace (a :class:`~traces.trace.Trace` or
a DataFrame) works with :func:`run` but not with :func:`compare`, whose
sweep cache keys points by the trace file; save it with ``traces.save``
first. Undefined figures (SLO attainment without an SLO, ...) are ``None``
in :attr:`RunResult.summary`, as in ``summary.json``, and NaN in the frames.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas

from sim.scenario import (
    Scenario,
    ScenarioError,
    load_scenario,
    parse_run,
    parse_scenario,
)
from sim.specs import SIMULATION_OPTIONS, EngineLimitsSpec, PolicySpec, RunSpec, TraceSpec
from sim.sweep import PointOutput, execute, make_executor, points_of, run_sweep
from traces.errors import ConfigError
from traces.generator import PRESETS
from traces.trace import Trace

__all__ = ["Comparison", "RunResult", "compare", "load", "run"]

#: Files of a run folder that belong to the sweep around it, not to the run.
_SWEEP_FILES = ("point.json",)

TraceLike = str | os.PathLike | Mapping[str, Any] | TraceSpec | Trace | pandas.DataFrame
PolicyLike = str | Mapping[str, Any] | PolicySpec


class RunResult:
    """The results of one simulated configuration (one point of a comparison).

    Attributes:
        label: the policy's label (its name, ``+decode`` under PD, or the set label).
        load: the load factor (arrival rate multiplier).
        seed: the run's seed.
        summary: the headline figures under ``summary.json``'s keys (seconds,
            tokens, rates; ``None`` where undefined), without ``config``.
        config: how the run was set up (``summary.json``'s ``config``).
        spec: the validated run spec, when this process ran it.
        path: the folder it was read from or last written to, if any.
    """

    def __init__(
        self,
        *,
        label: str,
        load: float,
        seed: int,
        summary: Mapping[str, Any],
        config: Mapping[str, Any] | None = None,
        files: Mapping[str, bytes] | None = None,
        frames: Mapping[str, pandas.DataFrame | None] | None = None,
        spec: RunSpec | None = None,
        path: Path | None = None,
    ) -> None:
        self.label = label
        self.load = float(load)
        self.seed = int(seed)
        summary = dict(summary)
        config = dict(config or summary.get("config") or {})
        summary.pop("config", None)
        self.summary: dict[str, Any] = _jsonable(summary)
        self.config: dict[str, Any] = config
        self.spec = spec
        self.path = path
        self._files = dict(files) if files is not None else None
        self._frames: dict[str, pandas.DataFrame | None] = dict(frames or {})

    @classmethod
    def _from_output(cls, spec: RunSpec, output: PointOutput) -> RunResult:
        return cls(
            label=spec.policy.display,
            load=spec.load,
            seed=spec.seed,
            summary=output.summary,
            files=output.files,
            spec=spec,
        )

    def __repr__(self) -> str:
        n = self.summary.get("n_requests")
        return f"RunResult({self.label!r}, load={self.load:g}, seed={self.seed}, n_requests={n})"

    # -- frames ------------------------------------------------------------------

    def _frame(self, stem: str) -> pandas.DataFrame | None:
        if stem not in self._frames:
            data = self._file(f"{stem}.parquet")
            self._frames[stem] = None if data is None else pandas.read_parquet(io.BytesIO(data))
        return self._frames[stem]

    @property
    def records(self) -> pandas.DataFrame:
        """One row per request: the ``results.parquet`` schema."""
        frame = self._frame("results")
        if frame is None:
            raise ConfigError(f"{self!r}: no result records")
        return frame

    @property
    def queue(self) -> pandas.DataFrame | None:
        """Queue length and KV use over time (``queue.parquet``), if recorded."""
        return self._frame("queue")

    @property
    def batches(self) -> pandas.DataFrame | None:
        """One row per prefill step (``batches.parquet``), for policies that batch prefills."""
        return self._frame("batches")

    def summary_frame(self) -> pandas.DataFrame:
        """:attr:`summary` as one row, after ``label``, ``load`` and ``seed`` (NaN where undefined)."""
        return _summary_frame([self])

    # -- files -------------------------------------------------------------------

    @cached_property
    def _disk_files(self) -> dict[str, Path]:
        if self.path is None:
            return {}
        return {
            p.name: p
            for p in sorted(self.path.iterdir())
            if p.is_file() and p.name not in _SWEEP_FILES
        }

    def _file(self, name: str) -> bytes | None:
        if self._files is not None:
            return self._files.get(name)
        path = self._disk_files.get(name)
        return None if path is None else path.read_bytes()

    def _file_names(self) -> list[str]:
        return sorted(self._files if self._files is not None else self._disk_files)

    def write(self, out_dir: str | os.PathLike) -> Path:
        """Write the run's files into ``out_dir`` (the layout ``llmsched simulate`` writes).

        ``summary.json`` is written from :attr:`summary` and :attr:`config`;
        every other file as the simulator produced it. Returns the folder.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name in self._file_names():
            if name == "summary.json":
                continue
            data = self._file(name)
            if data is not None:
                (out / name).write_bytes(data)
        if "results.parquet" not in self._file_names():
            # Loaded from records alone: the frames are all there is.
            for stem in ("results", "queue", "batches"):
                frame = self._frames.get(stem)
                if frame is not None:
                    frame.to_parquet(out / f"{stem}.parquet", index=False)
        summary = {**self.summary, "config": self.config}
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.path = out
        return out


class Comparison:
    """Every (policy, load, seed) point of a comparison, in the scenario's order.

    Attributes:
        runs: one :class:`RunResult` per point.
        scenario: the validated scenario, when this process ran it.
        path: the sweep folder, when written to or read from disk.
    """

    def __init__(
        self,
        runs: Sequence[RunResult],
        *,
        scenario: Scenario | None = None,
        path: Path | None = None,
    ) -> None:
        self.runs = list(runs)
        self.scenario = scenario
        self.path = path

    def __len__(self) -> int:
        return len(self.runs)

    def __iter__(self) -> Iterator[RunResult]:
        return iter(self.runs)

    def __repr__(self) -> str:
        labels = list(dict.fromkeys(r.label for r in self.runs))
        return f"Comparison({len(self.runs)} runs: {', '.join(labels)})"

    @cached_property
    def summaries(self) -> pandas.DataFrame:
        """One row per point: ``label``, ``load``, ``seed``, then every summary figure."""
        return _summary_frame(self.runs)

    def mean(self) -> pandas.DataFrame:
        """Seed averages: per label and load, ``n_seeds`` and the mean of each numeric figure."""
        frame = self.summaries
        keys = ["label", "load"]
        numeric = [
            c
            for c in frame.select_dtypes("number").columns
            if c not in (*keys, "seed") and not pandas.api.types.is_bool_dtype(frame[c])
        ]
        groups = frame.groupby(keys, sort=False)
        out = groups[numeric].mean()
        out.insert(0, "n_seeds", groups["seed"].nunique())
        return out.reset_index()

    def point(self, label: str, load: float, seed: int | None = None) -> RunResult:
        """The run of ``label`` at ``load`` (and ``seed``, needed when there are several).

        Raises:
            KeyError: no such point; the message lists the labels, loads and seeds there are.
        """
        found = [
            r
            for r in self.runs
            if r.label == label and math.isclose(r.load, load) and seed in (None, r.seed)
        ]
        if len(found) == 1:
            return found[0]
        have = sorted({(r.label, r.load, r.seed) for r in self.runs})
        listing = ", ".join(f"{lab}@{ld:g}/seed {s}" for lab, ld, s in have)
        if found:
            seeds = ", ".join(str(r.seed) for r in found)
            raise KeyError(f"{label!r} at load {load:g} ran with seeds {seeds}; pass seed=")
        raise KeyError(f"no point {label!r} at load {load:g} (seed {seed}); points: {listing}")

    def records(self) -> pandas.DataFrame:
        """Every point's per-request records in one frame, ``label``, ``load``, ``seed`` first."""
        frames = [
            r.records.assign(label=r.label, load=r.load, seed=r.seed)[
                ["label", "load", "seed", *r.records.columns]
            ]
            for r in self.runs
        ]
        return pandas.concat(frames, ignore_index=True) if frames else pandas.DataFrame()


# -- running ---------------------------------------------------------------------


def run(
    trace: TraceLike,
    policy: PolicyLike = "fcfs",
    *,
    model: str | None = None,
    gpu: str | None = None,
    instances: int | None = None,
    tp: int | None = None,
    pd: str | None = None,
    profile: str | os.PathLike | None = None,
    engine: str | None = None,
    policy_params: Mapping[str, Any] | None = None,
    decode_policy: str | None = None,
    decode_params: Mapping[str, Any] | None = None,
    decode_choice: str | None = None,
    label: str | None = None,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
    load: float = 1.0,
    seed: int = 0,
    transforms: Mapping[str, Any] | None = None,
    fast_forward: bool = True,
    band: float | str | None = None,
    **engine_limits: Any,
) -> RunResult:
    """Simulate one configuration, as ``llmsched simulate`` does, and return its results.

    Args:
        trace: a trace file, ``bundled:NAME``, a generator preset name
            (``chat``; or ``generator:chat``), a ``[trace]`` table as a
            mapping, a :class:`~traces.trace.Trace` or a DataFrame of requests.
        policy: a registered policy name, or a ``[[policies]]`` entry as a mapping.
        model, gpu, instances, tp, pd, profile: the cluster (unset: the
            scenario defaults); ``pd="1:3"`` disaggregates prefill and decode.
        engine: whose scheduler each instance follows, ``"sglang"`` (default)
            or ``"vllm"``; the engine limits then take its names.
        policy_params, decode_policy, decode_params, decode_choice, label:
            the policy's parameters, the routing policy choosing decode
            instances under PD and when it chooses (``"handoff"`` or
            ``"dispatch"``), and the label reports use.
        slo_ttft_ms, slo_tpot_ms: SLOs, ms (per-request SLOs in the trace win).
        load: arrival rate multiplier (arrival times are divided by it).
        seed: seeds random policies, the generator and sampling.
        transforms: trace transforms (``window_s``, ``sample``, ...), for a
            trace the run loads.
        band: a relative step-cost error (``0.05``: also simulate with every
            step cost scaled by 0.95 and 1.05), or ``"profile"``, the fit
            error of ``profile``: the summary then has each figure's
            ``<key>_lo`` and ``<key>_hi`` (:mod:`sim.band`).
        **engine_limits: the engine's names (SGLang's ``max_running_requests=256``,
            vLLM's ``max_num_seqs=16``, ...), and the simulator's options (``prefix_knowledge="oracle"``,
            ``poll_interval_ms=100``, ``batch_hints="group"``).

    Raises:
        ScenarioError: an invalid argument, named by its key path.
        ConfigError, TraceError: as the runner and the loaders raise them.
    """
    source = _trace_source(trace, "sim.run")
    in_memory = isinstance(source, Trace)
    if in_memory and transforms:
        raise ConfigError(
            "sim.run: transforms apply to a trace the run loads; "
            "transform an in-memory trace with traces.transforms first"
        )
    entry = _policy_entry(policy, "sim.run")
    for key, value in (
        ("params", policy_params),
        ("decode", decode_policy),
        ("decode_params", decode_params),
        ("decode_choice", decode_choice),
        ("label", label),
    ):
        if value is not None:
            entry[key] = dict(value) if isinstance(value, Mapping) else value
    cluster = _given(
        model=model, gpu=gpu, instances=instances, tp=tp, pd=pd, profile=profile, engine=engine
    )
    if cluster.get("profile") is not None:
        cluster["profile"] = str(cluster["profile"])
    for key in SIMULATION_OPTIONS:
        if key in engine_limits:
            cluster[key] = engine_limits.pop(key)
    if engine_limits:
        cluster["limits"] = dict(engine_limits)
    # An in-memory trace is not a spec; validate everything else against a
    # stand-in source, then record the trace for what it is.
    trace_data = {"generator": {}} if in_memory else dict(source)
    if transforms:
        trace_data["transforms"] = dict(transforms)
    spec = parse_run(
        {
            "trace": trace_data,
            "cluster": cluster,
            "policy": entry,
            "slo": _given(ttft_ms=slo_ttft_ms, tpot_ms=slo_tpot_ms),
            "load": load,
            "seed": seed,
            "fast_forward": fast_forward,
            "band": band,
        },
        source="sim.run",
    )
    base: Trace | None = None
    if in_memory:
        base = source  # type: ignore[assignment]
        stand_in = TraceSpec.model_construct(
            path=f"<in-memory trace {base.name!r}, {len(base)} requests>"
        )
        spec = spec.model_copy(update={"trace": stand_in})
    _check_registered(spec.policy)
    return RunResult._from_output(spec, execute(spec, base))


def compare(
    scenario: str | os.PathLike | Mapping[str, Any] | Scenario | None = None,
    /,
    *,
    trace: TraceLike | None = None,
    policies: Sequence[PolicyLike] | None = None,
    loads: Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
    model: str | None = None,
    gpu: str | None = None,
    instances: int | None = None,
    tp: int | None = None,
    pd: str | None = None,
    profile: str | os.PathLike | None = None,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
    transforms: Mapping[str, Any] | None = None,
    jobs: int | None = 1,
    out: str | os.PathLike | None = None,
    force: bool = False,
    executor: str = "local",
    address: str | None = None,
    on_point: Callable[[RunResult], None] | None = None,
    **keys: Any,
) -> Comparison:
    """Run every (policy, load, seed) point of a scenario, as ``llmsched compare`` does.

    The scenario is a file (TOML or YAML), a mapping of its keys, a
    :class:`~sim.scenario.Scenario`, or keyword arguments alone; keywords
    given beside one replace its keys (``trace`` and ``policies`` whole; the
    cluster keys, engine limits and SLOs one by one).

    Args:
        scenario: the scenario's file, mapping or model (optional).
        trace: as for :func:`run`, less in-memory traces.
        policies: policy names or ``[[policies]]`` entries as mappings.
        loads, seeds: the load factors and seeds (default ``[1.0]`` and ``[0]``).
        model, gpu, instances, tp, pd, profile, slo_ttft_ms, slo_tpot_ms,
            transforms: as for :func:`run`.
        jobs: local processes (None: one per core); 1 runs inline. More than
            one starts fresh interpreters, so a script calls it under
            ``if __name__ == "__main__":``.
        out: a folder to keep the sweep in (``points/``, ``sweep.json``, the
            layout ``llmsched compare`` and ``llmsched report`` use): points
            already there with the same spec, trace and code are reused.
        force: rerun points already in ``out``.
        executor, address: ``"local"`` or ``"ray"``, and the Ray address.
        on_point: called with each point's result as it finishes (progress).
        **keys: engine limits (SGLang's names) and other scenario keys
            (``name``, ``description``, ``report``, ``cluster``, ``slo``,
            ``band``: as for :func:`run`, for every point).

    Raises:
        ScenarioError: an invalid scenario or argument, named by its key path,
            or an unregistered policy, before anything runs.
    """
    given = _given(
        trace=trace,
        policies=policies,
        loads=loads,
        seeds=seeds,
        model=model,
        gpu=gpu,
        instances=instances,
        tp=tp,
        pd=pd,
        profile=profile,
        slo_ttft_ms=slo_ttft_ms,
        slo_tpot_ms=slo_tpot_ms,
        transforms=transforms,
        **keys,
    )
    spec, scenario_file = _scenario(scenario, given)
    spec.check_policies("sim.compare")
    runner = make_executor(executor, jobs=jobs, address=address)
    if out is None:
        results: dict[str, RunResult] = {}
        points = points_of(spec)

        def done(point: Any, output: PointOutput) -> None:
            results[point.id] = RunResult._from_output(point.spec, output)
            if on_point is not None:
                on_point(results[point.id])

        runner.run(points, done)
        return Comparison([results[p.id] for p in points], scenario=spec)

    def stored(point: Any, from_cache: bool) -> None:
        if on_point is not None:
            on_point(_read_point(Path(out) / "points" / point.id, point.spec))

    run_sweep(spec, out, runner, scenario_file=scenario_file, force=force, on_point=stored)
    loaded = load(out)
    assert isinstance(loaded, Comparison)  # a sweep folder always loads as one
    loaded.scenario = spec
    return loaded


def load(
    path: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
) -> RunResult | Comparison:
    """Read results from disk, as ``llmsched report`` reads them.

    A run folder (``results.parquet`` in it) gives a :class:`RunResult`; a
    sweep folder (``llmsched compare --out``), a folder of run folders, or a
    list of folders gives a :class:`Comparison`. Runs written by the command
    line, by :meth:`RunResult.write`, or by a live replay all load.

    Args:
        slo_ttft_ms, slo_tpot_ms: recompute every summary from the records
            under these SLOs instead of using ``summary.json``.

    Raises:
        ConfigError: a folder without result records, or records missing a required column.
    """
    from sim.report.records import load_sources

    single = isinstance(path, str | os.PathLike)
    dirs = [Path(path)] if single else [Path(p) for p in path]  # type: ignore[union-attr]
    sources = load_sources(
        dirs,  # type: ignore[arg-type]
        slo_ttft_s=None if slo_ttft_ms is None else slo_ttft_ms / 1000.0,
        slo_tpot_s=None if slo_tpot_ms is None else slo_tpot_ms / 1000.0,
    )
    runs = [
        RunResult(
            label=r.label,
            load=r.load,
            seed=r.seed,
            summary=r.summary,
            config=r.config,
            frames={"results": r.results, "queue": r.queue, "batches": r.batches},
            path=r.path,
        )
        for r in sources.runs
    ]
    if single and len(runs) == 1 and (dirs[0] / "results.parquet").is_file():
        return runs[0]
    return Comparison(runs, path=dirs[0] if single else None)


# -- arguments to specs -------------------------------------------------------------


def _given(**values: Any) -> dict[str, Any]:
    """The arguments that were passed (not None)."""
    return {k: v for k, v in values.items() if v is not None}


def _trace_source(value: Any, where: str) -> dict[str, Any] | Trace:
    """A ``[trace]`` table for ``value``, or the in-memory trace itself."""
    if isinstance(value, Trace):
        return value
    if isinstance(value, pandas.DataFrame):
        return Trace(value, name="dataframe")
    if isinstance(value, TraceSpec):
        return value.model_dump(exclude_unset=True)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str | os.PathLike):
        text = os.fspath(value)
        if text in PRESETS and not Path(text).exists():
            return {"generator": {"preset": text}}
        return TraceSpec.source_keys(text)
    raise ConfigError(
        f"{where}: trace: expected a file, bundled:NAME, a generator preset, a mapping, "
        f"a Trace or a DataFrame; got {type(value).__name__}"
    )


def _policy_entry(value: Any, where: str) -> dict[str, Any]:
    """A ``[[policies]]`` entry for ``value``."""
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, PolicySpec):
        return value.model_dump(exclude_unset=True)
    if isinstance(value, Mapping):
        return dict(value)
    raise ConfigError(
        f"{where}: policy: expected a policy name or a mapping of its keys; "
        f"got {type(value).__name__}"
    )


def _check_registered(policy: PolicySpec) -> None:
    try:
        policy.check_registered()
    except ConfigError as exc:
        raise ScenarioError(f"sim.run: policy.{exc}") from None


#: Flat keywords of :func:`compare` and where they go in a scenario.
_CLUSTER_KEYS = ("model", "gpu", "instances", "tp", "pd", "profile", "engine", *SIMULATION_OPTIONS)
_SLO_KEYS = {"slo_ttft_ms": "ttft_ms", "slo_tpot_ms": "tpot_ms"}


def _scenario(source: Any, given: dict[str, Any]) -> tuple[Scenario, Path | None]:
    """The validated scenario, and its file when it is used unchanged (copied into ``out``)."""
    if isinstance(source, str | os.PathLike):
        scenario = load_scenario(source)
        if not given:
            return scenario, Path(source)
        data = scenario.model_dump(exclude_unset=True)  # its paths are absolute now
    elif isinstance(source, Scenario):
        if not given:
            return source, None
        data = source.model_dump(exclude_unset=True)
    elif isinstance(source, Mapping):
        data = _copy(source)
    elif source is None:
        data = {}
    else:
        raise ConfigError(
            "sim.compare: expected a scenario file, a mapping or a Scenario; "
            f"got {type(source).__name__}"
        )
    known = set(Scenario.model_fields)
    limits = set(EngineLimitsSpec.model_fields)
    # Whole tables first, so that flat keys (instances=, slo_ttft_ms=) land inside them.
    ordered = sorted(given.items(), key=lambda item: item[0] not in known)
    for key, value in ordered:
        if key == "trace":
            trace = _trace_source(value, "sim.compare")
            if isinstance(trace, Trace):
                raise ConfigError(
                    "sim.compare: an in-memory trace cannot be compared (points are keyed "
                    "by the trace file); save it with traces.save and pass the path"
                )
            data["trace"] = trace
        elif key == "policies":
            if isinstance(value, str | Mapping):
                value = [value]
            data["policies"] = [_policy_entry(p, "sim.compare") for p in value]
        elif key == "loads":
            data["loads"] = [float(x) for x in value]
        elif key == "seeds":
            data["seeds"] = list(value)
        elif key in _CLUSTER_KEYS:
            data.setdefault("cluster", {})[key] = os.fspath(value) if key == "profile" else value
        elif key in _SLO_KEYS:
            data.setdefault("slo", {})[_SLO_KEYS[key]] = value
        elif key == "transforms":
            data.setdefault("trace", {})["transforms"] = dict(value)
        elif key in limits:
            data.setdefault("cluster", {}).setdefault("limits", {})[key] = value
        elif key in known:
            data[key] = _copy(value)
        else:
            choices = sorted(known | limits | set(_CLUSTER_KEYS) | set(_SLO_KEYS) | {"transforms"})
            raise ConfigError(f"sim.compare: unknown keyword {key!r}; known: {', '.join(choices)}")
    return parse_scenario(data, source="sim.compare"), None


def _copy(value: Any) -> Any:
    """A deep copy as plain data, so filling in keys never changes the caller's mapping."""
    return json.loads(json.dumps(value, default=_plain))


def _plain(value: Any) -> Any:
    """Paths and models inside a scenario mapping, as the plain data a file would hold."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "model_dump"):
        return value.model_dump(exclude_unset=True)
    if isinstance(value, tuple | set):
        return list(value)
    raise TypeError(f"cannot use {type(value).__name__} in a scenario")


def _read_point(point_dir: Path, spec: RunSpec) -> RunResult:
    files = {p.name: p.read_bytes() for p in point_dir.iterdir() if p.is_file()}
    summary = json.loads(files.get("summary.json", b"{}"))
    return RunResult(
        label=spec.policy.display,
        load=spec.load,
        seed=spec.seed,
        summary=summary,
        files={k: v for k, v in files.items() if k not in _SWEEP_FILES},
        spec=spec,
        path=point_dir,
    )


# -- summaries ----------------------------------------------------------------------


def _summary_frame(runs: Sequence[RunResult]) -> pandas.DataFrame:
    """One row per run; columns that hold numbers and ``None`` become float with NaN."""
    rows = [{"label": r.label, "load": r.load, "seed": r.seed, **r.summary} for r in runs]
    frame = pandas.DataFrame(rows)
    for col in frame.columns:
        if frame[col].dtype == object and all(
            v is None or (isinstance(v, int | float) and not isinstance(v, bool))
            for v in frame[col]
        ):
            frame[col] = frame[col].astype("float64")
    return frame


def _jsonable(value: Any) -> Any:
    """NaN and infinities as ``None``, the way ``summary.json`` holds them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
