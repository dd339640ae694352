"""Model and GPU catalogue: the numbers the step-time cost model is built from.

A :class:`ModelSpec` is a dense decoder-only transformer as its Hugging Face
``config.json`` describes it; a :class:`GpuSpec` is one accelerator as its
datasheet describes it. Both are frozen records; :func:`model_spec` and
:func:`gpu_spec` look them up by the names users type (``qwen2.5-32b``,
``Qwen/Qwen2.5-32B-Instruct``, ``llama-3.1-8b``, ``h200``), case-insensitively.

The memory arithmetic shared by the cost model and the engine defaults lives
here too: weight bytes and KV bytes per token on one tensor-parallel rank, and
:func:`kv_capacity_tokens`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from traces.errors import ConfigError

__all__ = [
    "GPUS",
    "MODELS",
    "RUNTIME_RESERVE_BYTES",
    "GpuSpec",
    "ModelSpec",
    "SglangDefaults",
    "VllmDefaults",
    "gpu_spec",
    "kv_capacity_tokens",
    "model_spec",
    "sglang_defaults",
    "vllm_defaults",
]

_MIB = 1 << 20
_GB = 10**9

#: Bytes of SGLang's static pool that hold neither weights nor KV cache: the
#: CUDA context, cuBLAS workspaces and NCCL buffers allocated before the KV
#: pool is sized (SGLang sizes it from the memory still free after loading
#: the weights). About 1 GiB on Hopper-class GPUs.
RUNTIME_RESERVE_BYTES = 1 << 30


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A dense transformer's shape (fields named as in ``config.json``).

    Parameter counts are derived, not typed in, so they stay consistent with
    the shape: per layer the q/k/v/o projections (plus q/k/v biases where
    ``qkv_bias``), the gated MLP (gate, up, down) and two RMSNorm vectors;
    then a final norm, the embedding and, unless tied, the LM head.
    """

    name: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    #: ``max_position_embeddings``: the context length SGLang serves.
    context_length: int
    dtype_bytes: int = 2
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    layer_params: int = field(init=False)
    non_embedding_params: int = field(init=False)
    total_params: int = field(init=False)

    def __post_init__(self) -> None:
        h, q, kv = self.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        per_layer = attn + 3 * h * self.intermediate_size + 2 * h
        non_emb = self.n_layers * per_layer + h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        object.__setattr__(self, "layer_params", per_layer)
        object.__setattr__(self, "non_embedding_params", non_emb)
        object.__setattr__(self, "total_params", non_emb + emb)

    @property
    def lm_head_params(self) -> int:
        """Parameters of the output projection (``vocab_size * hidden_size``)."""
        return self.vocab_size * self.hidden_size

    def kv_heads_per_rank(self, tp: int) -> int:
        """KV heads one rank holds: split across ranks, replicated below one each."""
        return max(1, self.n_kv_heads // tp)

    def kv_bytes_per_token(self, tp: int = 1) -> int:
        """KV-cache bytes of one token on one rank: K and V, every layer."""
        return 2 * self.n_layers * self.kv_heads_per_rank(tp) * self.head_dim * self.dtype_bytes

    def weight_bytes(self, tp: int = 1) -> float:
        """Weight bytes one rank holds (SGLang shards embedding and LM head too)."""
        return self.total_params * self.dtype_bytes / tp

    def weight_read_bytes(self, tp: int = 1) -> float:
        """Weight bytes one forward pass streams from HBM on one rank.

        Every layer and the LM head are read in full; of the embedding table
        only the looked-up rows are, which is negligible.
        """
        return (self.non_embedding_params + self.lm_head_params) * self.dtype_bytes / tp


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """One accelerator. Bandwidths are bytes per second, one direction."""

    name: str
    #: Dense (no sparsity) BF16 tensor-core peak, FLOP/s.
    peak_bf16_flops: float
    #: HBM bandwidth, B/s.
    hbm_bandwidth_Bps: float
    #: Memory as ``nvidia-smi`` reports it (what SGLang sizes its pools from).
    memory_bytes: int
    #: NVLink bandwidth per GPU in one direction (datasheets quote both
    #: directions summed; half of that moves one way).
    nvlink_bandwidth_Bps: float
    #: Inter-node network per GPU (the NIC paired with it), for KV transfer.
    network_bandwidth_Bps: float

    @property
    def memory_mib(self) -> float:
        """Memory in MiB, the unit of SGLang's thresholds."""
        return self.memory_bytes / _MIB


def _qwen25(name: str, layers: int, hidden: int, heads: int, kv: int, inter: int) -> ModelSpec:
    # Qwen2.5 instruct configs share: head_dim = hidden / heads, vocab
    # 152064, max_position_embeddings 32768, q/k/v biases, untied embeddings.
    return ModelSpec(
        name=name,
        n_layers=layers,
        hidden_size=hidden,
        n_heads=heads,
        n_kv_heads=kv,
        head_dim=hidden // heads,
        intermediate_size=inter,
        vocab_size=152064,
        context_length=32768,
        qkv_bias=True,
    )


def _llama31(name: str, layers: int, hidden: int, heads: int, inter: int) -> ModelSpec:
    # Llama 3.1 configs share: 8 KV heads, head_dim 128, vocab 128256,
    # max_position_embeddings 131072, no biases, untied embeddings.
    return ModelSpec(
        name=name,
        n_layers=layers,
        hidden_size=hidden,
        n_heads=heads,
        n_kv_heads=8,
        head_dim=128,
        intermediate_size=inter,
        vocab_size=128256,
        context_length=131072,
    )


#: Canonical name -> spec. Sources: each model's Hugging Face ``config.json``
#: (Qwen/Qwen2.5-{7,14,32,72}B-Instruct, meta-llama/Llama-3.1-{8,70}B-Instruct):
#: num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads,
#: intermediate_size, vocab_size, max_position_embeddings, tie_word_embeddings.
MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        # layers 28, hidden 3584, heads 28, kv 4, intermediate 18944
        _qwen25("Qwen2.5-7B", 28, 3584, 28, 4, 18944),
        # layers 48, hidden 5120, heads 40, kv 8, intermediate 13824
        _qwen25("Qwen2.5-14B", 48, 5120, 40, 8, 13824),
        # layers 64, hidden 5120, heads 40, kv 8, intermediate 27648
        _qwen25("Qwen2.5-32B", 64, 5120, 40, 8, 27648),
        # layers 80, hidden 8192, heads 64, kv 8, intermediate 29568
        _qwen25("Qwen2.5-72B", 80, 8192, 64, 8, 29568),
        # layers 32, hidden 4096, heads 32, kv 8, intermediate 14336
        _llama31("Llama-3.1-8B", 32, 4096, 32, 14336),
        # layers 80, hidden 8192, heads 64, kv 8, intermediate 28672
        _llama31("Llama-3.1-70B", 80, 8192, 64, 28672),
    )
}

#: Canonical name -> spec. Peak FLOP/s and HBM bandwidth from NVIDIA's
#: datasheets (A100: "A100 Tensor Core GPU" datasheet, SXM 80GB column;
#: H100/H200: "H100 Tensor Core GPU" and "H200 Tensor Core GPU" datasheets,
#: SXM columns, BF16 1,979 TFLOPS *with sparsity*, i.e. 989.5 dense).
#: Memory is ``nvidia-smi``'s memory.total (81920, 81559 and 143771 MiB),
#: which is what SGLang's ``get_nvgpu_memory_capacity`` reads. NVLink:
#: 600 GB/s (A100) and 900 GB/s (H100, H200) both directions summed.
#: Network: one NIC per GPU in NVIDIA's DGX systems, ConnectX-6 200 Gb/s on
#: DGX A100 and ConnectX-7 400 Gb/s on DGX H100/H200 (DGX datasheets).
GPUS: dict[str, GpuSpec] = {
    g.name: g
    for g in (
        GpuSpec(
            name="A100-80GB",
            peak_bf16_flops=312e12,
            hbm_bandwidth_Bps=2.039e12,
            memory_bytes=81920 * _MIB,
            nvlink_bandwidth_Bps=300 * _GB,
            network_bandwidth_Bps=25 * _GB,
        ),
        GpuSpec(
            name="H100-SXM",
            peak_bf16_flops=989.5e12,
            hbm_bandwidth_Bps=3.35e12,
            memory_bytes=81559 * _MIB,
            nvlink_bandwidth_Bps=450 * _GB,
            network_bandwidth_Bps=50 * _GB,
        ),
        GpuSpec(
            name="H200",
            peak_bf16_flops=989.5e12,
            hbm_bandwidth_Bps=4.8e12,
            memory_bytes=143771 * _MIB,
            nvlink_bandwidth_Bps=450 * _GB,
            network_bandwidth_Bps=50 * _GB,
        ),
    )
}

_GPU_ALIASES = {
    "a100": "A100-80GB",
    "a100-sxm": "A100-80GB",
    "a100-sxm4-80gb": "A100-80GB",
    "h100": "H100-SXM",
    "h100-80gb": "H100-SXM",
    "h100-sxm5": "H100-SXM",
    "h200-sxm": "H200",
    "h200-141gb": "H200",
}


def _key(name: str) -> str:
    """Normalise a user's spelling: case, org prefix, ``-instruct``, separators."""
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    key = key.rsplit("/", 1)[-1]
    key = re.sub(r"^meta-llama-", "llama-", key)
    return re.sub(r"-(instruct|chat)$", "", key)


def model_spec(name: str | ModelSpec) -> ModelSpec:
    """The catalogue model called ``name`` (a spec passes through).

    A ``config.json`` path or ``KEY=VALUE`` pairs describe a model outside
    the catalogue (:func:`scheduler.describe.model_from`).

    Raises:
        ConfigError: unknown name; the message lists the known ones.
    """
    if isinstance(name, ModelSpec):
        return name
    from scheduler.describe import describes_a_file, model_from

    if "=" in name or describes_a_file(name):
        return model_from(name)
    by_key = {_key(k): v for k, v in MODELS.items()}
    spec = by_key.get(_key(name))
    if spec is None:
        known = ", ".join(sorted(MODELS))
        raise ConfigError(f"unknown model {name!r}; known models: {known}")
    return spec


def gpu_spec(name: str | GpuSpec) -> GpuSpec:
    """The catalogue GPU called ``name`` (a spec passes through).

    ``KEY=VALUE`` pairs or a JSON file of them describe a device outside the
    catalogue, a CPU included (:func:`scheduler.describe.device_from`).

    Raises:
        ConfigError: unknown name; the message lists the known ones.
    """
    if isinstance(name, GpuSpec):
        return name
    if "=" in name or name.strip().lower().endswith(".json"):
        from scheduler.describe import device_from

        return device_from(name)
    key = _key(name)
    by_key = {_key(k): v for k, v in GPUS.items()}
    spec = by_key.get(key) or GPUS.get(_GPU_ALIASES.get(key, ""))
    if spec is None:
        known = ", ".join(sorted(GPUS))
        raise ConfigError(f"unknown GPU {name!r}; known GPUs: {known} (or a100, h100, h200)")
    return spec


def kv_capacity_tokens(
    model: ModelSpec,
    gpu: GpuSpec,
    tp: int,
    mem_fraction_static: float,
    reserve_bytes: float,
) -> int:
    """Tokens of KV cache one instance holds.

    ``(memory * mem_fraction_static - weights / tp - reserve_bytes) /
    kv_bytes_per_token``: SGLang's static pool is weights plus KV cache, and
    part of it goes to things that are neither (CUDA context, NCCL buffers),
    which ``reserve_bytes`` stands for.

    Raises:
        ConfigError: the fraction is outside (0, 1], or the weights leave no
            room for any KV cache.
    """
    if not 0.0 < mem_fraction_static <= 1.0:
        raise ConfigError(
            f"mem_fraction_static: expected a fraction in (0, 1]; got {mem_fraction_static!r}"
        )
    free = gpu.memory_bytes * mem_fraction_static - model.weight_bytes(tp) - reserve_bytes
    if free <= 0:
        raise ConfigError(
            f"{model.name} at tp={tp} does not fit on {gpu.name}: "
            f"{model.weight_bytes(tp) / _GB:.1f} GB of weights per GPU, "
            f"{gpu.memory_bytes * mem_fraction_static / _GB:.1f} GB static pool "
            f"(mem_fraction_static={mem_fraction_static}); raise tp"
        )
    return int(free // model.kv_bytes_per_token(tp))


@dataclass(frozen=True, slots=True)
class SglangDefaults:
    """The engine limits SGLang picks when the user sets none."""

    max_running_requests: int
    max_prefill_tokens: int
    chunked_prefill_size: int
    mem_fraction_static: float
    max_total_tokens: int
    cuda_graph_max_bs: int


#: SGLang's ``ServerArgs.max_prefill_tokens`` default.
_SGLANG_MAX_PREFILL_TOKENS = 16384


def _sglang_tier(gpu_mem_mib: float, tp: int) -> tuple[int, int]:
    """(chunked_prefill_size, cuda_graph_max_bs) by GPU memory, as SGLang picks them.

    Source: sglang python/sglang/srt/server_args.py,
    ``ServerArgs._handle_gpu_memory_settings`` (v0.5 series): under 20 GiB
    2048/8; under 35 GiB 2048/(24, or 80 from tp 4); under 60 GiB 4096/(32,
    or 160); under 90 GiB (H100, A100-80GB) and under 160 GiB (H200) 8192/
    (256, or 512 from tp 4); above, 16384/512.
    """
    gib = 1024.0
    if gpu_mem_mib < 20 * gib:
        return 2048, 8
    if gpu_mem_mib < 35 * gib:
        return 2048, 24 if tp < 4 else 80
    if gpu_mem_mib < 60 * gib:
        return 4096, 32 if tp < 4 else 160
    if gpu_mem_mib < 160 * gib:
        return 8192, 256 if tp < 4 else 512
    return 16384, 512


def sglang_defaults(
    model: str | ModelSpec,
    gpu: str | GpuSpec,
    tp: int = 1,
    *,
    reserve_bytes: float = RUNTIME_RESERVE_BYTES,
) -> SglangDefaults:
    """SGLang's default engine limits for ``model`` on ``gpu`` at tensor parallelism ``tp``.

    Follows sglang python/sglang/srt/server_args.py (v0.5 series):
    ``chunked_prefill_size`` and ``cuda_graph_max_bs`` by GPU memory (see
    :func:`_sglang_tier`); ``mem_fraction_static = (mem - reserved) / mem``
    rounded to 3 places, with ``reserved`` MiB = 512 + 1.5 per chunked-prefill
    token (at least 2048 tokens) + 2 per CUDA-graph batch slot + 128 per TP
    rank, at least 10 GiB on GPUs over 60 GiB; ``max_prefill_tokens`` 16384.
    ``max_total_tokens`` is the KV capacity at that fraction
    (:func:`kv_capacity_tokens`). ``max_running_requests`` follows
    python/sglang/srt/model_executor/model_runner.py: the request pool is
    ``max_total_tokens / context_length * 512`` clamped to [2048, 4096],
    and no more than half the KV tokens.
    """
    model, gpu = model_spec(model), gpu_spec(gpu)
    if tp < 1:
        raise ConfigError(f"tp: expected an integer >= 1; got {tp!r}")
    mem = gpu.memory_mib
    chunk, graph_bs = _sglang_tier(mem, tp)
    reserved = 512 + max(chunk, 2048) * 1.5 + graph_bs * 2 + tp / 8 * 1024
    if mem > 60 * 1024:
        reserved = max(reserved, 10 * 1024)
    fraction = round((mem - reserved) / mem, 3)
    total = kv_capacity_tokens(model, gpu, tp, fraction, reserve_bytes)
    pool = min(max(int(total / model.context_length * 512), 2048), 4096)
    return SglangDefaults(
        max_running_requests=min(pool, total // 2),
        max_prefill_tokens=_SGLANG_MAX_PREFILL_TOKENS,
        chunked_prefill_size=chunk,
        mem_fraction_static=fraction,
        max_total_tokens=total,
        cuda_graph_max_bs=graph_bs,
    )


@dataclass(frozen=True, slots=True)
class VllmDefaults:
    """The engine limits vLLM V1's OpenAI server picks when the user sets none."""

    max_num_seqs: int
    max_num_batched_tokens: int
    long_prefill_token_threshold: int
    gpu_memory_utilization: float
    block_size: int
    num_gpu_blocks: int
    max_cudagraph_capture_size: int


#: vLLM's ``CacheConfig.gpu_memory_utilization`` default.
_VLLM_GPU_MEMORY_UTILIZATION = 0.9


def vllm_defaults(
    model: str | ModelSpec,
    gpu: str | GpuSpec,
    tp: int = 1,
    *,
    reserve_bytes: float = RUNTIME_RESERVE_BYTES,
) -> VllmDefaults:
    """vLLM V1's default engine limits for ``model`` on ``gpu`` at tensor parallelism ``tp``.

    Follows vLLM (0.11 series) for ``vllm serve``:

    * vllm/engine/arg_utils.py, ``EngineArgs.get_batch_defaults``: on a
      device with at least 70 GiB that is not an A100, ``max_num_batched_tokens``
      8192 and ``max_num_seqs`` 1024 in the OpenAI-server usage context;
      otherwise 2048 and 256.
    * vllm/config/scheduler.py: ``long_prefill_token_threshold`` 0 (no
      per-request cap; it only becomes 4% of the context when
      ``max_num_partial_prefills`` is raised above 1).
    * vllm/config/cache.py: ``gpu_memory_utilization`` 0.9; ``block_size``
      16 on CUDA, 128 on CPU (vllm/platforms/cpu.py).
    * vllm/config/vllm.py, ``_set_cudagraph_sizes``: the largest captured
      batch is ``min(2 * max_num_seqs, 512, max_num_batched_tokens)``.

    ``num_gpu_blocks`` is the KV capacity at that utilization
    (:func:`kv_capacity_tokens`, with ``reserve_bytes`` standing for what
    vLLM's memory profiling finds taken besides weights) in whole blocks.
    """
    model, gpu = model_spec(model), gpu_spec(gpu)
    if tp < 1:
        raise ConfigError(f"tp: expected an integer >= 1; got {tp!r}")
    name = gpu.name.lower()
    if gpu.memory_bytes >= 70 * 1024 * _MIB and "a100" not in name:
        batched, seqs = 8192, 1024
    else:
        batched, seqs = 2048, 256
    block = 128 if "cpu" in name else 16
    tokens = kv_capacity_tokens(model, gpu, tp, _VLLM_GPU_MEMORY_UTILIZATION, reserve_bytes)
    return VllmDefaults(
        max_num_seqs=seqs,
        max_num_batched_tokens=batched,
        long_prefill_token_threshold=0,
        gpu_memory_utilization=_VLLM_GPU_MEMORY_UTILIZATION,
        block_size=block,
        num_gpu_blocks=tokens // block,
        max_cudagraph_capture_size=min(2 * seqs, 512, batched),
    )
