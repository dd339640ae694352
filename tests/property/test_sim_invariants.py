"""Simulator invariants on small random traces (hypothesis)."""

from __future__ import annotations

from collections import Counter

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.registry import create
from sim import engine as engine_module
from sim.loop import simulate
from sim.records import OUTCOME_FAILED, OUTCOME_OK, OUTCOME_REJECTED
from tests.unit.sim.fakes import AffineCost, HoldingPolicy, make_limits, make_trace

COST = AffineCost(prefill_attn_s=1e-9)

requests = st.lists(
    st.tuples(
        st.floats(0.0, 0.2),  # gap to the previous arrival
        st.integers(1, 3000),  # prompt tokens
        st.integers(1, 200),  # output tokens
        st.integers(0, 4),  # shared system-prompt blocks
        st.booleans(),  # failed
    ),
    min_size=1,
    max_size=40,
)
configs = st.fixed_dictionaries(
    {
        "max_total_tokens": st.integers(3500, 20000),
        "chunked_prefill_size": st.sampled_from([0, 256, 1024]),
        "max_running_requests": st.integers(1, 16),
        "mixed_chunk": st.booleans(),
    }
)
layouts = st.sampled_from([(1, None), (3, None), (0, "1:2"), (0, "2:1")])
policies = st.sampled_from(["fcfs", "round_robin", "holding"])


def build(rows):
    arrival = np.cumsum([r[0] for r in rows])
    hashes = []
    for i, (_, prompt, _, shared, _) in enumerate(rows):
        n_blocks = -(-prompt // 128)
        k = min(shared, n_blocks)
        hashes.append(list(range(k)) + [1000 * (i + 1) + j for j in range(n_blocks - k)])
    return make_trace(
        arrival,
        [r[1] for r in rows],
        [r[2] for r in rows],
        prefix_hashes=hashes,
        block_tokens=128,
        failed=[r[4] for r in rows],
    )


def policy(name):
    return HoldingPolicy(0.01) if name == "holding" else create(name)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=requests, config=configs, layout=layouts, name=policies)
def test_every_request_is_served_once_in_order_with_all_its_tokens(rows, config, layout, name):
    trace = build(rows)
    limits = make_limits(**config)
    finishes: Counter[int] = Counter()
    original = engine_module.Engine._finish

    def counting(self, req, t_end, rec):
        finishes[req.row] += 1
        original(self, req, t_end, rec)

    engine_module.Engine._finish = counting
    try:
        instances, pd = layout
        res = simulate(trace, COST, policy(name), limits, instances=instances, pd=pd, debug=True)
    finally:
        engine_module.Engine._finish = original
    c = res.columns
    failed = np.array([r[4] for r in rows])
    output = res.output_tokens
    ok = c.outcome == OUTCOME_OK
    # Every request is accounted for exactly once.
    assert np.all(c.outcome[failed] == OUTCOME_FAILED)
    assert np.all(np.isin(c.outcome[~failed], [OUTCOME_OK, OUTCOME_REJECTED]))
    assert all(finishes[row] == 1 for row in np.flatnonzero(ok))
    assert sum(finishes.values()) == ok.sum()
    # Time never runs backwards for a request.
    assert np.all(c.dispatch_s[ok] >= res.arrival_s[ok])
    assert np.all(c.prefill_start_s[ok] >= c.dispatch_s[ok])
    assert np.all(c.first_token_s[ok] > c.prefill_start_s[ok])
    assert np.all(c.finish_s[ok] >= c.first_token_s[ok])
    # Tokens are conserved: produced == requested by the completed requests.
    assert res.tokens_out == int(output[ok].sum())
    assert res.itl.count == int((output[ok] - 1).sum())
    # The KV cache never holds more than its capacity.
    q = res.queue_frame()
    assert np.all(q["kv_used_tokens"] <= limits.max_total_tokens)
    assert np.all(q["running"] <= limits.max_running_requests)
    assert np.all(c.cached_tokens[ok] < res.prompt_tokens[ok])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=requests, config=configs, layout=layouts, name=policies)
def test_fast_forward_never_changes_a_result(rows, config, layout, name):
    trace = build(rows)
    limits = make_limits(**config)
    instances, pd = layout
    fast, slow = (
        simulate(trace, COST, policy(name), limits, instances=instances, pd=pd, fast_forward=ff)
        for ff in (True, False)
    )
    for col in ("first_token_s", "finish_s", "prefill_start_s"):
        np.testing.assert_allclose(
            getattr(fast.columns, col), getattr(slow.columns, col), rtol=0, atol=1e-9
        )
    np.testing.assert_array_equal(fast.columns.n_preemptions, slow.columns.n_preemptions)
