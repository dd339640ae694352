"""``laps`` in the simulator: every request served once, exact fast path, what it buys."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler import registry
from scheduler.policies.laps import LapsPolicy
from scheduler.policies.pd import PDPolicy
from sim.loop import simulate
from tests.unit.sim.fakes import AffineCost, make_limits, make_trace, random_trace
from tests.unit.sim.test_graph_batches import GraphCost

COST = GraphCost(prefill_attn_s=1e-9)

LAYOUTS = {
    "temporal-pd": dict(pd="1:2"),
    "temporal-mixed": dict(instances=1),
    "temporal-x4": dict(instances=4),
    "temporal-pd2": dict(pd="2:2"),
    "spatial": dict(instances=4),
    "spatial-pd": dict(pd="2:2"),
}


def make(layout: str, **params):
    if layout.startswith("spatial"):
        params.setdefault("mode", "spatial")
    laps = LapsPolicy(cost=COST, rebalance_period_s=0.5, **params)
    if "pd" in layout:
        return PDPolicy(laps, registry.create("least_load"))
    return laps


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_laps_serves_every_request_once_with_the_same_times_on_the_fast_path(layout):
    limits = make_limits(max_running_requests=24, max_total_tokens=12000, chunked_prefill_size=512)
    trace = random_trace(6, max_prompt=1200)
    fast, slow = (
        simulate(trace, COST, make(layout), limits, fast_forward=ff, debug=True, **LAYOUTS[layout])
        for ff in (True, False)
    )
    for name in ("dispatch_s", "first_token_s", "finish_s"):
        np.testing.assert_allclose(
            getattr(fast.columns, name), getattr(slow.columns, name), rtol=0, atol=1e-9
        )
    s = fast.summary()
    assert s["n_completed"] == 200
    assert (fast.columns.dispatch_s >= fast.arrival_s).all()
    assert fast.batches_frame().cuda_graph.any()


def bursty_trace(bursts: int = 40):
    """Every 0.5 s two 3000-token prompts, then five 100-token ones, 10 ms apart (load 0.7)."""
    arrival, prompt = [], []
    for b in range(bursts):
        for k, n in enumerate((3000, 3000, 100, 100, 100, 100, 100)):
            arrival.append(0.5 * b + 0.01 * k)
            prompt.append(n)
    return make_trace(arrival, prompt, [8] * len(arrival))


def test_short_prefills_stop_waiting_behind_long_ones_on_one_prefill_instance():
    trace = bursty_trace()
    limits = make_limits()
    cost = AffineCost()
    fcfs = simulate(trace, cost, registry.create("fcfs"), limits, pd="1:1")
    laps = simulate(trace, cost, PDPolicy(LapsPolicy(), registry.create("fcfs")), limits, pd="1:1")
    short = trace.frame["prompt_tokens"].to_numpy() < 256
    f_short, l_short = fcfs.ttft_s[short].mean(), laps.ttft_s[short].mean()
    assert l_short < 0.7 * f_short, (l_short, f_short)
    assert laps.ttft_s.mean() < fcfs.ttft_s.mean()
    # The starvation bound (400 ms) keeps long requests near first come, first served.
    assert laps.ttft_s[~short].max() < fcfs.ttft_s[~short].max() + 0.4
