"""The routing policies in the simulator: what each buys on workloads made to show it."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler import registry
from sim.loop import simulate
from tests.unit.sim.fakes import AffineCost, make_limits, make_trace, random_trace

COST = AffineCost(prefill_attn_s=1e-8)


def skewed_trace(n: int = 400):
    """Every 4th request is a 6000-token prompt, the rest 200; one arrival every 60 ms.

    Round robin on 4 instances sends every long prompt to instance 0, which
    needs about 0.31 s for each while they come every 0.24 s.
    """
    arrival = np.arange(n) * 0.06
    prompt = np.where(np.arange(n) % 4 == 0, 6000, 200)
    return make_trace(arrival, prompt, np.full(n, 20))


def conversations_trace(sessions: int = 15, turns: int = 6, block: int = 64):
    """Interleaved multi-turn sessions; turn k of a session resends its whole history."""
    arrival, prompt, hashes = [], [], []
    for k in range(turns):
        for s in range(sessions):
            n_blocks = 8 * (k + 1)
            arrival.append(0.03 * len(arrival))
            prompt.append(n_blocks * block)
            hashes.append([10_000 * (s + 1) + j for j in range(n_blocks)])
    n = len(arrival)
    return make_trace(arrival, prompt, [20] * n, prefix_hashes=hashes, block_tokens=block)


def run(trace, name: str, **params):
    return simulate(trace, COST, registry.create(name, **params), make_limits(), instances=4)


def test_load_aware_routing_beats_round_robin_on_a_skewed_workload():
    trace = skewed_trace()
    ttft = {
        name: float(np.nanmean(run(trace, name).ttft_s))
        for name in ("round_robin", "least_load", "cache_aware", "power_of_two")
    }
    assert ttft["least_load"] < 0.5 * ttft["round_robin"], ttft
    assert ttft["cache_aware"] < 0.5 * ttft["round_robin"], ttft
    assert ttft["power_of_two"] < 0.5 * ttft["round_robin"], ttft


def test_cache_aware_keeps_conversations_together_for_prefix_hits_and_ttft():
    trace = conversations_trace()
    rr, ca = run(trace, "round_robin").summary(), run(trace, "cache_aware").summary()
    assert ca["prefix_hit_rate"] > 2 * rr["prefix_hit_rate"], (ca, rr)
    assert ca["ttft_mean_s"] < rr["ttft_mean_s"]


@pytest.mark.parametrize(
    "name", ["fcfs", "round_robin", "random", "least_load", "power_of_two", "cache_aware", "bucket"]
)
def test_every_routing_policy_serves_every_request_once_and_seeded_runs_repeat(name):
    trace = random_trace(2, n=150)
    a, b = run(trace, name), run(trace, name)
    assert a.summary()["n_completed"] == 150
    np.testing.assert_array_equal(a.columns.instance, b.columns.instance)
    assert len(set(a.columns.instance.tolist())) > 1  # it spreads over the instances
