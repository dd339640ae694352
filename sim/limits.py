"""Engine limits of one simulated instance, under SGLang's names.

Defaults come from :func:`scheduler.hardware.sglang_defaults` (what SGLang
picks for a model and GPU); any of them can be overridden, as on SGLang's
command line.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from scheduler.cost_model import StepCost
from traces.errors import ConfigError

__all__ = ["EngineLimits", "resolve_limits"]


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


def resolve_limits(
    cost: StepCost,
    defaults: Any,
    *,
    mem_fraction_static: float | None = None,
    mixed_chunk: bool = False,
    **overrides: int | None,
) -> EngineLimits:
    """Engine limits: SGLang's ``defaults`` with the user's ``overrides`` applied.

    ``defaults`` is a record with SGLang's fields (``sglang_defaults(...)``).
    When ``mem_fraction_static`` is given and ``max_total_tokens`` is not,
    the KV capacity is recomputed from it with ``cost.kv_capacity_tokens``.
    Overrides that are ``None`` keep the default.

    Raises:
        ConfigError: an unknown override or an invalid value.
    """
    names = {f.name for f in fields(EngineLimits)} - {"mixed_chunk"}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown engine limit(s) {unknown}; known: {sorted(names)}")
    base = EngineLimits(
        max_running_requests=int(defaults.max_running_requests),
        max_prefill_tokens=int(defaults.max_prefill_tokens),
        chunked_prefill_size=int(defaults.chunked_prefill_size),
        max_total_tokens=int(defaults.max_total_tokens),
        cuda_graph_max_bs=int(defaults.cuda_graph_max_bs),
        mixed_chunk=mixed_chunk,
    )
    chosen = {k: v for k, v in overrides.items() if v is not None}
    if mem_fraction_static is not None and "max_total_tokens" not in chosen:
        chosen["max_total_tokens"] = int(cost.kv_capacity_tokens(mem_fraction_static))
    return replace(base, **chosen)
