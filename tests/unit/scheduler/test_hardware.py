"""The model/GPU catalogue and SGLang's default engine limits."""

from __future__ import annotations

import pytest

from scheduler.hardware import (
    GPUS,
    MODELS,
    gpu_spec,
    kv_capacity_tokens,
    model_spec,
    sglang_defaults,
)
from traces.errors import ConfigError


@pytest.mark.parametrize(
    ("name", "total_params"),
    [
        # Parameter counts of the published safetensors checkpoints (Hugging
        # Face model pages): exact for Llama, rounded to 0.1B there for Qwen.
        ("Llama-3.1-8B", 8_030_261_248),
        ("Llama-3.1-70B", 70_553_706_496),
        ("Qwen2.5-7B", 7.6e9),
        ("Qwen2.5-14B", 14.8e9),
        ("Qwen2.5-32B", 32.8e9),
        ("Qwen2.5-72B", 72.7e9),
    ],
)
def test_derived_parameter_count_matches_the_published_checkpoint(name, total_params):
    assert MODELS[name].total_params == pytest.approx(total_params, abs=0.05e9)


def test_qwen25_32b_shape_is_its_config_json():
    # Qwen/Qwen2.5-32B-Instruct config.json.
    m = model_spec("qwen2.5-32b")
    got = (m.n_layers, m.hidden_size, m.n_heads, m.n_kv_heads, m.intermediate_size, m.vocab_size)
    assert got == (64, 5120, 40, 8, 27648, 152064)
    assert m.head_dim == 128


@pytest.mark.parametrize(
    ("typed", "canonical"),
    [
        ("qwen2.5-32b", "Qwen2.5-32B"),
        ("Qwen/Qwen2.5-32B-Instruct", "Qwen2.5-32B"),
        ("QWEN2.5-7B", "Qwen2.5-7B"),
        ("llama-3.1-8b", "Llama-3.1-8B"),
        ("meta-llama/Meta-Llama-3.1-70B-Instruct", "Llama-3.1-70B"),
    ],
)
def test_models_are_found_by_the_names_users_type(typed, canonical):
    assert model_spec(typed).name == canonical


@pytest.mark.parametrize(
    ("typed", "canonical"),
    [("h200", "H200"), ("H100", "H100-SXM"), ("a100", "A100-80GB"), ("h100-sxm", "H100-SXM")],
)
def test_gpus_are_found_by_the_names_users_type(typed, canonical):
    assert gpu_spec(typed).name == canonical


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown model 'gpt-5'.*Llama-3\.1-8B.*Qwen2\.5-72B"):
        model_spec("gpt-5")
    with pytest.raises(ConfigError, match=r"unknown GPU 'b200'.*A100-80GB, H100-SXM, H200"):
        gpu_spec("b200")


def test_gpu_figures_are_the_datasheets():
    h100, h200, a100 = GPUS["H100-SXM"], GPUS["H200"], GPUS["A100-80GB"]
    assert (h100.peak_bf16_flops, h100.hbm_bandwidth_Bps) == (989.5e12, 3.35e12)
    assert (h200.peak_bf16_flops, h200.hbm_bandwidth_Bps) == (989.5e12, 4.8e12)
    assert (a100.peak_bf16_flops, a100.hbm_bandwidth_Bps) == (312e12, 2.039e12)
    assert round(h200.memory_bytes / 1e9) == 151  # 143771 MiB, sold as "141 GB"


def test_kv_bytes_per_token_splits_kv_heads_across_ranks():
    m = model_spec("llama-3.1-8b")  # 32 layers, 8 KV heads of 128, bf16
    assert m.kv_bytes_per_token(1) == 2 * 32 * 8 * 128 * 2 == 131072
    assert m.kv_bytes_per_token(4) == 131072 // 4
    # Past one head per rank the heads are replicated, not split further.
    assert m.kv_bytes_per_token(16) == m.kv_bytes_per_token(8) == 2 * 32 * 1 * 128 * 2


def test_kv_capacity_is_the_static_pool_left_after_weights():
    m, g = model_spec("llama-3.1-8b"), gpu_spec("h100")
    tokens = kv_capacity_tokens(m, g, 1, 0.8, 0)
    assert tokens == int((g.memory_bytes * 0.8 - m.weight_bytes()) // 131072)
    assert kv_capacity_tokens(m, g, 2, 0.8, 0) > 2 * tokens  # weights shrink too


def test_a_model_that_does_not_fit_says_so():
    with pytest.raises(ConfigError, match=r"Qwen2\.5-72B at tp=1 does not fit on H100-SXM"):
        kv_capacity_tokens(model_spec("qwen2.5-72b"), gpu_spec("h100"), 1, 0.9, 0)
    with pytest.raises(ConfigError, match="mem_fraction_static"):
        kv_capacity_tokens(model_spec("qwen2.5-7b"), gpu_spec("h100"), 1, 1.5, 0)


def test_sglang_defaults_on_an_h100():
    # server_args.py: 8k chunks and 256 CUDA-graph slots on 60-160 GiB GPUs
    # below tp 4; reserve 512 + 8192 * 1.5 + 256 * 2 + 128 MiB = 13440 MiB.
    d = sglang_defaults("llama-3.1-8b", "h100", 1)
    assert (d.chunked_prefill_size, d.cuda_graph_max_bs, d.max_prefill_tokens) == (8192, 256, 16384)
    assert d.mem_fraction_static == round((81559 - 13440) / 81559, 3) == 0.835
    # 131072-token context: the request pool is clamped up to 2048.
    assert d.max_running_requests == 2048
    assert 350_000 < d.max_total_tokens < 450_000


def test_sglang_defaults_grow_with_memory_and_tp():
    h100 = sglang_defaults("qwen2.5-32b", "h100", 1)
    h200 = sglang_defaults("qwen2.5-32b", "h200", 1)
    assert h200.mem_fraction_static > h100.mem_fraction_static
    assert h200.max_total_tokens > 5 * h100.max_total_tokens
    tp4 = sglang_defaults("qwen2.5-32b", "h100", 4)
    assert tp4.cuda_graph_max_bs == 512
    assert tp4.max_total_tokens > h100.max_total_tokens
