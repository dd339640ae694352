"""The roofline step-time cost model: published figures and shape properties."""

from __future__ import annotations

import pytest

from scheduler.cost_model import CostModel, Efficiency, StepCost
from scheduler.hardware import gpu_spec, model_spec
from traces.errors import ConfigError


@pytest.fixture(scope="module")
def qwen32_h200() -> CostModel:
    return CostModel.from_names("qwen2.5-32b", "h200")


@pytest.fixture(scope="module")
def llama8_h100() -> CostModel:
    return CostModel.from_names("llama-3.1-8b", "h100")


def test_it_is_a_step_cost(qwen32_h200):
    assert isinstance(qwen32_h200, StepCost)


# -- published figures ---------------------------------------------------------------


def test_llama8b_prefill_throughput_matches_sglang_bench_one_batch(llama8_h100):
    # sgl-project/sglang PR #2134 (Nov 2024): `bench_one_batch --batch-size 128
    # --input 128 --model meta-llama/Llama-3.1-8B-Instruct` printed "Prefill.
    # latency: 0.37300 s, throughput: 43925.00 token/s". The GPU is not named,
    # but 2 * 6.98e9 FLOP * 43,925/s = 6.1e14 FLOP/s is beyond an A100's peak,
    # so it ran on a Hopper part (H100 and H200 share the 989.5 TFLOP/s peak).
    t = llama8_h100.prefill_time_s([128] * 128, [0] * 128)
    assert t == pytest.approx(0.373, rel=0.15)
    assert 30_000 < 128 * 128 / t < 55_000


def test_llama8b_batch1_decode_on_h100_is_the_weight_read_plus_overhead(llama8_h100):
    # 16.06 GB of bf16 weights at the datasheet's 3.35 TB/s is 4.8 ms: a floor
    # no engine beats; engines add launch and sampling costs, ~6-8 ms in all.
    t = llama8_h100.decode_time_s(1, 1024)
    assert 16.06e9 / 3.35e12 < t < 8e-3
    assert t > 6e-3


def test_qwen32b_2k_prefill_on_h200_is_compute_bound(qwen32_h200):
    # 2048 tokens x 2 x 31.2e9 non-embedding parameters = 1.28e14 FLOP, 129 ms
    # at 100% of peak; at the ~62% of peak SGLang reaches (test above) ~210 ms.
    t = qwen32_h200.prefill_time_s([2048], [0])
    assert 0.129 < t < 0.250


def test_llama70b_tp2_prefill_is_consistent_with_nims_fp8_ttft():
    # NVIDIA NIM benchmarks (docs.nvidia.com/nim/benchmarking/llm/1.0.0/
    # performance): Llama-3.3-70B (Llama-3.1-70B's architecture) on 2 x H100,
    # fp8, TP2, 5000 input tokens, concurrency 1: TTFT 406.77 ms. FP8 tensor
    # cores have twice the BF16 peak, so a BF16 prefill takes longer, but
    # less than 2.5 times as long.
    cm = CostModel.from_names("llama-3.1-70b", "h100", tp=2)
    ratio = cm.prefill_time_s([5000], [0]) / 0.40677
    assert 1.0 < ratio < 2.5


def test_a_512_token_prefill_saturates_an_a100_with_a_13b_model():
    # DistServe (Zhong et al., OSDI 2024, section 3.1): "for a 13B LLM,
    # computing the prefill of a 512-token sequence makes an A100 near
    # compute-bound".
    cm = CostModel.from_names("qwen2.5-14b", "a100")
    assert cm.prefill_crossover_tokens() < 512


def test_laps_crossover_is_a_few_hundred_tokens_for_32b_on_h200(qwen32_h200):
    # LAPS (She et al., arXiv 2601.11589) calls prompts under 256 tokens
    # memory-bound short prefills for Qwen2.5-32B.
    assert 64 <= qwen32_h200.prefill_crossover_tokens() <= 512


# -- shape ---------------------------------------------------------------------------


def test_prefill_per_token_cost_falls_then_flattens(qwen32_h200):
    per_token = {n: qwen32_h200.prefill_time_s([n], [0]) / n for n in (16, 64, 1024, 2048, 8192)}
    assert per_token[16] > 4 * per_token[1024]  # memory-bound: weights dominate
    assert per_token[16] > per_token[64] > per_token[1024]
    # Compute-bound: flat apart from attention's slow growth.
    assert per_token[8192] == pytest.approx(per_token[2048], rel=0.15)


def test_crossover_is_where_compute_meets_memory_time(qwen32_h200):
    k = qwen32_h200.coefficients
    for cached in (0, 4096):
        n = qwen32_h200.prefill_crossover_tokens(cached)

        def compute(tokens: int, cached: int = cached) -> float:
            units = tokens * (cached + tokens / 2)
            return (
                k.linear_s_per_token * tokens + k.lm_head_s_per_seq + k.attention_s_per_unit * units
            )

        def memory(tokens: int, cached: int = cached) -> float:
            # Weights streamed once, the new tokens' KV written, the prefix's KV read.
            return k.weight_read_s + k.kv_read_s_per_token * (tokens + cached)

        assert compute(n - 1) < memory(n - 1) and compute(n) >= memory(n)
    # Attention over a long prefix adds compute: the threshold drops.
    assert qwen32_h200.prefill_crossover_tokens(4096) < qwen32_h200.prefill_crossover_tokens(0)


@pytest.mark.parametrize(
    ("model", "gpu", "tp"),
    [("qwen2.5-32b", "h200", 1), ("qwen2.5-32b", "h100", 1), ("llama-3.1-70b", "h100", 4)],
)
def test_the_cost_model_and_the_laps_threshold_agree_on_the_crossover(model, gpu, tp):
    # One definition: LAPS's adaptive short/long threshold is the cost model's crossover.
    from scheduler.length import LengthClassifier

    cm = CostModel.from_names(model, gpu, tp)
    classifier = LengthClassifier(adaptive=True, cost=cm)
    for cached in (0, 1024, 16384):
        assert classifier.threshold_for(cached) == cm.prefill_crossover_tokens(cached)
    # The documented figures for Qwen2.5-32B (scheduler/length.py).
    if (model, tp) == ("qwen2.5-32b", 1):
        expected = {"h200": (159, 120), "h100": (227, 172)}[gpu]
        assert (cm.prefill_crossover_tokens(0), cm.prefill_crossover_tokens(16384)) == expected


def test_prefill_grows_with_new_and_cached_tokens(qwen32_h200):
    times = [qwen32_h200.prefill_time_s([n], [0]) for n in (1, 8, 64, 256, 1024, 4096, 16384)]
    assert times == sorted(times)
    cached = [qwen32_h200.prefill_time_s([256], [c]) for c in (0, 1024, 8192, 32768)]
    assert cached == sorted(cached) and cached[-1] > cached[0]
    assert qwen32_h200.prefill_time_s([], []) == 0.0


def test_batching_short_prefills_is_nearly_free(qwen32_h200):
    one = qwen32_h200.prefill_time_s([32], [0])
    eight = qwen32_h200.prefill_time_s([32] * 8, [0] * 8)
    assert eight < 1.5 * one


@pytest.mark.parametrize("batch", [1, 7, 64, 256])
def test_decode_is_affine_in_context(qwen32_h200, batch):
    a, b = qwen32_h200.decode_coeffs(batch)
    for ctx in (0, 1000, 123_457, 2_000_000):
        assert qwen32_h200.decode_time_s(batch, ctx) == pytest.approx(a + b * ctx, rel=1e-12)
    assert b == pytest.approx(qwen32_h200.kv_bytes_per_token / (4.8e12 * 0.8))


def test_decode_grows_with_batch_and_becomes_compute_bound(qwen32_h200):
    times = [qwen32_h200.decode_time_s(n, 0) for n in (1, 16, 64, 256, 1024)]
    assert times == sorted(times)
    # Memory-bound at small batches (the weight read dominates) ...
    assert times[1] < 1.1 * times[0]
    # ... compute-bound far past the crossover: time ~ proportional to batch.
    big = [qwen32_h200.decode_time_s(n, 0) for n in (2048, 4096)]
    assert big[1] / big[0] == pytest.approx(2, rel=0.1)


def test_eager_steps_cost_more_than_cuda_graphs(llama8_h100):
    assert llama8_h100.decode_time_s(8, 8000, cuda_graph=False) > llama8_h100.decode_time_s(8, 8000)
    assert llama8_h100.prefill_time_s([64], [0]) > llama8_h100.prefill_time_s(
        [64], [0], cuda_graph=True
    )


def test_a_mixed_step_shares_the_weight_read(qwen32_h200):
    prefill = qwen32_h200.prefill_time_s([512], [0])
    decode = qwen32_h200.decode_time_s(32, 32 * 1024)
    mixed = qwen32_h200.mixed_time_s([512], [0], 32, 32 * 1024)
    assert max(prefill, decode) < mixed < prefill + decode
    assert qwen32_h200.mixed_time_s([], [], 32, 32 * 1024) == decode
    assert qwen32_h200.mixed_time_s([512], [0], 0, 0) == prefill


def test_tensor_parallelism_helps_less_than_linearly():
    m = model_spec("qwen2.5-32b")
    cms = {tp: CostModel(m, gpu_spec("h100"), tp) for tp in (1, 2, 4, 8)}
    for step in (
        lambda cm: cm.prefill_time_s([2048], [0]),
        lambda cm: cm.decode_time_s(32, 32 * 1024),
    ):
        t = {tp: step(cm) for tp, cm in cms.items()}
        for lo, hi in ((1, 2), (2, 4), (4, 8)):
            assert 1.0 < t[lo] / t[hi] < 2.0


def test_larger_models_are_slower():
    h200 = gpu_spec("h200")
    names = ("qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b")
    prefill = [CostModel(model_spec(n), h200).prefill_time_s([1024], [0]) for n in names]
    decode = [CostModel(model_spec(n), h200).decode_time_s(16, 16_000) for n in names]
    assert prefill == sorted(prefill) and decode == sorted(decode)
    small, big = (CostModel.from_names(n, "h100", tp=4) for n in ("llama-3.1-8b", "llama-3.1-70b"))
    assert big.prefill_time_s([1024], [0]) > 3 * small.prefill_time_s([1024], [0])


def test_a_faster_gpu_is_faster():
    times = {
        g: CostModel.from_names("qwen2.5-7b", g).decode_time_s(8, 8000)
        for g in ("a100", "h100", "h200")
    }
    assert times["a100"] > times["h100"] > times["h200"]


def test_kv_transfer_over_nvlink_beats_the_network(qwen32_h200):
    nvlink = CostModel.from_names("qwen2.5-32b", "h200", kv_link="nvlink")
    net = qwen32_h200.kv_transfer_time_s(4096)
    # 4096 tokens x 256 KiB = 1.07 GB over 50 GB/s x 0.8: about 27 ms.
    assert net == pytest.approx(4096 * 262144 / 40e9 + 1e-4)
    assert nvlink.kv_transfer_time_s(4096) < net / 5
    assert qwen32_h200.kv_transfer_time_s(0) == 0.0
    fixed = CostModel.from_names("qwen2.5-32b", "h200", kv_link=10e9)
    assert fixed.kv_transfer_time_s(1000) == pytest.approx(1000 * 262144 / 10e9 + 1e-4)


def test_kv_bytes_and_capacity(qwen32_h200):
    assert qwen32_h200.kv_bytes_per_token == 2 * 64 * 8 * 128 * 2
    full, less = qwen32_h200.kv_capacity_tokens(0.9), qwen32_h200.kv_capacity_tokens(0.8)
    assert full - less == pytest.approx(0.1 * 143771 * 2**20 / 262144, abs=1)


def test_efficiency_knobs_move_the_right_terms():
    slow_hbm = CostModel.from_names(
        "llama-3.1-8b", "h100", efficiency=Efficiency(hbm_efficiency=0.4)
    )
    base = CostModel.from_names("llama-3.1-8b", "h100")
    # Halving the bandwidth doubles the weight read, most of a batch-1 step.
    extra = slow_hbm.decode_time_s(1, 0) - base.decode_time_s(1, 0)
    assert extra == pytest.approx(base.coefficients.weight_read_s)
    # A long compute-bound prefill barely notices the bandwidth.
    assert slow_hbm.prefill_time_s([8192], [0]) == pytest.approx(
        base.prefill_time_s([8192], [0]), rel=0.02
    )


def test_bad_arguments_are_named():
    with pytest.raises(ConfigError, match="tp"):
        CostModel.from_names("qwen2.5-7b", "h100", tp=0)
    with pytest.raises(ConfigError, match="kv_link"):
        CostModel.from_names("qwen2.5-7b", "h100", kv_link="carrier pigeon")
    with pytest.raises(ConfigError, match=r"Efficiency\.gemm_mfu"):
        Efficiency(gemm_mfu=-0.1)
    with pytest.raises(ValueError):
        CostModel.from_names("qwen2.5-7b", "h100").prefill_time_s([10, 20], [0])
