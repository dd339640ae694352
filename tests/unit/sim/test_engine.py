"""Engine model: batching, chunking, preemption, prefix hits, roles, exact step times."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scheduler.registry import create
from sim.loop import simulate
from sim.records import OUTCOME_FAILED, OUTCOME_OK, OUTCOME_REJECTED
from tests.unit.sim.fakes import AffineCost, make_limits, make_trace

COST = AffineCost(prefill_attn_s=1e-9)


def run(trace, *, cost=COST, fast_forward=True, **limit_overrides):
    options = {k: limit_overrides.pop(k) for k in ("instances", "pd") if k in limit_overrides}
    limits = make_limits(**limit_overrides)
    return simulate(
        trace, cost, create("fcfs"), limits, fast_forward=fast_forward, debug=True, **options
    )


def decode_s(batch: int, context: int) -> float:
    a, b = COST.decode_coeffs(batch)
    return a + b * context


@pytest.mark.parametrize("fast_forward", [True, False])
def test_single_request_times_are_the_cost_model_sums(fast_forward):
    res = run(make_trace([0.5], [1000], [5]), fast_forward=fast_forward)
    c = res.columns
    first = 0.5 + COST.prefill_time_s([1000], [0])
    # Four decode steps; the KV holds the prompt plus the tokens already fed back.
    finish = first + sum(decode_s(1, 1000 + i) for i in range(1, 5))
    assert c.prefill_start_s[0] == 0.5
    assert c.first_token_s[0] == pytest.approx(first, abs=1e-12)
    assert c.finish_s[0] == pytest.approx(finish, abs=1e-12)
    assert res.tokens_out == 5


def test_chunked_prefill_splits_a_long_prompt_into_budget_sized_chunks():
    res = run(make_trace([0.0], [5000], [1]), chunked_prefill_size=2048, max_prefill_tokens=4096)
    expected = (
        COST.prefill_time_s([2048], [0])
        + COST.prefill_time_s([2048], [2048])
        + COST.prefill_time_s([904], [4096])
    )
    assert res.columns.first_token_s[0] == pytest.approx(expected, abs=1e-12)
    # Without chunking the prompt runs in one step.
    whole = run(make_trace([0.0], [5000], [1]), chunked_prefill_size=0, max_prefill_tokens=4096)
    assert whole.columns.first_token_s[0] == pytest.approx(
        COST.prefill_time_s([5000], [0]), abs=1e-12
    )


def test_prefill_budget_batches_waiting_requests_together():
    trace = make_trace([0.0, 0.0, 0.0], [1000, 1000, 3000], [1, 1, 1])
    c = run(trace, max_prefill_tokens=2500, chunked_prefill_size=0).columns
    both = COST.prefill_time_s([1000, 1000], [0, 0])
    assert c.first_token_s[0] == c.first_token_s[1] == pytest.approx(both)
    # The third does not fit the 2500-token budget: it runs alone next.
    assert c.prefill_start_s[2] == pytest.approx(both)
    assert c.first_token_s[2] == pytest.approx(both + COST.prefill_time_s([3000], [0]))
    # With chunking (budget min(2500, 2048)) it fills the 48 tokens left.
    c = run(trace, max_prefill_tokens=2500, chunked_prefill_size=2048).columns
    first = COST.prefill_time_s([1000, 1000, 48], [0, 0, 0])
    assert c.first_token_s[0] == pytest.approx(first)
    assert c.prefill_start_s[2] == 0.0
    assert c.first_token_s[2] == pytest.approx(
        first + COST.prefill_time_s([2048], [48]) + COST.prefill_time_s([904], [2096])
    )


def _two_requests(mixed: bool):
    trace = make_trace([0.0, 0.016], [100, 200], [3, 2])
    return run(trace, mixed_chunk=mixed).columns


def test_sglang_default_runs_a_waiting_prefill_before_the_next_decode_step():
    c = _two_requests(mixed=False)
    t = COST.prefill_time_s([100], [0])
    assert c.first_token_s[0] == pytest.approx(t)
    t += decode_s(1, 101)  # request 1 arrives during this step
    t += COST.prefill_time_s([200], [0])  # prefill first: decode stalls
    assert c.first_token_s[1] == pytest.approx(t)
    t += decode_s(2, 102 + 200)
    assert c.finish_s[0] == pytest.approx(t) == pytest.approx(c.finish_s[1])


def test_mixed_chunk_runs_the_prefill_inside_the_decode_step():
    c = _two_requests(mixed=True)
    t = COST.prefill_time_s([100], [0]) + decode_s(1, 101)
    t += COST.mixed_time_s([200], [0], 1, 102)
    assert c.first_token_s[1] == pytest.approx(t)
    assert c.finish_s[0] == pytest.approx(t)  # its third token came from the mixed step
    assert c.finish_s[1] == pytest.approx(t + decode_s(1, 200))


def test_kv_exhaustion_preempts_the_youngest_and_every_token_is_still_produced():
    trace = make_trace([0.0, 0.0, 0.0], [300, 300, 300], [200, 200, 200])
    res = run(trace, max_total_tokens=1000)
    c = res.columns
    assert list(c.n_preemptions) == [0, 0, 1]
    assert list(c.outcome) == [OUTCOME_OK] * 3
    assert c.finish_s[2] > max(c.finish_s[0], c.finish_s[1])
    assert res.tokens_out == 600
    assert res.queue_frame()["kv_used_tokens"].max() <= 1000


def test_prefix_blocks_are_reused_and_one_token_is_always_computed():
    shared = [11, 12, 13]
    trace = make_trace(
        [0.0, 1.0, 2.0],
        [250, 250, 192],
        [1, 1, 1],
        prefix_hashes=[[*shared, 14], [*shared, 15], shared],
        block_tokens=64,
    )
    res = run(trace)
    c = res.columns
    assert list(c.cached_tokens) == [0, 192, 191]
    assert c.first_token_s[1] - 1.0 == pytest.approx(COST.prefill_time_s([58], [192]))
    assert c.first_token_s[2] - 2.0 == pytest.approx(COST.prefill_time_s([1], [191]))


def test_cached_blocks_are_evicted_least_recently_used_first():
    # Capacity for about three 128-token prompts: the oldest cached prompt goes first.
    prompts = [[i * 10 + j for j in range(2)] for i in range(5)]
    trace = make_trace(
        [0, 1, 2, 3, 4, 5],
        [128] * 6,
        [1] * 6,
        prefix_hashes=[*prompts, prompts[3]],
        block_tokens=64,
    )
    res = run(trace, max_total_tokens=400)
    assert res.columns.cached_tokens[5] == 127  # prompt 3 is still cached
    trace = make_trace(
        [0, 1, 2, 3, 4, 5],
        [128] * 6,
        [1] * 6,
        prefix_hashes=[*prompts, prompts[0]],
        block_tokens=64,
    )
    assert run(trace, max_total_tokens=400).columns.cached_tokens[5] == 0  # prompt 0 was evicted


def test_a_request_that_can_never_fit_is_rejected_and_failed_rows_are_skipped():
    trace = make_trace([0.0, 0.1, 0.2], [100, 5000, 100], [10, 10, 10], failed=[False, False, True])
    res = run(trace, max_total_tokens=4000)
    c = res.columns
    assert list(c.outcome) == [OUTCOME_OK, OUTCOME_REJECTED, OUTCOME_FAILED]
    assert math.isnan(c.finish_s[1]) and math.isnan(c.dispatch_s[2])
    s = res.summary()
    assert (s["n_requests"], s["n_completed"], s["n_rejected"], s["n_failed"]) == (3, 1, 1, 1)


def test_pd_prefill_instance_makes_the_first_token_and_decode_instance_the_rest():
    res = run(make_trace([0.0], [1000], [4]), pd="1:1")
    c = res.columns
    first = COST.prefill_time_s([1000], [0])
    xfer = COST.kv_transfer_time_s(1000)
    second = first + xfer + decode_s(1, 1001)
    assert (c.instance[0], c.decode_instance[0]) == (0, 1)
    assert c.first_token_s[0] == pytest.approx(first)
    assert c.kv_transfer_s[0] == pytest.approx(xfer)
    assert c.first_decode_s[0] == pytest.approx(decode_s(1, 1001))
    assert c.finish_s[0] == pytest.approx(second + decode_s(1, 1002) + decode_s(1, 1003))
    row = res.frame().iloc[0]
    parts = row["router_queue_s"] + row["prefill_queue_s"] + row["prefill_s"]
    assert parts == pytest.approx(row["ttft_s"])


def test_pd_one_token_requests_finish_on_the_prefill_instance():
    c = run(make_trace([0.0], [1000], [1]), pd="1:1").columns
    assert c.decode_instance[0] == -1
    assert c.finish_s[0] == c.first_token_s[0]


def test_max_running_requests_caps_the_batch():
    trace = make_trace([0.0] * 6, [10] * 6, [50] * 6)
    res = run(trace, max_running_requests=2)
    q = res.queue_frame()
    assert q["running"].max() == 2
    starts = np.sort(res.columns.prefill_start_s)
    assert starts[0] == starts[1] == 0.0 and starts[2] > 0.0
