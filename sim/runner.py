"""From a validated run spec to a simulation: the one place a run is put together.

``llmsched simulate`` and ``llmsched compare`` (every point of a sweep, on
any executor) build their runs here, so the same spec gives the same run:

1. the workload: the trace (file, bundled or generated), its transforms,
   then the load factor (arrival times divided by ``load``);
2. the cost model and the engine's limits (SGLang's or vLLM's) with the spec's overrides
   (:data:`sim.limits.LIMIT_OPTIONS`);
3. the policy, or the prefill/decode pair under PD. Parameters the spec
   leaves unset are filled from the run where the policy takes them: ``seed``
   from the run's seed, ``slo_ttft_ms`` from the run's TTFT SLO; a policy
   with a ``use_cost_model`` hook gets the cluster's cost model unless its
   ``model`` parameter names one;
4. :class:`sim.loop.Simulation`, with the cluster's simulator options
   (:data:`sim.specs.SIMULATION_OPTIONS`: what policies may know of prefixes,
   how late backend gauges arrive, what a batch hint means), which the run's
   config (``summary.json``) records;
5. with a band (``RunSpec.band``), the same run twice more with every step
   cost scaled by ``1 - band`` and ``1 + band`` (:mod:`sim.band`), whose
   figures the result's summary carries as ``<key>_lo`` and ``<key>_hi``.

The trace at load 1 (after transforms) can be passed in ready-made
(:func:`load_workload`), so a sweep loads it once per seed; each process
also keeps the last few it loaded.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scheduler.cost_model import CostModel
from scheduler.policy import Policy
from scheduler.registry import check_decode_policy, create, create_pd, describe, policy_class
from sim.band import Band, band_factors, scaled_cost
from sim.limits import EngineLimits, default_limits, resolve_limits
from sim.loop import Simulation
from sim.metrics import SimResult
from sim.specs import SIMULATION_OPTIONS, ClusterSpec, PolicySpec, RunSpec, TraceSpec
from traces.generator import generate, preset
from traces.loaders import load
from traces.trace import Trace
from traces.transforms import time_scale

__all__ = [
    "PreparedRun",
    "build_engine",
    "build_policy",
    "load_workload",
    "prepare",
    "run",
    "scale_load",
    "simulation_options",
]

#: Base workloads a process keeps, keyed by (trace spec, seed).
_CACHE_SIZE = 4
_workloads: OrderedDict[tuple[str, int], Trace] = OrderedDict()


def load_workload(spec: TraceSpec, seed: int = 0) -> Trace:
    """The trace at load 1: loaded or generated, transforms applied.

    ``seed`` seeds the generator and the sample unless the spec sets them.

    Raises:
        TraceError, TraceFormatError, ConfigError: as the loaders and transforms do.
    """
    key = (spec.model_dump_json(), seed)
    if key in _workloads:
        _workloads.move_to_end(key)
        return _workloads[key]
    if spec.generator is not None:
        params = {"seed": seed, **spec.generator.params}
        trace = generate(preset(spec.generator.preset, **params))
    else:
        trace = load(spec.file, format=spec.format, **spec.options)  # type: ignore[arg-type]
    transforms = spec.transforms
    if transforms.sample is not None and "sample_seed" not in transforms.model_fields_set:
        transforms = transforms.model_copy(update={"sample_seed": seed})
    trace = transforms.apply(trace)
    _workloads[key] = trace
    while len(_workloads) > _CACHE_SIZE:
        _workloads.popitem(last=False)
    return trace


def scale_load(trace: Trace, load: float) -> Trace:
    """``trace`` with its arrival rate multiplied by ``load`` (arrival times divided by it)."""
    return trace if load == 1.0 else time_scale(trace, 1.0 / load)


def build_engine(cluster: ClusterSpec) -> tuple[CostModel, EngineLimits]:
    """The cost model and engine limits of every instance of ``cluster``."""
    cost = CostModel.from_names(cluster.model, cluster.gpu, cluster.tp, cluster.profile)
    defaults = default_limits(cluster.engine, cluster.model, cluster.gpu, cluster.tp)
    kwargs = cluster.limits.resolve_kwargs()
    return cost, resolve_limits(cost, defaults, engine=cluster.engine, **kwargs)


def simulation_options(cluster: ClusterSpec) -> dict[str, Any]:
    """The keyword arguments of :class:`sim.loop.Simulation` that the cluster's options set.

    ``prefix_knowledge`` and ``batch_hints`` as given, ``poll_interval_ms``
    as ``poll_interval_s`` in seconds. Only options that differ from their
    defaults are passed, so a simulator that predates one still runs the
    default case.
    """
    out: dict[str, Any] = {}
    for key in SIMULATION_OPTIONS:
        value = getattr(cluster, key)
        if value != ClusterSpec.model_fields[key].default:
            out[key] = value
    if "poll_interval_ms" in out:
        out["poll_interval_s"] = out.pop("poll_interval_ms") / 1000.0
    return out


def _filled(name: str, params: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``params`` plus those of ``defaults`` the policy takes and ``params`` leaves unset."""
    takes = {p.param for p in describe(name)}
    extra = {k: v for k, v in defaults.items() if k in takes and k not in params and v is not None}
    return {**params, **extra}


def build_policy(
    spec: PolicySpec,
    seed: int = 0,
    *,
    slo_ttft_ms: float | None = None,
    cost: CostModel | None = None,
) -> Policy:
    """The policy (a prefill/decode pair when ``spec.decode`` is set), set up for the run.

    ``seed`` and ``slo_ttft_ms`` fill the parameters of those names that
    ``spec`` leaves unset; ``cost`` goes to a ``use_cost_model`` hook unless
    the policy's ``model`` parameter is set.

    Raises:
        ConfigError: an unregistered name (the message lists the known
            policies) or a bad parameter (the message names it).
    """
    policy_class(spec.name)  # unknown names raise the registry's one message
    if spec.decode is not None:
        check_decode_policy(spec.decode)
    defaults = {"seed": seed, "slo_ttft_ms": slo_ttft_ms}
    params = _filled(spec.name, spec.params, defaults)
    if spec.decode is None:
        policy = create(spec.name, **params)
        prefill = policy
    else:
        policy = create_pd(
            spec.name,
            spec.decode,
            prefill_params=params,
            decode_params=_filled(spec.decode, spec.decode_params, defaults),
            decode_choice=spec.decode_choice,
        )
        prefill = policy.prefill  # type: ignore[attr-defined]
    hook = getattr(prefill, "use_cost_model", None)
    if cost is not None and callable(hook) and not params.get("model"):
        hook(cost)
    return policy


@dataclass
class PreparedRun:
    """A run ready to go: its workload, cost model, limits and policy."""

    spec: RunSpec
    trace: Trace
    cost: CostModel
    limits: EngineLimits
    policy: Policy
    timing: dict[str, float] = field(default_factory=dict)

    @property
    def n_simulations(self) -> int:
        """How many simulations :meth:`run` makes: 3 with a band (costs as given, down, up), else 1."""
        return 1 if self.spec.band is None else 3

    def run(
        self, *, progress: Callable[[int], None] | None = None, progress_every: int = 0
    ) -> SimResult:
        """Simulate; with a band, again with every step cost scaled by ``1 - band`` and
        ``1 + band`` (:mod:`sim.band`), each with a fresh policy that sees the cost model
        as given. The band's results land in the result's ``band``.

        ``progress`` counts the requests simulated over every simulation
        (:attr:`n_simulations` times the trace's). Wall and CPU seconds of
        the run land in :attr:`timing` (``wall_s``, ``cpu_s``), those of the
        band's two runs as ``band_wall_s`` and ``band_cpu_s``.
        """
        wall0, cpu0 = time.perf_counter(), time.process_time()
        result = self._simulate(self.cost, self.policy, progress, progress_every, 0)
        self.timing = {
            "wall_s": time.perf_counter() - wall0,
            "cpu_s": time.process_time() - cpu0,
        }
        rel = self.spec.band
        if rel is not None:
            wall0, cpu0 = time.perf_counter(), time.process_time()
            n = len(self.trace)
            s, ends = self.spec, []
            for factor, done_before in zip(band_factors(rel), (n, 2 * n), strict=True):
                policy = build_policy(s.policy, s.seed, slo_ttft_ms=s.slo.ttft_ms, cost=self.cost)
                cost = scaled_cost(self.cost, factor)
                ends.append(self._simulate(cost, policy, progress, progress_every, done_before))
            result.band = Band(rel, *ends)
            self.timing |= {
                "band_wall_s": time.perf_counter() - wall0,
                "band_cpu_s": time.process_time() - cpu0,
            }
        return result

    def _simulate(
        self,
        cost: CostModel,
        policy: Policy,
        progress: Callable[[int], None] | None,
        progress_every: int,
        done_before: int,
    ) -> SimResult:
        """One simulation of the workload under ``cost`` and ``policy``."""
        c = self.spec.cluster
        if progress is not None and done_before:
            report, progress = progress, lambda done: report(done_before + done)
        sim = Simulation(
            self.trace,
            cost,
            policy,
            self.limits,
            instances=c.instances,
            pd=c.pd,
            **simulation_options(c),
            fast_forward=self.spec.fast_forward,
            progress=progress,
            progress_every=progress_every,
        )
        return sim.run()

    def _defaults(self) -> dict[str, Any]:
        return {"seed": self.spec.seed, "slo_ttft_ms": self.spec.slo.ttft_ms}

    def config(self) -> dict[str, Any]:
        """How the run was set up: stored under ``config`` in ``summary.json``."""
        s, c = self.spec, self.spec.cluster
        span = self.trace.span_s
        return {
            "label": s.policy.display,
            "policy": s.policy.name,
            "policy_params": _filled(s.policy.name, s.policy.params, self._defaults()),
            "decode_policy": s.policy.decode,
            "decode_policy_params": _filled(
                s.policy.decode, s.policy.decode_params, self._defaults()
            )
            if s.policy.decode
            else {},
            "decode_choice": s.policy.decode_choice if s.policy.decode else None,
            "load": s.load,
            "seed": s.seed,
            "trace": s.trace.describe(),
            "n_requests": len(self.trace),
            "offered_rps": len(self.trace) / span if span > 0 else None,
            "model": c.model,
            "gpu": c.gpu,
            "tp": c.tp,
            "instances": c.instances if c.pd is None else sum(map(int, c.pd.split(":"))),
            "pd": c.pd,
            "limits": dataclasses.asdict(self.limits),
            # What the policies could know, and what a batch hint meant (reports say which).
            **{key: getattr(c, key) for key in SIMULATION_OPTIONS},
            "slo_ttft_ms": s.slo.ttft_ms,
            "slo_tpot_ms": s.slo.tpot_ms,
            "fast_forward": s.fast_forward,
            "spec": s.model_dump(mode="json"),
            **self.timing,
        }


def prepare(spec: RunSpec, *, trace: Trace | None = None) -> PreparedRun:
    """Build everything ``spec`` names; ``trace`` is its workload at load 1 if already loaded."""
    cost, limits = build_engine(spec.cluster)
    policy = build_policy(spec.policy, spec.seed, slo_ttft_ms=spec.slo.ttft_ms, cost=cost)
    base = trace if trace is not None else load_workload(spec.trace, spec.seed)
    return PreparedRun(spec, scale_load(base, spec.load), cost, limits, policy)


def run(spec: RunSpec, *, trace: Trace | None = None) -> SimResult:
    """Simulate ``spec`` and return its result (see :func:`prepare`)."""
    return prepare(spec, trace=trace).run()
