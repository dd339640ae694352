"""Engine limits of one simulated instance, under the engine's own names.

Two engines are modelled (:data:`ENGINES`), each with its scheduling
behaviour and its own names and defaults for the limits:

* ``sglang`` (the default): prefill and decode batches alternate, prefill
  first (``--enable-mixed-chunk`` mixes them); limits ``max_running_requests``,
  ``max_prefill_tokens``, ``chunked_prefill_size``, ``max_total_tokens``,
  ``cuda_graph_max_bs``, ``mem_fraction_static``, ``page_size``; defaults
  from :func:`scheduler.hardware.sglang_defaults`.
* ``vllm`` (V1 engine): one token budget per step, decodes first, prefill
  chunks fill what is left (vllm/v1/core/sched/scheduler.py,
  ``Scheduler.schedule``); limits ``max_num_seqs``, ``max_num_batched_tokens``,
  ``long_prefill_token_threshold``, ``num_gpu_blocks_override``,
  ``gpu_memory_utilization``, ``block_size``, ``max_cudagraph_capture_size``;
  defaults from :func:`scheduler.hardware.vllm_defaults`.

:data:`LIMIT_OPTIONS` is the one table of the settings a user may give:
the scenario's ``[cluster.limits]`` keys (:class:`sim.specs.EngineLimitsSpec`),
the ``llmsched simulate``, ``compare`` and ``emulate`` flags, the keyword
arguments the runner passes to :func:`resolve_limits`, and their help text
are all made from it, so adding a limit is one row here (and the
:class:`EngineLimits` field the engine reads, which a test keeps in step
with the table). A setting of one engine given for the other is an error
naming the other engine's setting (:func:`check_engine_settings`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from scheduler.cost_model import StepCost
from traces.errors import ConfigError

__all__ = [
    "ENGINES",
    "LIMIT_OPTIONS",
    "EngineLimits",
    "LimitOption",
    "check_engine_settings",
    "default_limits",
    "resolve_limits",
]

#: The engines whose scheduling the simulator models.
ENGINES = ("sglang", "vllm")

_ENGINE_NAMES = {"sglang": "SGLang", "vllm": "vLLM"}


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """How one instance batches, in SGLang's terms whatever the engine.

    Attributes:
        max_running_requests: requests admitted at once (prefilling or
            decoding); vLLM's ``max_num_seqs``.
        max_prefill_tokens: new tokens one prefill batch may hold.
        chunked_prefill_size: longest prefill chunk; a longer prompt is split
            over several steps. ``<= 0`` disables chunking (a prompt over the
            budget then runs alone in one step). vLLM's
            ``max_num_batched_tokens`` is both this and ``max_prefill_tokens``.
        max_total_tokens: KV-cache slots of the instance (a whole number of
            blocks); vLLM's ``num_gpu_blocks * block_size``.
        cuda_graph_max_bs: decode batches up to this size run as CUDA graphs
            (the cost model may price them lower); vLLM's
            ``max_cudagraph_capture_size``.
        mixed_chunk: run prefill chunks and decodes in one step (SGLang's
            ``--enable-mixed-chunk``; must be on for vLLM); otherwise prefill
            and decode batches alternate, prefill first when one can be formed
            (SGLang's default).
        engine: ``sglang`` or ``vllm``: whose scheduler the engine follows.
            vLLM's differs from SGLang's mixed mode in three ways: decodes
            take their KV slots first and admission keeps no reserve for
            them; a step that preempted admits no waiting request; and
            ``long_prefill_token_threshold`` caps each request's chunk.
        block_tokens: KV-cache block (SGLang's ``page_size``, vLLM's
            ``block_size``): a request holds whole blocks and only whole
            blocks of a prefix are reused (:mod:`sim.kv`).
        long_prefill_token_threshold: vLLM only: at most this many new
            tokens of one request per step (0: no cap); several requests may
            then prefill chunks in one step.
    """

    max_running_requests: int
    max_prefill_tokens: int
    chunked_prefill_size: int
    max_total_tokens: int
    cuda_graph_max_bs: int = 0
    mixed_chunk: bool = False
    engine: str = "sglang"
    block_tokens: int = 1
    long_prefill_token_threshold: int = 0

    def __post_init__(self) -> None:
        for name in ("max_running_requests", "max_prefill_tokens", "max_total_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: expected an integer >= 1; got {value!r}")
        for name in ("chunked_prefill_size", "cuda_graph_max_bs", "long_prefill_token_threshold"):
            if not isinstance(getattr(self, name), int):
                raise ConfigError(f"{name}: expected an integer; got {getattr(self, name)!r}")
        if self.engine not in ENGINES:
            raise ConfigError(f"engine: expected one of {', '.join(ENGINES)}; got {self.engine!r}")
        if not isinstance(self.block_tokens, int) or self.block_tokens < 1:
            raise ConfigError(f"block_tokens: expected an integer >= 1; got {self.block_tokens!r}")
        if self.max_total_tokens < self.block_tokens:
            raise ConfigError(
                f"max_total_tokens: expected at least one block of {self.block_tokens} "
                f"tokens; got {self.max_total_tokens}"
            )
        if self.engine == "vllm" and not self.mixed_chunk:
            raise ConfigError("mixed_chunk: vLLM has no separate prefill steps; it always mixes")
        if self.engine != "vllm" and self.long_prefill_token_threshold:
            raise ConfigError("long_prefill_token_threshold: a vLLM limit; SGLang has none")

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
        key: the engine's own server-argument name: the scenario key under
            ``[cluster.limits]``.
        type: ``int``, ``float`` or ``bool`` (a bool is an on-switch flag).
        help: one line for the CLI and the scenario reference.
        engine: the engine that takes it (``sglang`` or ``vllm``).
        other: what the other engine calls it (its key), or, when it has no
            such setting, a sentence saying so.
        flag: the CLI flag (default ``--`` and the key with dashes).
        kwarg: the :func:`resolve_limits` keyword it feeds (default the key).
        ge, gt, le: bounds on a number, checked when a scenario is read.
    """

    key: str
    type: type
    help: str
    engine: str = "sglang"
    other: str = ""
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


def _sg(key: str, type_: type, help: str, other: str, **kw: Any) -> LimitOption:
    return LimitOption(key, type_, help + " (SGLang)", "sglang", other, **kw)


def _vl(key: str, type_: type, help: str, other: str, **kw: Any) -> LimitOption:
    return LimitOption(key, type_, help + " (vLLM)", "vllm", other, **kw)


#: Every engine setting, SGLang's then vLLM's, in the order the CLI lists them.
LIMIT_OPTIONS: tuple[LimitOption, ...] = (
    _sg("max_running_requests", int, "Requests admitted at once.", "max_num_seqs", ge=1),
    _sg(
        "max_prefill_tokens",
        int,
        "New tokens one prefill batch may hold.",
        "max_num_batched_tokens",
        ge=1,
    ),
    _sg(
        "chunked_prefill_size",
        int,
        "Longest prefill chunk; 0 or less disables chunking.",
        "max_num_batched_tokens",
    ),
    _sg("max_total_tokens", int, "KV-cache token slots.", "num_gpu_blocks_override", ge=1),
    _sg(
        "cuda_graph_max_bs",
        int,
        "Largest decode batch run as a CUDA graph.",
        "max_cudagraph_capture_size",
        ge=0,
    ),
    _sg(
        "mem_fraction_static",
        float,
        "GPU memory share for weights and KV cache (sets max_total_tokens when that is unset).",
        "gpu_memory_utilization",
        gt=0,
        le=1,
    ),
    _sg(
        "enable_mixed_chunk",
        bool,
        "Mix prefill chunks into decode steps.",
        "vLLM always runs prefill chunks inside decode steps",
        kwarg="mixed_chunk",
    ),
    _sg("page_size", int, "Tokens per KV-cache page.", "block_size", ge=1),
    _vl("max_num_seqs", int, "Requests admitted at once.", "max_running_requests", ge=1),
    _vl(
        "max_num_batched_tokens",
        int,
        "Token budget of one step: decodes plus prefill chunks.",
        "chunked_prefill_size",
        ge=1,
    ),
    _vl(
        "long_prefill_token_threshold",
        int,
        "Most new tokens of one request per step; 0: no cap.",
        "SGLang has no per-request cap (chunked_prefill_size bounds a chunk)",
        ge=0,
    ),
    _vl(
        "num_gpu_blocks_override",
        int,
        "KV-cache blocks (sets the capacity instead of gpu_memory_utilization).",
        "max_total_tokens",
        ge=1,
    ),
    _vl(
        "gpu_memory_utilization",
        float,
        "GPU memory share for weights, activations and KV cache.",
        "mem_fraction_static",
        gt=0,
        le=1,
    ),
    _vl("block_size", int, "Tokens per KV-cache block.", "page_size", ge=1),
    _vl(
        "max_cudagraph_capture_size",
        int,
        "Largest decode batch run as a CUDA graph.",
        "cuda_graph_max_bs",
        ge=0,
    ),
)

_BY_KEY = {o.key: o for o in LIMIT_OPTIONS}
_BY_KWARG = {o.resolve_kwarg: o for o in LIMIT_OPTIONS}


def check_engine_settings(engine: str, given: Any, *, flags: bool = False) -> None:
    """Refuse settings of the other engine: the error names the one to use instead.

    ``given`` holds the keys (or :func:`resolve_limits` keywords) the user
    set. With ``flags`` the message speaks of CLI flags (``--engine vllm``,
    ``--max-num-seqs``) rather than scenario keys.

    Raises:
        ConfigError: an unknown engine, or a setting of the other engine.
    """
    if engine not in ENGINES:
        what = "--engine" if flags else "engine"
        raise ConfigError(f"{what}: expected one of {', '.join(ENGINES)}; got {engine!r}")
    for name in given:
        option = _BY_KEY.get(name) or _BY_KWARG.get(name)
        if option is None or option.engine == engine:
            continue
        theirs, ours = _ENGINE_NAMES[option.engine], _ENGINE_NAMES[engine]
        if flags:
            this, setting = option.cli_flag, f"--engine {engine}"
            instead = _BY_KEY[option.other].cli_flag if option.other in _BY_KEY else None
        else:
            this, setting = f"limits.{option.key}", f'engine = "{engine}"'
            instead = option.other if option.other in _BY_KEY else None
        advice = f"use {instead}" if instead else f"{ours} has no such setting ({option.other})"
        raise ConfigError(
            f"{this} is {theirs}'s name, but the engine is {ours} ({setting}): {advice}, "
            f"or choose the {theirs} engine"
        )


def default_limits(engine: str, model: Any, gpu: Any, tp: int = 1) -> Any:
    """The engine's own defaults for ``model`` on ``gpu`` (what :func:`resolve_limits` starts from)."""
    from scheduler.hardware import sglang_defaults, vllm_defaults

    check_engine_settings(engine, ())
    return (vllm_defaults if engine == "vllm" else sglang_defaults)(model, gpu, tp)


def resolve_limits(
    cost: StepCost,
    defaults: Any,
    *,
    engine: str = "sglang",
    **overrides: Any,
) -> EngineLimits:
    """Engine limits: the ``engine``'s ``defaults`` with the user's ``overrides`` applied.

    ``defaults`` is a record with the engine's fields (:func:`default_limits`:
    ``sglang_defaults(...)`` or ``vllm_defaults(...)``); the keywords are the
    :data:`LIMIT_OPTIONS` of that engine (``resolve_kwarg``). Overrides that
    are ``None`` (or a switch left ``False``) keep the default. The KV
    capacity is rounded down to whole blocks.

    SGLang: when ``mem_fraction_static`` is given and ``max_total_tokens``
    is not, the KV capacity is recomputed with ``cost.kv_capacity_tokens``.

    vLLM: ``max_num_batched_tokens`` is the step budget (decodes count
    against it, vllm/v1/core/sched/scheduler.py) and must be at least
    ``max_num_seqs`` (vllm/config/scheduler.py); the capacity is
    ``num_gpu_blocks_override`` blocks, else what ``gpu_memory_utilization``
    leaves (given or default); the CUDA-graph bound, when not given, is
    ``min(2 * max_num_seqs, 512, max_num_batched_tokens)`` of the limits
    chosen (vllm/config/vllm.py).

    Raises:
        ConfigError: an unknown override, one of the other engine, or an
            invalid value.
    """
    known = {o.resolve_kwarg for o in LIMIT_OPTIONS}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown engine limit(s) {unknown}; known: {sorted(known)}")
    chosen = {k: v for k, v in overrides.items() if v is not None and v is not False}
    check_engine_settings(engine, chosen)
    if engine == "vllm":
        return _resolve_vllm(cost, defaults, chosen)
    return _resolve_sglang(cost, defaults, chosen)


def _whole_blocks(tokens: int, block: int) -> int:
    return tokens // block * block


def _resolve_sglang(cost: StepCost, defaults: Any, chosen: dict[str, Any]) -> EngineLimits:
    names = {f.name for f in fields(EngineLimits)}
    base = EngineLimits(
        **{
            name: int(getattr(defaults, name))
            for name in (
                "max_running_requests",
                "max_prefill_tokens",
                "chunked_prefill_size",
                "max_total_tokens",
                "cuda_graph_max_bs",
            )
        }
    )
    fraction = chosen.pop("mem_fraction_static", None)
    if fraction is not None and "max_total_tokens" not in chosen:
        chosen["max_total_tokens"] = int(cost.kv_capacity_tokens(fraction))
    page = int(chosen.pop("page_size", 1))
    chosen = {k: v for k, v in chosen.items() if k in names}
    limits = replace(base, **chosen, block_tokens=page)
    if page > 1:
        limits = replace(limits, max_total_tokens=_whole_blocks(limits.max_total_tokens, page))
    return limits


def _resolve_vllm(cost: StepCost, d: Any, chosen: dict[str, Any]) -> EngineLimits:
    seqs = int(chosen.get("max_num_seqs", d.max_num_seqs))
    batched = int(chosen.get("max_num_batched_tokens", d.max_num_batched_tokens))
    if batched < seqs:
        raise ConfigError(
            f"max_num_batched_tokens ({batched}) must be at least max_num_seqs ({seqs}), "
            "as vLLM requires"
        )
    block = int(chosen.get("block_size", d.block_size))
    if "num_gpu_blocks_override" in chosen:
        capacity = int(chosen["num_gpu_blocks_override"]) * block
    elif "gpu_memory_utilization" in chosen:
        capacity = _whole_blocks(
            int(cost.kv_capacity_tokens(chosen["gpu_memory_utilization"])), block
        )
    else:
        capacity = _whole_blocks(int(d.num_gpu_blocks) * int(d.block_size), block)
    graph = chosen.get("max_cudagraph_capture_size")
    if graph is None:
        graph = min(2 * seqs, 512, batched)
    return EngineLimits(
        max_running_requests=seqs,
        max_prefill_tokens=batched,
        chunked_prefill_size=batched,
        max_total_tokens=capacity,
        cuda_graph_max_bs=int(graph),
        mixed_chunk=True,
        engine="vllm",
        block_tokens=block,
        long_prefill_token_threshold=int(chosen.get("long_prefill_token_threshold", 0)),
    )
