"""Step-time cost model shared by the simulator, the emulator and policies.

The contract every driver relies on is :class:`StepCost`: how long one
forward pass of an instance takes, given what is in the batch.
:class:`CostModel` implements it from first principles (a roofline over the
catalogue's model and GPU numbers, :mod:`scheduler.hardware`), or from
coefficients fitted to measurements (:mod:`scheduler.calibration`, offline)
and read from a profile file (:mod:`scheduler.profile`)::

    cm = CostModel.from_names("qwen2.5-32b", "h200")
    cm.prefill_time_s([2048], [0])        # about 0.22 s
    cm.decode_time_s(32, 32 * 1024)       # about 0.02 s
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from scheduler.hardware import (
    RUNTIME_RESERVE_BYTES,
    GpuSpec,
    ModelSpec,
    SglangDefaults,
    gpu_spec,
    kv_capacity_tokens,
    model_spec,
    sglang_defaults,
)
from scheduler.profile import load_profile
from traces.errors import ConfigError

__all__ = [
    "Coefficients",
    "CostModel",
    "Efficiency",
    "RooflineTerms",
    "SglangDefaults",
    "StepCost",
    "sglang_defaults",
]


@runtime_checkable
class StepCost(Protocol):
    """Durations of engine steps, in seconds.

    ``decode_time_s`` must be affine in ``context_tokens`` for a fixed batch
    size (``a + b * context_tokens``, with ``(a, b) = decode_coeffs(n)``), so
    a stretch of decode steps whose batch does not change has a closed-form
    duration.
    """

    def prefill_time_s(
        self, new_tokens: Sequence[int], cached_tokens: Sequence[int], *, cuda_graph: bool = False
    ) -> float:
        """One prefill (extend) pass over sequences with these new and cached tokens."""
        ...

    def decode_time_s(
        self, batch_size: int, context_tokens: int, *, cuda_graph: bool = True
    ) -> float:
        """One decode step of ``batch_size`` sequences whose contexts total ``context_tokens``."""
        ...

    def decode_coeffs(self, batch_size: int, *, cuda_graph: bool = True) -> tuple[float, float]:
        """``(a, b)`` with ``decode_time_s(n, ctx) == a + b * ctx`` for ``n == batch_size``."""
        ...

    def mixed_time_s(
        self,
        new_tokens: Sequence[int],
        cached_tokens: Sequence[int],
        decode_batch_size: int,
        decode_context_tokens: int,
    ) -> float:
        """One step that runs prefill chunks and decode sequences together."""
        ...

    def kv_transfer_time_s(self, tokens: int) -> float:
        """Moving ``tokens`` tokens of KV cache between instances (PD disaggregation)."""
        ...

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token occupies on one instance (all layers, after TP split)."""
        ...

    def kv_capacity_tokens(self, mem_fraction_static: float) -> int:
        """Tokens of KV cache that fit in one instance's memory."""
        ...


@dataclass(frozen=True, slots=True)
class Efficiency:
    """How close real kernels get to the datasheet, and fixed costs. Defaults:

    * ``gemm_mfu`` 0.6 of dense BF16 peak in prefill GEMMs: SGLang's
      ``bench_one_batch`` prefilled 128 x 128 tokens of Llama-3.1-8B in
      0.373 s (43,925 tokens/s, sgl-project/sglang PR #2134), which is
      2 x 6.98e9 FLOP x 43,925/s = 0.62 of an H100's 989.5 TFLOP/s.
    * ``attention_efficiency`` 0.5: FlashAttention-3 reaches ~75% of H100
      peak on long sequences, FlashAttention-2 35-50% (Shah et al. 2024);
      serving batches hold short causal sequences.
    * ``hbm_efficiency`` 0.8: weight streaming and decode attention reach
      75-85% of datasheet bandwidth (STREAM-like kernels ~90%).
    * ``nvlink_efficiency``, ``network_efficiency`` 0.8: NCCL all-reduce
      and RDMA reach 75-90% of link rate on large messages.
    * ``prefill_step_overhead_s`` 2 ms: scheduling, batch preparation,
      input copies and sampling of an (eager) extend step.
    * ``decode_step_overhead_s`` 0.8 ms: what the overlap scheduler leaves
      of the same in decode.
    * ``eager_layer_launch_s`` 30 us vs ``graph_layer_launch_s`` 3 us: an
      eager layer launches ~10 kernels at ~5 us each from Python, partly
      hidden behind GPU work; a CUDA graph replays them back to back.
    * ``per_sequence_s`` 2 us: sampling and KV-slot writes per decode sequence.
    * ``allreduce_latency_s`` 8 us: one small-message NVLink all-reduce
      (two per layer per step under tensor parallelism).
    * ``kv_transfer_latency_s`` 0.1 ms: handshake and completion of one RDMA
      transfer of a request's KV cache.
    """

    gemm_mfu: float = 0.6
    attention_efficiency: float = 0.5
    hbm_efficiency: float = 0.8
    nvlink_efficiency: float = 0.8
    network_efficiency: float = 0.8
    prefill_step_overhead_s: float = 2e-3
    decode_step_overhead_s: float = 0.8e-3
    eager_layer_launch_s: float = 30e-6
    graph_layer_launch_s: float = 3e-6
    per_sequence_s: float = 2e-6
    allreduce_latency_s: float = 8e-6
    kv_transfer_latency_s: float = 1e-4

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value >= 0):
                raise ConfigError(f"Efficiency.{name}: expected a number >= 0; got {value!r}")


@dataclass(frozen=True, slots=True)
class Coefficients:
    """The cost model's free coefficients, in seconds, for one model, GPU and tp.

    Either derived from specs and :class:`Efficiency`
    (:meth:`from_specs`) or fitted from measurements
    (:mod:`scheduler.calibration`). An "attention unit" is one new token
    attending to one earlier token: a sequence with ``n`` new and ``c``
    cached tokens has ``n * (c + n / 2)`` of them (causal).
    """

    #: Fixed cost of a prefill or mixed step (CUDA-graph launch included).
    prefill_overhead_s: float
    #: Fixed cost of a decode step (CUDA-graph launch included).
    decode_overhead_s: float
    #: Added to a step that runs eagerly rather than as a CUDA graph.
    eager_extra_s: float
    #: Linear layers per token, compute-bound.
    linear_s_per_token: float
    #: LM head per sequence (logits only for each sequence's last token).
    lm_head_s_per_seq: float
    #: Attention compute per attention unit.
    attention_s_per_unit: float
    #: Streaming every weight from HBM once: the floor of any step.
    weight_read_s: float
    #: Reading one token's K and V (all layers) from HBM.
    kv_read_s_per_token: float
    #: Per-sequence cost of a decode step beyond its GEMM share.
    decode_s_per_seq: float
    #: Tensor-parallel all-reduce traffic per token in the batch.
    comm_s_per_token: float
    #: Tensor-parallel all-reduce latency per step.
    comm_s_per_step: float
    #: Per request, outside the engine's steps: the server's HTTP handling,
    #: tokenization and frontend between a request's arrival and its joining
    #: the engine's queue (what a client-side calibration measures beside the
    #: steps; 6-11 ms on vLLM's OpenAI server). Not part of any step: the
    #: catalogue has no such term and leaves it at 0.
    request_overhead_s: float = 0.0

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"Coefficients.{name}: expected a number >= 0; got {value!r}")

    @classmethod
    def from_specs(
        cls, model: ModelSpec, gpu: GpuSpec, tp: int = 1, efficiency: Efficiency | None = None
    ) -> Coefficients:
        """First-principles coefficients: FLOPs and bytes over peak times efficiency."""
        eff = efficiency or Efficiency()
        gemm = gpu.peak_bf16_flops * eff.gemm_mfu
        hbm = gpu.hbm_bandwidth_Bps * eff.hbm_efficiency
        heads = max(1, model.n_heads // tp)
        # QK^T and PV: 2 FLOPs per multiply-add each, per head dimension, per layer.
        attn_flops = 4 * heads * model.head_dim * model.n_layers
        if tp > 1:
            # Two all-reduces of hidden-size activations per layer; a ring
            # all-reduce moves 2 (tp - 1) / tp of the data through each GPU.
            per_token = 2 * model.n_layers * model.hidden_size * model.dtype_bytes
            link = gpu.nvlink_bandwidth_Bps * eff.nvlink_efficiency
            comm_tok = per_token * 2 * (tp - 1) / tp / link
            comm_step = 2 * model.n_layers * eff.allreduce_latency_s
        else:
            comm_tok = comm_step = 0.0
        layers = model.n_layers
        return cls(
            prefill_overhead_s=eff.prefill_step_overhead_s + layers * eff.graph_layer_launch_s,
            decode_overhead_s=eff.decode_step_overhead_s + layers * eff.graph_layer_launch_s,
            eager_extra_s=layers * max(0.0, eff.eager_layer_launch_s - eff.graph_layer_launch_s),
            linear_s_per_token=2 * model.non_embedding_params / tp / gemm,
            lm_head_s_per_seq=2 * model.lm_head_params / tp / gemm,
            attention_s_per_unit=attn_flops / (gpu.peak_bf16_flops * eff.attention_efficiency),
            weight_read_s=model.weight_read_bytes(tp) / hbm,
            kv_read_s_per_token=model.kv_bytes_per_token(tp) / hbm,
            decode_s_per_seq=eff.per_sequence_s,
            comm_s_per_token=comm_tok,
            comm_s_per_step=comm_step,
            request_overhead_s=0.0,
        )


def _profile_model(prof: Any) -> ModelSpec:
    """The model a profile was fitted for: its stored description, else the catalogue's."""
    if prof.model_description is not None:
        try:
            return ModelSpec(**prof.model_description)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"profile field 'model_description': {exc}") from None
    return model_spec(prof.model)


def _profile_device(prof: Any) -> GpuSpec:
    """The device a profile was fitted for: its stored description, else the catalogue's."""
    if prof.device_description is not None:
        try:
            return GpuSpec(**prof.device_description)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"profile field 'device_description': {exc}") from None
    return gpu_spec(prof.gpu)


@dataclass(frozen=True, slots=True)
class RooflineTerms:
    """The coefficients of LAPS's ``T_comp`` and ``T_mem``, in seconds: the compute/memory crossover.

    A prefill of ``L`` new tokens over ``H`` cached ones is memory-bound
    while ``T_comp(L, H) < T_mem(L, H)``, with (LAPS, arXiv 2601.11589)::

        T_comp = a * L * (L + 2H) + b * L + e     attention, linear layers, LM head
        T_mem  = w + c * L + d * H                weights, KV written, KV read

    The one definition of the crossover: :meth:`CostModel.prefill_crossover_tokens`
    and LAPS's adaptive threshold (:mod:`scheduler.length`) both read it.
    """

    a: float
    b: float
    e: float
    w: float
    c: float
    d: float

    @classmethod
    def from_coefficients(cls, k: Any) -> RooflineTerms:
        """From :class:`Coefficients` (or anything with its fields).

        ``a`` is half the attention cost per unit (a unit is one new token
        attending to one earlier one), ``b`` the linear layers per token,
        ``e`` the LM head per sequence, ``w`` the weight read, ``c`` and
        ``d`` the KV read per token (writing a token's KV costs as much as
        reading it).
        """
        return cls(
            a=0.5 * k.attention_s_per_unit,
            b=k.linear_s_per_token,
            e=k.lm_head_s_per_seq,
            w=k.weight_read_s,
            c=k.kv_read_s_per_token,
            d=k.kv_read_s_per_token,
        )

    def crossover_tokens(self, cached_tokens: int = 0) -> int:
        """Smallest whole ``L`` with ``T_comp(L, H) >= T_mem(L, H)`` (0 when compute wins at once)."""
        h = max(0, cached_tokens)
        # a L^2 + (2 a H + b - c) L + (e - w - d H) = 0
        qa = self.a
        qb = 2.0 * self.a * h + self.b - self.c
        qc = self.e - self.w - self.d * h
        if qc >= 0:
            return 0
        if qa == 0:
            return math.ceil(-qc / qb) if qb > 0 else 0
        return math.ceil((-qb + math.sqrt(qb * qb - 4.0 * qa * qc)) / (2.0 * qa))


class CostModel:
    """Roofline step times of one SGLang/vLLM instance (implements :class:`StepCost`).

    A step streams the weights once and runs the linear layers over every
    token in it; the two overlap (GEMM kernels stream weight tiles while the
    tensor cores work), so that part costs ``max(weight read, GEMM compute)``.
    Attention is a separate kernel: in a prefill, the larger of its FLOPs and
    its read of the cached prefix; in decode, a read of every context token's
    KV (memory-bound), which keeps decode affine in context tokens. Fixed
    per-step costs, the eager-launch penalty and tensor-parallel all-reduces
    add on top.
    """

    __slots__ = (
        "_decode_eager",
        "_decode_graph",
        "coefficients",
        "efficiency",
        "gpu",
        "kv_link_bandwidth_Bps",
        "model",
        "tp",
    )

    def __init__(
        self,
        model: ModelSpec,
        gpu: GpuSpec,
        tp: int = 1,
        *,
        coefficients: Coefficients | None = None,
        efficiency: Efficiency | None = None,
        kv_link: str | float = "network",
    ) -> None:
        """Build from specs; ``coefficients`` (e.g. fitted ones) override the derived ones.

        ``kv_link``, the path of KV cache between instances: ``"network"``
        (another node: the GPU's NIC, 50 GB/s on H100/H200), ``"nvlink"``
        (same node) or a bandwidth in B/s.
        """
        if not isinstance(tp, int) or tp < 1:
            raise ConfigError(f"tp: expected an integer >= 1; got {tp!r}")
        self.model, self.gpu, self.tp = model, gpu, tp
        self.efficiency = efficiency or Efficiency()
        self.coefficients = coefficients or Coefficients.from_specs(model, gpu, tp, self.efficiency)
        if kv_link == "network":
            link = gpu.network_bandwidth_Bps * self.efficiency.network_efficiency
        elif kv_link == "nvlink":
            link = gpu.nvlink_bandwidth_Bps * self.efficiency.nvlink_efficiency
        elif isinstance(kv_link, int | float) and not isinstance(kv_link, bool) and kv_link > 0:
            link = float(kv_link)
        else:
            raise ConfigError(
                f"kv_link: expected 'network', 'nvlink' or a bandwidth in B/s; got {kv_link!r}"
            )
        self.kv_link_bandwidth_Bps = link
        self._decode_graph: dict[int, tuple[float, float]] = {}
        self._decode_eager: dict[int, tuple[float, float]] = {}

    @classmethod
    def from_names(
        cls,
        model: str | ModelSpec,
        gpu: str | GpuSpec,
        tp: int = 1,
        profile: str | Path | None = None,
        *,
        efficiency: Efficiency | None = None,
        kv_link: str | float = "network",
    ) -> CostModel:
        """Build from catalogue names; ``profile`` is a calibrated profile file.

        Raises:
            ConfigError: unknown name, or a profile that is malformed or was
                fitted for another model, GPU or tp.
        """
        model_s, gpu_s = model_spec(model), gpu_spec(gpu)
        coefficients = None
        if profile is not None:
            prof = load_profile(profile)
            got = (prof.model, prof.gpu, prof.tp)
            if (_profile_model(prof), _profile_device(prof), prof.tp) != (model_s, gpu_s, tp):
                raise ConfigError(
                    f"{profile}: profile is for {got}, not ({model_s.name!r}, {gpu_s.name!r}, "
                    f"{tp}); give the model, GPU and tp it was fitted for"
                )
            coefficients = Coefficients(**prof.coefficients.model_dump())
        return cls(
            model_s, gpu_s, tp, coefficients=coefficients, efficiency=efficiency, kv_link=kv_link
        )

    # -- StepCost ---------------------------------------------------------------

    def prefill_time_s(
        self, new_tokens: Sequence[int], cached_tokens: Sequence[int], *, cuda_graph: bool = False
    ) -> float:
        """One extend pass; ``new_tokens[i]`` and ``cached_tokens[i]`` describe sequence i."""
        if not new_tokens:
            return 0.0
        return self._extend_s(new_tokens, cached_tokens, 0, 0, cuda_graph)

    def decode_coeffs(self, batch_size: int, *, cuda_graph: bool = True) -> tuple[float, float]:
        """``(a, b)`` with ``decode_time_s(batch_size, ctx) == a + b * ctx``; cached per size."""
        cache = self._decode_graph if cuda_graph else self._decode_eager
        ab = cache.get(batch_size)
        if ab is None:
            ab = cache[batch_size] = self._decode_ab(batch_size, cuda_graph)
        return ab

    def decode_time_s(
        self, batch_size: int, context_tokens: int, *, cuda_graph: bool = True
    ) -> float:
        """One decode step of ``batch_size`` sequences with ``context_tokens`` in total."""
        cache = self._decode_graph if cuda_graph else self._decode_eager
        ab = cache.get(batch_size)
        if ab is None:
            ab = cache[batch_size] = self._decode_ab(batch_size, cuda_graph)
        return ab[0] + ab[1] * context_tokens

    def mixed_time_s(
        self,
        new_tokens: Sequence[int],
        cached_tokens: Sequence[int],
        decode_batch_size: int,
        decode_context_tokens: int,
    ) -> float:
        """Prefill chunks and decode sequences in one (eager, extend-path) step.

        The weights are read once for both; each decode sequence adds one
        token to the GEMMs, its KV read and its per-sequence cost.
        """
        if not new_tokens:
            return self.decode_time_s(decode_batch_size, decode_context_tokens)
        return self._extend_s(
            new_tokens, cached_tokens, max(0, decode_batch_size), decode_context_tokens, False
        )

    def kv_transfer_time_s(self, tokens: int) -> float:
        """Moving ``tokens`` tokens of KV cache to another instance.

        Every rank sends its own shard over its own link at the same time,
        so the time is one rank's bytes over one link.
        """
        if tokens <= 0:
            return 0.0
        return (
            self.efficiency.kv_transfer_latency_s
            + tokens * self.model.kv_bytes_per_token(self.tp) / self.kv_link_bandwidth_Bps
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes of one token on one rank: 2 x layers x KV heads per rank x head_dim x dtype."""
        return self.model.kv_bytes_per_token(self.tp)

    def kv_capacity_tokens(
        self, mem_fraction_static: float, *, reserve_bytes: float = RUNTIME_RESERVE_BYTES
    ) -> int:
        """KV tokens that fit: (memory x fraction - weights / tp - reserve) / KV bytes per token."""
        return kv_capacity_tokens(self.model, self.gpu, self.tp, mem_fraction_static, reserve_bytes)

    @property
    def request_overhead_s(self) -> float:
        """Seconds each request spends in the server before it joins the engine's queue.

        The instance driver (:class:`sim.driver.InstanceDriver`) delays every
        dispatched request by this much, so it shifts TTFT and E2E by it at
        low load and occupies no step.
        """
        return self.coefficients.request_overhead_s

    # -- helpers ------------------------------------------------------------------

    def prefill_crossover_tokens(self, cached_tokens: int = 0) -> int:
        """New tokens of one sequence at which its prefill stops being memory-bound.

        Below it a prefill's time hardly grows with the prompt, so batching
        short prompts is nearly free (the LAPS short/long threshold). The
        crossover of :class:`RooflineTerms` over this model's coefficients.
        """
        return RooflineTerms.from_coefficients(self.coefficients).crossover_tokens(cached_tokens)

    def _extend_s(
        self,
        new_tokens: Sequence[int],
        cached_tokens: Sequence[int],
        decodes: int,
        decode_context: int,
        cuda_graph: bool,
    ) -> float:
        n_sum = c_sum = 0
        units = 0.0
        for n, c in zip(new_tokens, cached_tokens, strict=True):
            n_sum += n
            c_sum += c
            units += n * (c + 0.5 * n)
        k = self.coefficients
        tokens = n_sum + decodes
        gemm = k.linear_s_per_token * tokens + k.lm_head_s_per_seq * (len(new_tokens) + decodes)
        attn = k.attention_s_per_unit * units
        kv = k.kv_read_s_per_token * c_sum
        return (
            k.prefill_overhead_s
            + (0.0 if cuda_graph else k.eager_extra_s)
            + k.comm_s_per_step
            + (gemm if gemm > k.weight_read_s else k.weight_read_s)
            + (attn if attn > kv else kv)
            + k.kv_read_s_per_token * decode_context
            + k.decode_s_per_seq * decodes
            + k.comm_s_per_token * tokens
        )

    def _decode_ab(self, batch_size: int, cuda_graph: bool) -> tuple[float, float]:
        if batch_size <= 0:
            return 0.0, 0.0
        k = self.coefficients
        gemm = (k.linear_s_per_token + k.lm_head_s_per_seq) * batch_size
        a = (
            k.decode_overhead_s
            + (0.0 if cuda_graph else k.eager_extra_s)
            + k.comm_s_per_step
            + max(gemm, k.weight_read_s)
            + (k.decode_s_per_seq + k.comm_s_per_token) * batch_size
        )
        return a, k.kv_read_s_per_token

    def __repr__(self) -> str:
        return f"CostModel({self.model.name!r}, {self.gpu.name!r}, tp={self.tp})"
