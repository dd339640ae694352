"""Engine limits of one simulated instance, under SGLang's names.

Defaults come from :func:`scheduler.hardware.sglang_defaults` (what SGLang
picks for a model and GPU); any of them can be overridden, as on SGLang's
command line.

:data:`LIMIT_OPTIONS` is the one table of the settings a user may give:
the scenario's ``[cluster.limits]`` keys (:class:`sim.specs.EngineLimitsSpec`),
the ``llmsched simulate`` and ``compare`` flags, the keyword arguments the
runner passes to :func:`resolve_limits`, and their help text are all made
from it, so adding a limit is one row here (and the :class:`EngineLimits`
field the engine reads, which a test keeps in step with the table).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from scheduler.cost_model import StepCost
from traces.errors import ConfigError

__all__ = ["LIMIT_OPTIONS", "EngineLimits", "LimitOption", "resolve_limits"]


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """How one instance batches.

    Attributes:
        max_running_requests: requests admitted at once (prefilling or decoding).
        max_prefill_tokens: new tokens one prefill batch may hold.
        chunked_prefill_size: longest prefill chunk; a longer prompt is split
            over several steps. ``<= 0`` disables chunking (a prompt over the
            budget then runs alone in one step).
        max_total_tokens: KV-cache slots of the instance.
        cuda_graph_max_bs: decode batches up to this size run as CUDA graphs
            (the cost model may price them lower).
        mixed_chunk: run prefill chunks and decodes in one step (vLLM's
            behaviour, SGLang's ``--enable-mixed-chunk``); otherwise prefill
            and decode batches alternate, prefill first when one can be formed
            (SGLang's default).
    """

    max_running_requests: int
    max_prefill_tokens: int
    chunked_prefill_size: int
    max_total_tokens: int
    cuda_graph_max_bs: int = 0
    mixed_chunk: bool = False

    def __post_init__(self) -> None:
        for name in ("max_running_requests", "max_prefill_tokens", "max_total_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: expected an integer >= 1; got {value!r}")
        for name in ("chunked_prefill_size", "cuda_graph_max_bs"):
            if not isinstance(getattr(self, name), int):
                raise ConfigError(f"{name}: expected an integer; got {getattr(self, name)!r}")

    @property
    def chunking(self) -> bool:
        """Whether long prompts are prefilled in chunks."""
        return self.chunked_prefill_size > 0

    @property
    def step_budget_tokens(self) -> int:
        """New tokens one step may compute (prefill chunks, plus decodes when mixed)."""
        if self.chunked_prefill_size > 0:
            return min(self.max_prefill_tokens, self.chunked_prefill_size)
        return self.max_prefill_tokens


@dataclass(frozen=True, slots=True)
class LimitOption:
    """One engine setting a user may give: its scenario key, flag, type, bounds and help.

    Attributes:
        key: SGLang's server-argument name: the scenario key under
            ``[cluster.limits]``.
        type: ``int``, ``float`` or ``bool`` (a bool is an on-switch flag).
        help: one line for the CLI and the scenario reference.
        flag: the CLI flag (default ``--`` and the key with dashes).
        kwarg: the :func:`resolve_limits` keyword it feeds (default the key).
        ge, gt, le: bounds on a number, checked when a scenario is read.
    """

    key: str
    type: type
    help: str
    flag: str = ""
    kwarg: str = ""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    @property
    def cli_flag(self) -> str:
        """The flag a user types."""
        return self.flag or "--" + self.key.replace("_", "-")

    @property
    def resolve_kwarg(self) -> str:
        """The keyword of :func:`resolve_limits` this setting is passed as."""
        return self.kwarg or self.key


#: Every engine setting, in the order the CLI lists them.
LIMIT_OPTIONS: tuple[LimitOption, ...] = (
    LimitOption("max_running_requests", int, "Requests admitted at once (SGLang limit).", ge=1),
    LimitOption(
        "max_prefill_tokens", int, "New tokens one prefill batch may hold (SGLang limit).", ge=1
    ),
    LimitOption("chunked_prefill_size", int, "Longest prefill chunk; 0 or less disables chunking."),
    LimitOption("max_total_tokens", int, "KV-cache token slots.", ge=1),
    LimitOption("cuda_graph_max_bs", int, "Largest decode batch run as a CUDA graph."),
    LimitOption(
        "mem_fraction_static",
        float,
        "GPU memory share for weights and KV cache (sets max_total_tokens when that is unset).",
        gt=0,
        le=1,
    ),
    # SGLang's flag is --enable-mixed-chunk; the scenario key keeps that name,
    # the CLI keeps its shorter --mixed-chunk.
    LimitOption(
        "enable_mixed_chunk",
        bool,
        "Mix prefill chunks into decode steps.",
        flag="--mixed-chunk",
        kwarg="mixed_chunk",
    ),
)

#: Settings that are not limits themselves but decide one (the KV capacity).
_INPUTS = ("mem_fraction_static",)


def resolve_limits(
    cost: StepCost,
    defaults: Any,
    *,
    mem_fraction_static: float | None = None,
    mixed_chunk: bool = False,
    **overrides: int | None,
) -> EngineLimits:
    """Engine limits: SGLang's ``defaults`` with the user's ``overrides`` applied.

    ``defaults`` is a record with SGLang's fields (``sglang_defaults(...)``);
    the keywords are the :data:`LIMIT_OPTIONS` (``resolve_kwarg``). When
    ``mem_fraction_static`` is given and ``max_total_tokens`` is not, the KV
    capacity is recomputed from it with ``cost.kv_capacity_tokens``.
    Overrides that are ``None`` keep the default.

    Raises:
        ConfigError: an unknown override or an invalid value.
    """
    names = {o.resolve_kwarg for o in LIMIT_OPTIONS} - set(_INPUTS) - {"mixed_chunk"}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown engine limit(s) {unknown}; known: {sorted(names)}")
    # SGLang picks every limit but the mixed-chunk switch, which it leaves off.
    base = EngineLimits(
        **{f.name: int(getattr(defaults, f.name)) for f in fields(EngineLimits) if f.name in names},
        mixed_chunk=bool(mixed_chunk),
    )
    chosen = {k: v for k, v in overrides.items() if v is not None}
    if mem_fraction_static is not None and "max_total_tokens" not in chosen:
        chosen["max_total_tokens"] = int(cost.kv_capacity_tokens(mem_fraction_static))
    return replace(base, **chosen)
