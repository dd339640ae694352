"""Scenario files: which policies to compare, on what workload and cluster, at which loads.

The parts (trace, cluster, policies, SLOs) are the models of :mod:`sim.specs`;
a scenario adds loads, seeds and report options, and expands into one
:class:`~sim.specs.RunSpec` per (policy, load, seed).

A scenario is a TOML file (or YAML, ``.yaml``/``.yml``) read by
:func:`load_scenario` and validated with pydantic; every error names the
file and the key path (``cluster.instances: Input should be greater than 0``)::

    name = "demo"
    loads = [0.5, 1.0, 2.0]     # rate scale factors: 2.0 = twice the trace's arrival rate
    seeds = [0]
    band = 0.05                 # each point also with step costs x0.95 and x1.05: ranges
                                # ("profile": the fit error of cluster.profile)

    [trace]
    bundled = "azure-code"      # or: path = "my.parquet" (relative to this file),
                                # or: [trace.generator] preset = "chat", params = {...}
    [trace.transforms]          # traces.transforms.TraceTransforms, applied before the load
    window_s = [0, 600]

    [cluster]
    model = "llama-3.1-8b"
    gpu = "h100"
    instances = 4               # or pd = "1:3" for prefill/decode disaggregation
    prefix_knowledge = "estimate"   # or "oracle": policies see each engine's exact cache
    poll_interval_ms = 0        # backend gauges reach policies this late (0: live)
    batch_hints = "graph"       # or "group": a stock engine, hinted groups land in one step
    engine = "sglang"           # or "vllm": vLLM V1's scheduler, limit names and defaults
    [cluster.limits]            # the engine's names (sim.limits.LIMIT_OPTIONS); unset
    max_running_requests = 256  # ones take its defaults (vllm: max_num_seqs = 256)

    [slo]
    ttft_ms = 1000
    tpot_ms = 100

    [[policies]]
    name = "least_load"
    [[policies]]
    name = "power_of_two"
    label = "p2c"
    params = { seed = 3 }

**Load.** A load point ``x`` multiplies the arrival rate of the trace (after
its transforms) by ``x``: every arrival time is divided by ``x``, so the
same requests arrive ``x`` times as fast.

**Seeds.** Each point's seed seeds, unless the scenario sets them itself,
the policy's ``seed`` parameter (random policies), the generator's
``seed`` and the transforms' ``sample_seed``. Likewise a policy taking
``slo_ttft_ms`` gets ``slo.ttft_ms``, and one with a cost-model hook gets the
cluster's cost model (:mod:`sim.runner`).

Policy names are checked against the registry when a point is built, not
when the file is read, so a scenario may name a policy that a later version
registers; parameters of policies already registered are checked at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from sim.band import resolve_band
from sim.specs import ClusterSpec, PolicySpec, RunSpec, SloSpec, Spec, TraceSpec
from traces.configfile import read_table_file, validation_messages
from traces.errors import ConfigError

__all__ = [
    "ReportSpec",
    "Scenario",
    "ScenarioError",
    "load_scenario",
    "override_cluster",
    "parse_run",
    "parse_scenario",
    "validation_messages",
]


class ScenarioError(ConfigError):
    """A scenario (file or flags) is invalid; the message lists each key path and its problem."""


class ReportSpec(Spec):
    """Report options."""

    title: str | None = None
    """Report title (default: the scenario's name)."""
    short_prompt_tokens: int = Field(256, ge=1)
    """Prompts with at most this many uncached tokens count as short in the TTFT split."""
    timeline_load: float | None = Field(None, gt=0)
    """Load of the point whose queue timeline and TTFT CDF are shown (default: the highest)."""
    timeline_seed: int | None = None
    """Seed of that point (default: the first)."""


class Scenario(Spec):
    """A comparison: every policy at every load for every seed."""

    name: str = "scenario"
    """Short name, shown in the report."""
    description: str = ""
    """What the comparison is for."""
    loads: list[float] = Field(default_factory=lambda: [1.0], min_length=1)
    """Rate scale factors (2.0 = twice the trace's arrival rate)."""
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    """Seeds; each point runs once per seed."""
    trace: TraceSpec
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    policies: list[PolicySpec] = Field(min_length=1)
    slo: SloSpec = Field(default_factory=SloSpec)
    band: float | str | None = None
    """Relative step-cost error: every point also runs with step costs scaled by
    ``1 - band`` and ``1 + band``, and the report shows each figure's range; ``"profile"``:
    the fit error of ``cluster.profile`` (``sim.band``)."""
    report: ReportSpec = Field(default_factory=ReportSpec)

    @field_validator("band")
    @classmethod
    def _band(cls, value: float | str | None, info: ValidationInfo) -> float | str | None:
        cluster = info.data.get("cluster")
        if cluster is not None:
            resolve_band(value, cluster.profile)  # refuses what no point could run
        return value

    @field_validator("loads")
    @classmethod
    def _loads(cls, value: list[float]) -> list[float]:
        for x in value:
            if not (math.isfinite(x) and x > 0):
                raise ValueError(f"each load must be a positive number; got {x}")
        if len(set(value)) != len(value):
            raise ValueError("loads repeat")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("seeds repeat")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        labels = [p.display for p in self.policies]
        twice = sorted({x for x in labels if labels.count(x) > 1})
        if twice:
            raise ValueError(f"policies: labels must differ; repeated: {', '.join(twice)}")
        for i, p in enumerate(self.policies):
            if p.decode is not None and self.cluster.pd is None:
                raise ValueError(f"policies[{i}].decode: a decode policy needs cluster.pd")
        load = self.report.timeline_load
        if load is not None and load not in self.loads:
            raise ValueError(f"report.timeline_load: {load} is not one of loads {self.loads}")
        return self

    def check_policies(self, source: str = "scenario") -> None:
        """Raise :class:`ScenarioError` if a policy is not registered (lists the known ones)."""
        for i, p in enumerate(self.policies):
            try:
                p.check_registered()
            except ConfigError as exc:
                raise ScenarioError(f"{source}: policies[{i}].{exc}") from None

    def runs(self) -> list[RunSpec]:
        """Every (policy, load, seed) point, policies outermost; a ``"profile"`` band as its number."""
        band = resolve_band(self.band, self.cluster.profile)
        return [
            RunSpec(
                trace=self.trace,
                cluster=self.cluster,
                policy=p,
                slo=self.slo,
                load=load,
                seed=seed,
                band=band,
            )
            for p in self.policies
            for load in self.loads
            for seed in self.seeds
        ]


# -- reading files ------------------------------------------------------------------


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a TOML or YAML scenario file.

    Relative paths inside it (trace, profile) are taken from the file's folder.

    Raises:
        ScenarioError: unreadable file, bad syntax, or invalid keys; the
            message names the file and each key path with its problem.
    """
    path = Path(path)
    if not path.is_file():
        raise ScenarioError(f"{path}: no such scenario file")
    try:
        data = read_table_file(path)
    except ConfigError as exc:
        raise ScenarioError(str(exc)) from None
    return parse_scenario(data, source=str(path), base_dir=path.parent)


def parse_scenario(
    data: dict[str, Any], *, source: str = "scenario", base_dir: str | Path = "."
) -> Scenario:
    """Validate a scenario given as a mapping (see :func:`load_scenario`)."""
    return _validate(Scenario, data, source, base_dir)


def override_cluster(
    scenario: Scenario,
    settings: dict[str, Any],
    *,
    source: str = "options",
    flags: Mapping[str, str] | None = None,
) -> Scenario:
    """``scenario`` with the ``[cluster]`` keys of ``settings`` replaced, checked again.

    ``settings["limits"]`` is merged key by key into ``[cluster.limits]``
    (what ``llmsched compare``'s flags do to a scenario file). ``flags`` maps
    key paths within ``[cluster]`` (``limits.max_total_tokens``) to the flag
    that set them, which an error then names (as in :func:`parse_run`).

    Raises:
        ScenarioError: an invalid value; the message starts with ``source``.
    """
    if not settings.get("limits") and not settings.keys() - {"limits"}:
        return scenario
    data = scenario.cluster.model_dump()
    data["limits"].update(settings.get("limits", {}))
    data.update({k: v for k, v in settings.items() if k != "limits"})
    cluster = _validate(ClusterSpec, data, source, ".", flags)
    return scenario.model_copy(update={"cluster": cluster})


def parse_run(
    data: dict[str, Any],
    *,
    source: str = "options",
    base_dir: str | Path = ".",
    flags: Mapping[str, str] | None = None,
) -> RunSpec:
    """Validate one run given as a mapping (what ``llmsched simulate`` builds from its flags).

    ``flags`` maps key paths (``cluster.pd``, ``policy.params``) to the flag
    that set them (``--pd``, ``--policy-param``): an error under such a key
    names the flag instead of ``source`` and the path.
    """
    return _validate(RunSpec, data, source, base_dir, flags)


def _validate(
    model: type[Spec],
    data: Any,
    source: str,
    base_dir: str | Path,
    flags: Mapping[str, str] | None = None,
) -> Any:
    try:
        return model.model_validate(data, context={"base_dir": str(base_dir)})
    except ValidationError as exc:
        lines = [_by_flag(line, flags or {}) for line in validation_messages(exc, model)]
        if all(line.startswith("--") for line in lines):
            raise ScenarioError("\n  ".join(lines)) from None
        raise ScenarioError(f"{source}: " + "\n  ".join(lines)) from None


def _by_flag(line: str, flags: Mapping[str, str]) -> str:
    """``cluster.pd: problem`` as ``--pd: problem`` when ``flags`` names that key's flag."""
    where, sep, problem = line.partition(": ")
    if not sep:
        return line
    for key in sorted(flags, key=len, reverse=True):  # the most specific key first
        if where == key or where.startswith((key + ".", key + "[")):
            rest = where[len(key) :].lstrip(".")
            return f"{flags[key]}{' ' + rest if rest else ''}: {problem}"
    return line
