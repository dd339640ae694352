"""The two engine models: vLLM's token budget against SGLang's alternation, and KV blocks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.hardware import vllm_defaults
from scheduler.registry import create
from sim.limits import EngineLimits, resolve_limits
from sim.loop import simulate
from tests.unit.sim.fakes import AffineCost, make_limits, make_trace
from tests.unit.sim.test_loop import assert_same_times
from traces.errors import ConfigError

COST = AffineCost()


def vllm_limits(**overrides) -> EngineLimits:
    base = dict(
        max_num_seqs=8,
        max_num_batched_tokens=64,
        num_gpu_blocks_override=10_000,
        block_size=1,
    )
    return resolve_limits(
        COST, vllm_defaults("llama-3.1-8b", "h100"), engine="vllm", **{**base, **overrides}
    )


def steps(trace, limits, policy="fcfs"):
    result = simulate(trace, COST, create(policy), limits)
    return result, result.steps_frame()


# -- scheduling -----------------------------------------------------------------------


def _long_prompt_behind_a_decode():
    # A decodes from ~10 ms; B's 200-token prompt arrives while it does.
    return make_trace([0.0, 0.012], [10, 200], [40, 2])


def test_vllm_decodes_first_and_fills_the_rest_of_the_budget_with_a_prefill_chunk():
    _, log = steps(_long_prompt_behind_a_decode(), vllm_limits())
    mixed = log[log["kind"] == "mixed"]
    # Every step with B's prompt also decodes A: 1 decode token + 63 prompt tokens,
    # 63 + 63 + 63 + 11 = 200.
    assert list(mixed["decode_batch"][:4]) == [1, 1, 1, 1]
    assert list(mixed["prefill_tokens"][:4]) == [63, 63, 63, 11]
    assert set(log["kind"]) == {"prefill", "decode", "mixed"}
    # A never stalls: its inter-token gaps stay at one step each.
    assert not (log["kind"] == "prefill").iloc[1:].any()


def test_sglang_alternates_prefill_chunks_and_decode_steps():
    sglang = make_limits(max_prefill_tokens=64, chunked_prefill_size=64, max_total_tokens=10_000)
    _, log = steps(_long_prompt_behind_a_decode(), sglang)
    assert "mixed" not in set(log["kind"])
    # B's prompt runs as prefill-only chunks of the whole budget while A waits.
    chunks = log[(log["kind"] == "prefill") & (log["start_s"] > 0)]
    assert list(chunks["prefill_tokens"]) == [64, 64, 64, 8]
    assert (chunks["decode_batch"] == 0).all()
    # Decode steps only between chunks: none overlaps a prefill chunk's span.
    first, last = chunks["start_s"].min(), chunks["end_s"].max()
    decodes = log[log["kind"] == "decode"]
    inside = decodes[(decodes["start_s"] >= first) & (decodes["end_s"] <= last)]
    assert len(inside) == 0


def test_vllm_caps_each_request_chunk_at_the_long_prefill_threshold():
    _, log = steps(_long_prompt_behind_a_decode(), vllm_limits(long_prefill_token_threshold=50))
    mixed = log[log["kind"] == "mixed"]
    assert list(mixed["prefill_tokens"][:4]) == [50, 50, 50, 50]
    # Two long prompts at once: each step takes a capped chunk of both.
    trace = make_trace([0.0, 0.0], [200, 200], [2, 2])
    _, log = steps(trace, vllm_limits(max_num_batched_tokens=256, long_prefill_token_threshold=50))
    assert list(log["n_prefill"][:4]) == [2, 2, 2, 2]
    assert list(log["prefill_tokens"][:4]) == [100, 100, 100, 100]
    # Without the cap the first takes the whole budget, the second what is left.
    _, log = steps(trace, vllm_limits(max_num_batched_tokens=256))
    assert list(log["prefill_tokens"][:2]) == [256, 144]


def test_vllm_admits_no_waiting_request_in_a_step_that_preempted():
    # Two decoding requests fill 8 blocks of 16; the older needs a new block,
    # so the youngest is preempted, and the whole blocks it frees would take it
    # straight back. vLLM's step that preempted only decodes; it returns next step.
    trace = make_trace([0.0, 0.0], [17, 20], [60, 60])
    result, log = steps(trace, vllm_limits(num_gpu_blocks_override=8, block_size=16))
    at = np.flatnonzero(log["n_preempted"].to_numpy() > 0)
    assert len(at) >= 1
    assert (log["n_prefill"].to_numpy()[at] == 0).all()
    assert log["n_prefill"].to_numpy()[at[0] + 1] == 1
    assert result.tokens_out == 120


# -- KV blocks ------------------------------------------------------------------------


def test_capacity_is_whole_blocks_and_a_request_takes_whole_blocks():
    # 5 blocks of 16 = 80 slots. Three 17-token prompts take 2 blocks each: only
    # two fit at once in blocks, all three in single-token pages.
    trace = make_trace([0.0, 0.0, 0.0], [17, 17, 17], [2, 2, 2])
    blocks = vllm_limits(num_gpu_blocks_override=5, block_size=16)
    assert blocks.max_total_tokens == 80
    _, log = steps(trace, blocks)
    assert log["n_prefill"].iloc[0] == 2
    _, log = steps(trace, vllm_limits(num_gpu_blocks_override=80, block_size=1))
    assert log["n_prefill"].iloc[0] == 3


def test_decode_takes_a_new_block_only_when_the_last_one_is_full_and_preempts_then():
    # Two 17-token prompts hold 4 of 5 blocks. Both fill their second block in
    # 15 decode steps; the 16th needs two new blocks, one is free: preemption.
    trace = make_trace([0.0, 0.0], [17, 17], [40, 40])
    result, log = steps(trace, vllm_limits(num_gpu_blocks_override=5, block_size=16))
    decode_steps = np.cumsum(np.where(log["kind"] != "prefill", log["n_steps"], 0))
    first = int(np.argmax(log["n_preempted"].to_numpy() > 0))
    assert decode_steps[first - 1] == 15
    # In 80 single-token slots the same two requests run 23 steps before one is preempted.
    _, log = steps(trace, vllm_limits(num_gpu_blocks_override=80, block_size=1))
    decode_steps = np.cumsum(np.where(log["kind"] != "prefill", log["n_steps"], 0))
    first = int(np.argmax(log["n_preempted"].to_numpy() > 0))
    assert decode_steps[first - 1] == 23
    assert result.tokens_out == 80


def test_a_prefix_hit_is_reused_in_whole_blocks_only():
    # 48 shared tokens (three 16-token hashed blocks); the engine's 32-token
    # blocks reuse 32 of them, single-token pages all 48.
    shared = [1, 2, 3]
    trace = make_trace(
        [0.0, 1.0], [60, 60], [2, 2], prefix_hashes=[[*shared, 4], [*shared, 5]], block_tokens=16
    )
    result, _ = steps(trace, vllm_limits(block_size=32))
    assert list(result.columns.cached_tokens) == [0, 32]
    result, _ = steps(trace, vllm_limits(block_size=1))
    assert list(result.columns.cached_tokens) == [0, 48]


def test_a_request_that_fits_in_tokens_but_not_in_blocks_is_rejected():
    trace = make_trace([0.0], [70], [8])  # 78 tokens: 5 blocks of 16, not 4
    result, _ = steps(trace, vllm_limits(num_gpu_blocks_override=4, block_size=16))
    assert result.summary()["n_rejected"] == 1
    result, _ = steps(trace, vllm_limits(num_gpu_blocks_override=5, block_size=16))
    assert result.summary()["n_rejected"] == 0


# -- defaults and names -----------------------------------------------------------------


def test_vllm_defaults_follow_the_device():
    h100 = vllm_defaults("llama-3.1-8b", "h100")
    assert (h100.max_num_batched_tokens, h100.max_num_seqs, h100.block_size) == (8192, 1024, 16)
    assert h100.max_cudagraph_capture_size == 512 and h100.long_prefill_token_threshold == 0
    a100 = vllm_defaults("llama-3.1-8b", "a100")
    assert (a100.max_num_batched_tokens, a100.max_num_seqs) == (2048, 256)
    limits = resolve_limits(COST, a100, engine="vllm")
    assert limits.mixed_chunk and limits.engine == "vllm"
    assert limits.max_total_tokens == a100.num_gpu_blocks * 16
    assert limits.step_budget_tokens == 2048 and limits.cuda_graph_max_bs == 512


def test_a_limit_of_the_other_engine_names_the_right_one():
    a100 = vllm_defaults("llama-3.1-8b", "a100")
    with pytest.raises(
        ConfigError, match=r"max_running_requests is SGLang's name.*use max_num_seqs"
    ):
        resolve_limits(COST, a100, engine="vllm", max_running_requests=4)
    with pytest.raises(ConfigError, match="vLLM always runs prefill chunks inside decode steps"):
        resolve_limits(COST, a100, engine="vllm", mixed_chunk=True)
    with pytest.raises(ConfigError, match="must be at least max_num_seqs"):
        resolve_limits(COST, a100, engine="vllm", max_num_seqs=64, max_num_batched_tokens=32)


def test_a_scenario_key_of_the_other_engine_names_the_key_to_use():
    from pydantic import ValidationError

    from sim.specs import ClusterSpec

    with pytest.raises(ValidationError, match="use num_gpu_blocks_override"):
        ClusterSpec.model_validate({"engine": "vllm", "limits": {"max_total_tokens": 5000}})
    with pytest.raises(ValidationError, match=r'engine = "sglang".*use max_running_requests'):
        ClusterSpec.model_validate({"limits": {"max_num_seqs": 8}})
    spec = ClusterSpec.model_validate({"engine": "vllm", "limits": {"max_num_seqs": 8}})
    assert spec.limits.max_num_seqs == 8


# -- invariants under random load ---------------------------------------------------------

rows = st.lists(
    st.tuples(st.floats(0.0, 0.05), st.integers(1, 700), st.integers(2, 120), st.integers(0, 3)),
    min_size=1,
    max_size=25,
)
engines = st.fixed_dictionaries(
    {
        "engine": st.sampled_from(["sglang", "vllm"]),
        "block": st.sampled_from([1, 16, 32]),
        "blocks": st.integers(60, 400),
        "budget": st.sampled_from([64, 256, 1024]),
        "threshold": st.sampled_from([0, 100]),
        "pd": st.sampled_from([None, "1:1"]),
    }
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=rows, config=engines)
def test_blocks_and_engines_keep_every_invariant_and_stretches_match_single_steps(rows, config):
    arrival = np.cumsum([r[0] for r in rows])
    hashes = [
        list(range(min(r[3], -(-r[1] // 16)))) + [1000 * (i + 1) + j for j in range(-(-r[1] // 16))]
        for i, r in enumerate(rows)
    ]
    hashes = [h[: -(-r[1] // 16)] for h, r in zip(hashes, rows, strict=True)]
    trace = make_trace(
        arrival,
        [r[1] for r in rows],
        [r[2] for r in rows],
        prefix_hashes=hashes,
        block_tokens=16,
    )
    block, blocks = config["block"], config["blocks"]
    if config["engine"] == "vllm":
        limits = vllm_limits(
            max_num_seqs=8,
            max_num_batched_tokens=config["budget"],
            num_gpu_blocks_override=blocks * 16 // block,
            block_size=block,
            long_prefill_token_threshold=config["threshold"],
        )
    else:
        limits = make_limits(
            max_running_requests=8,
            max_prefill_tokens=config["budget"],
            chunked_prefill_size=config["budget"],
            max_total_tokens=blocks * 16,
            block_tokens=block,
        )
    runs = [
        simulate(
            trace,
            COST,
            create("fcfs"),
            limits,
            pd=config["pd"],
            instances=2,
            fast_forward=ff,
            debug=True,
        )
        for ff in (True, False)
    ]
    assert_same_times(*runs)
    frame = runs[0].frame()
    ok = (frame["outcome"] == "ok").to_numpy()
    assert runs[0].tokens_out == sum(r[2] for r, good in zip(rows, ok, strict=True) if good)
