"""The parts of a run: trace, cluster, policy, SLOs, as validated pydantic models.

:class:`RunSpec` is one simulation, resolved: what :func:`sim.runner.run`
builds and ``llmsched simulate`` makes from its flags; a scenario
(:mod:`sim.scenario`) expands into one per point. Models reject unknown
keys; file paths are taken relative to ``context["base_dir"]`` (the
scenario file's folder) and must exist; names (model, GPU, bundled trace,
generator preset) are checked against the catalogues, and the parameters
of policies already registered against the registry.

The cluster's engine limits come from :data:`sim.limits.LIMIT_OPTIONS`; its
simulator options (:data:`SIMULATION_OPTIONS`: prefix knowledge, gauge poll
interval, what a batch hint means) are recorded in each run's config.
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from scheduler.hardware import gpu_spec, model_spec
from sim.band import resolve_band
from sim.cluster import parse_pd
from sim.limits import LIMIT_OPTIONS, check_engine_settings
from traces.bundled import BUNDLED, bundled_path
from traces.errors import ConfigError
from traces.generator import preset
from traces.transforms import TraceTransforms

__all__ = [
    "SIMULATION_OPTIONS",
    "ClusterSpec",
    "EngineLimitsSpec",
    "GeneratorSpec",
    "PolicySpec",
    "RunSpec",
    "SloSpec",
    "Spec",
    "TraceSpec",
]


#: The :class:`ClusterSpec` keys that set simulator options rather than the cluster's shape
#: (the runner passes them to the simulation and records them in the run's config).
SIMULATION_OPTIONS = ("prefix_knowledge", "poll_interval_ms", "batch_hints")


class Spec(BaseModel):
    """Base of the specs: frozen, unknown keys refused, attribute docstrings as help."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


def _resolve_file(value: str | None, info: ValidationInfo) -> str | None:
    """An existing file, relative to the scenario's folder (``context['base_dir']``)."""
    if value is None:
        return None
    base = Path((info.context or {}).get("base_dir", "."))
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    return str(path.resolve())


class GeneratorSpec(Spec):
    """A synthetic trace: a generator preset with parameter overrides."""

    preset: str = "burstgpt"
    """Preset name (``traces.generator.PRESETS``: burstgpt, chat, api)."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Overrides of ``traces.generator.SyntheticConfig`` fields."""

    @model_validator(mode="after")
    def _valid(self) -> GeneratorSpec:
        preset(self.preset, **self.params)  # ConfigError names the field
        return self


class TraceSpec(Spec):
    """The workload: exactly one of ``path``, ``bundled`` or ``generator``, then transforms."""

    path: str | None = None
    """A trace file in any supported format, relative to the scenario file."""
    bundled: str | None = None
    """A trace shipped with llmsched (``traces.bundled.BUNDLED``)."""
    generator: GeneratorSpec | None = None
    """A synthetic trace."""
    format: str | None = None
    """The file's format, when it cannot be detected."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Loader options of the format (e.g. ``jitter = true`` for Mooncake)."""
    transforms: TraceTransforms = Field(default_factory=TraceTransforms)
    """Window, sample, rate, caps: applied before the load factor."""

    @model_validator(mode="before")
    @classmethod
    def _path_forms(cls, data: Any) -> Any:
        """``path = "bundled:NAME"`` or ``"generator:PRESET"`` reads as on the command line."""
        if isinstance(data, dict) and isinstance(path := data.get("path"), str):
            keys = cls.source_keys(path)
            if "path" not in keys:
                data = {k: v for k, v in data.items() if k != "path"}
                for key, value in keys.items():
                    if key in data:
                        raise ValueError(f"path = {path!r} and {key} both name the workload")
                    data[key] = value
        return data

    @field_validator("path")
    @classmethod
    def _file(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _resolve_file(value, info)

    @field_validator("bundled")
    @classmethod
    def _known_bundled(cls, value: str | None) -> str | None:
        if value is not None and value not in BUNDLED:
            raise ValueError(f"no bundled trace {value!r}; known: {', '.join(sorted(BUNDLED))}")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> TraceSpec:
        given = [k for k in ("path", "bundled", "generator") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of path, bundled, generator; got {given or 'none'}")
        return self

    @property
    def file(self) -> Path | None:
        """The file read (for ``path`` and ``bundled``), else None."""
        if self.bundled is not None:
            return bundled_path(self.bundled)
        return None if self.path is None else Path(self.path)

    def describe(self) -> str:
        """``bundled:NAME``, the path, or ``generator:PRESET``: what :meth:`source_keys` reads."""
        if self.bundled is not None:
            return f"bundled:{self.bundled}"
        if self.generator is not None:
            return f"generator:{self.generator.preset}"
        return str(self.path)

    @staticmethod
    def source_keys(text: str) -> dict[str, Any]:
        """The ``[trace]`` keys a source as users type it names.

        ``bundled:NAME`` and ``generator:PRESET`` (the forms :meth:`describe`
        writes), else a path.
        """
        if text.startswith("bundled:"):
            return {"bundled": text.removeprefix("bundled:")}
        if text.startswith("generator:"):
            return {"generator": {"preset": text.removeprefix("generator:")}}
        return {"path": text}


class _EngineLimitsBase(Spec):
    """Engine limits under the engine's own names; unset ones take its defaults for the model and GPU.

    One optional field per row of :data:`sim.limits.LIMIT_OPTIONS` (the one
    table of engine settings, SGLang's and vLLM's; a switch defaults to off),
    bounds checked from the table, so a limit added there is a scenario key
    at once. Which engine's names are allowed is the cluster's ``engine``.
    """

    @field_validator("*")
    @classmethod
    def _bounds(cls, value: Any, info: ValidationInfo) -> Any:
        option = _LIMITS_BY_KEY[info.field_name]
        if value is None or option.type is bool:
            return value
        kind = "an integer" if option.type is int else "a number"
        for word, bound, holds in (
            (">=", option.ge, operator.ge),
            (">", option.gt, operator.gt),
            ("<=", option.le, operator.le),
        ):
            if bound is not None and not holds(value, bound):
                raise ValueError(f"expected {kind} {word} {bound:g}; got {value}")
        return value

    def resolve_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`sim.limits.resolve_limits` these settings make."""
        return {o.resolve_kwarg: getattr(self, o.key) for o in LIMIT_OPTIONS}

    def given(self) -> list[str]:
        """The keys set (a switch counts when on)."""
        return [o.key for o in LIMIT_OPTIONS if getattr(self, o.key) not in (None, False)]


_LIMITS_BY_KEY = {o.key: o for o in LIMIT_OPTIONS}

#: ``[cluster.limits]``: one optional field per :data:`sim.limits.LIMIT_OPTIONS`
#: row (a switch defaults to off); unset limits take the engine's defaults.
EngineLimitsSpec = create_model(
    "EngineLimitsSpec",
    __base__=_EngineLimitsBase,
    __module__=__name__,
    __doc__=_EngineLimitsBase.__doc__,
    **{
        o.key: (bool, Field(False, description=o.help))
        if o.type is bool
        else (o.type | None, Field(None, description=o.help))
        for o in LIMIT_OPTIONS
    },
)


class ClusterSpec(Spec):
    """The simulated serving cluster."""

    model: str = "qwen2.5-32b"
    """Served model: a catalogue name, a Hugging Face config.json (relative to the scenario
    file) or KEY=VALUE pairs (``scheduler/describe.py``)."""
    gpu: str = "h200"
    """Device of every instance: a catalogue GPU, or KEY=VALUE pairs or a JSON file of them
    (peak FLOP/s, memory bandwidth, memory; ``scheduler/describe.py``)."""
    instances: int = Field(1, gt=0)
    """Mixed instances (ignored with ``pd``)."""
    tp: int = Field(1, gt=0)
    """Tensor parallelism of each instance."""
    pd: str | None = None
    """Prefill/decode split ``"P:D"`` (quote it in YAML)."""
    profile: str | None = None
    """Calibrated cost profile (``llmsched calibrate``), relative to the scenario file."""
    engine: Literal["sglang", "vllm"] = "sglang"
    """Whose scheduler each instance follows, and whose names and defaults its limits take:
    ``sglang`` (prefill and decode batches alternate) or ``vllm`` (V1: one token budget per
    step, decodes first, prefill chunks after)."""
    limits: EngineLimitsSpec = Field(default_factory=EngineLimitsSpec)
    """Engine limits, under the engine's names (``sim.limits.LIMIT_OPTIONS``)."""
    prefix_knowledge: Literal["estimate", "oracle"] = "estimate"
    """What policies know of cached prefixes: ``estimate``, the router's own record of the
    prefixes it sent where (what a live router knows), or ``oracle``, each engine's exact
    cache (research only)."""
    poll_interval_ms: float = Field(0.0, ge=0, allow_inf_nan=False)
    """How late backend-reported gauges (waiting requests, KV use) reach policies, ms, as a
    router polling each backend sees them; 0 reads them live."""
    batch_hints: Literal["graph", "group"] = "graph"
    """What a policy's batch hint means: ``graph``, the hinted group runs as one captured
    CUDA-graph prefill (needs the engine patch); ``group``, a stock engine: the group is
    released together and lands in one engine step as ordinary arrivals."""

    @field_validator("profile")
    @classmethod
    def _profile(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _resolve_file(value, info)

    @field_validator("limits")
    @classmethod
    def _limits_of_the_engine(cls, value: Any, info: ValidationInfo) -> Any:
        engine = info.data.get("engine")
        if engine is not None:
            try:
                check_engine_settings(engine, value.given())
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("model")
    @classmethod
    def _model(cls, value: str, info: ValidationInfo) -> str:
        if "=" not in value and value.strip().lower().endswith(".json"):
            value = _resolve_file(value, info)  # a config.json, relative to the scenario
        model_spec(value)
        return value

    @field_validator("gpu")
    @classmethod
    def _gpu(cls, value: str, info: ValidationInfo) -> str:
        if "=" not in value and value.strip().lower().endswith(".json"):
            value = _resolve_file(value, info)  # a device file, relative to the scenario
        gpu_spec(value)
        return value

    @field_validator("tp")
    @classmethod
    def _tp(cls, value: int, info: ValidationInfo) -> int:
        """Tensor parallelism splits attention heads evenly, and KV heads evenly or replicated
        (as SGLang and vLLM require)."""
        if "model" not in info.data:  # the model was refused already
            return value
        spec = model_spec(info.data["model"])

        def fits(tp: int) -> bool:
            kv = spec.n_kv_heads
            return spec.n_heads % tp == 0 and (kv % tp == 0 or tp % kv == 0)

        if not fits(value):
            ok = [tp for tp in range(1, spec.n_heads + 1) if fits(tp)]
            raise ValueError(
                f"expected a tensor-parallel size that splits the {spec.n_heads} attention "
                f"and {spec.n_kv_heads} KV heads of {info.data['model']} "
                f"({', '.join(map(str, ok))}); got {value}"
            )
        return value

    @field_validator("pd", mode="before")
    @classmethod
    def _pd(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            # YAML 1.1 reads an unquoted 1:3 as the base-60 number 63.
            raise ValueError(
                f'expected a quoted "P:D" string (YAML reads 1:3 as a number); got {value}'
            )
        if isinstance(value, str):
            try:
                parse_pd(value)
            except ConfigError:
                raise ValueError(
                    f"expected P:D with two positive integers; got {value!r}"
                ) from None
        return value


class PolicySpec(Spec):
    """One policy to compare, with its parameters (and a decode policy under PD)."""

    name: str
    """Registered policy name (``llmsched policies``)."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Policy parameters."""
    decode: str | None = None
    """Routing policy choosing decode instances (needs ``cluster.pd``)."""
    decode_params: dict[str, Any] = Field(default_factory=dict)
    """Parameters of the decode policy."""
    decode_choice: Literal["handoff", "dispatch"] = "handoff"
    """When the decode policy chooses: when the prefill finishes (vLLM's flow) or when the
    request is sent (SGLang's PD router sends it to both servers at once)."""
    label: str | None = None
    """Name in reports (default: the policy name, ``+decode`` appended)."""

    @property
    def display(self) -> str:
        """The label reports use."""
        if self.label:
            return self.label
        return self.name if self.decode is None else f"{self.name}+{self.decode}"

    @field_validator("params")
    @classmethod
    def _params(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from scheduler.registry import create, names

        name = info.data.get("name")
        if name in names():
            create(name, **value)  # ConfigError names the parameter
        return value

    @field_validator("decode")
    @classmethod
    def _decode(cls, value: str | None) -> str | None:
        from scheduler.registry import check_decode_policy, names

        if value in names():
            try:
                check_decode_policy(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("decode_params")
    @classmethod
    def _decode_params(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from scheduler.registry import create, names

        decode = info.data.get("decode")
        if value and decode is None and "decode" not in info.data:
            return value  # the decode name itself failed; that error is reported
        if value and decode is None:
            raise ValueError("decode_params given without a decode policy")
        if decode in names():
            create(decode, **value)
        return value

    def check_registered(self) -> None:
        """Raise :class:`ConfigError` listing the known policies if a name is not registered."""
        from scheduler.registry import policy_class

        for key in ("name", "decode"):
            value = getattr(self, key)
            if value is not None:
                try:
                    policy_class(value)
                except ConfigError as exc:
                    raise ConfigError(f"{key}: {exc}") from None


class SloSpec(Spec):
    """Service-level objectives (per-request SLOs in the trace win)."""

    ttft_ms: float | None = Field(None, gt=0, allow_inf_nan=False)
    """Time to first token, ms."""
    tpot_ms: float | None = Field(None, gt=0, allow_inf_nan=False)
    """Time per output token, ms."""

    @property
    def ttft_s(self) -> float | None:
        return None if self.ttft_ms is None else self.ttft_ms / 1000.0

    @property
    def tpot_s(self) -> float | None:
        return None if self.tpot_ms is None else self.tpot_ms / 1000.0


class RunSpec(Spec):
    """One simulation: what :func:`sim.runner.run` needs, fully resolved."""

    trace: TraceSpec
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    policy: PolicySpec
    slo: SloSpec = Field(default_factory=SloSpec)
    load: float = Field(1.0, gt=0, allow_inf_nan=False)
    """Rate scale factor: arrival times are divided by it."""
    seed: int = 0
    fast_forward: bool = True
    """Advance unchanged decode batches in one event (same results, faster)."""
    band: float | str | None = None
    """Relative step-cost error: also simulate with every step cost scaled by ``1 - band``
    and ``1 + band``, and give each headline figure a range (``sim.band``); ``"profile"``:
    the fit error of ``cluster.profile``. Resolved to the number on validation."""

    @field_validator("band")
    @classmethod
    def _band(cls, value: float | str | None, info: ValidationInfo) -> float | None:
        cluster = info.data.get("cluster")
        if cluster is None:  # the cluster was refused already
            return None
        return resolve_band(value, cluster.profile)

    @model_validator(mode="after")
    def _decode_needs_pd(self) -> RunSpec:
        if self.policy.decode is not None and self.cluster.pd is None:
            raise ValueError("policy.decode: a decode policy needs cluster.pd")
        return self
