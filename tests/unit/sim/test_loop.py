"""The simpy driver: fast-path exactness, queueing theory, determinism, policy contract."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler.policy import NO_DECISIONS, Decisions, Policy
from scheduler.registry import create
from sim.loop import Simulation, simulate
from tests.unit.sim.fakes import AffineCost, HoldingPolicy, make_limits, make_trace, random_trace

COST = AffineCost(prefill_attn_s=1e-9)
TIME_COLUMNS = ("dispatch_s", "prefill_start_s", "first_token_s", "finish_s", "first_decode_s")


def both_ways(trace, policy_factory, limits, **options):
    return [
        simulate(trace, COST, policy_factory(), limits, fast_forward=ff, debug=True, **options)
        for ff in (True, False)
    ]


def assert_same_times(fast, slow):
    for name in TIME_COLUMNS:
        a, b = getattr(fast.columns, name), getattr(slow.columns, name)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=name)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9, err_msg=name)
    for name in ("cached_tokens", "n_preemptions", "instance", "decode_instance", "outcome"):
        np.testing.assert_array_equal(getattr(fast.columns, name), getattr(slow.columns, name))
    assert fast.itl.count == slow.itl.count
    assert fast.itl.mean == pytest.approx(slow.itl.mean, rel=1e-9)
    assert fast.tokens_out == slow.tokens_out


# Each case exercises chunked prefill (budget 512 or 2048); the small KV
# cases preempt, the block_tokens cases hit the prefix cache.
CASES = {
    "chunked-preempt-prefix": dict(limits=dict(max_total_tokens=12000, chunked_prefill_size=512)),
    "no-chunking-preempt": dict(limits=dict(max_total_tokens=12000, chunked_prefill_size=0)),
    "mixed-chunk": dict(limits=dict(max_total_tokens=12000, mixed_chunk=True)),
    "pd-preempt-prefix": dict(limits=dict(max_total_tokens=12000), pd="2:2"),
    "pd-mixed": dict(limits=dict(max_total_tokens=30000, mixed_chunk=True), pd="1:2"),
    "two-instances": dict(limits=dict(max_total_tokens=60000), instances=2),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_fast_forward_gives_the_same_times_as_stepping(case, seed):
    spec = CASES[case]
    limits = make_limits(max_running_requests=24, **spec["limits"])
    options = {k: v for k, v in spec.items() if k != "limits"}
    fast, slow = both_ways(random_trace(seed), lambda: create("fcfs"), limits, **options)
    assert_same_times(fast, slow)
    s = fast.summary()
    assert s["n_completed"] == 200
    if "preempt" in case:
        assert s["n_preemptions"] > 0
    if "prefix" in case:
        assert s["prefix_hit_rate"] > 0.05


@pytest.mark.parametrize("pd", [None, "1:1"])
def test_fast_forward_is_exact_under_a_policy_that_holds_wakes_and_reads_views(pd):
    limits = make_limits(max_running_requests=16, max_total_tokens=15000, chunked_prefill_size=512)
    fast, slow = both_ways(random_trace(3), lambda: HoldingPolicy(0.03), limits, instances=2, pd=pd)
    assert_same_times(fast, slow)
    c = fast.columns
    assert np.all(c.dispatch_s > fast.arrival_s)  # every request was held a while
    assert fast.summary()["n_completed"] == 200


def test_mdl_waiting_time_matches_pollaczek_khinchine_and_the_lindley_recursion():
    service_s = 0.1
    cost = AffineCost(prefill_base_s=service_s, prefill_per_token_s=0.0)
    limits = make_limits(max_running_requests=1)
    for rho, n in ((0.5, 60_000), (0.8, 150_000)):
        rng = np.random.default_rng(7)
        arrival = np.cumsum(rng.exponential(service_s / rho, n))
        trace = make_trace(arrival, np.full(n, 16), np.ones(n, dtype=int))
        res = simulate(trace, cost, create("fcfs"), limits)
        wait = res.columns.prefill_start_s - arrival
        # Pollaczek-Khinchine for M/D/1: W = rho * S / (2 (1 - rho)).
        theory = rho * service_s / (2 * (1 - rho))
        assert wait.mean() == pytest.approx(theory, rel=0.05)
        # Sample path check: Lindley's recursion on the same arrivals.
        expected = np.empty(n)
        w = 0.0
        gaps = np.diff(arrival, prepend=arrival[0]).tolist()
        for i in range(n):
            w = max(0.0, w + (service_s if i else 0.0) - gaps[i])
            expected[i] = w
        np.testing.assert_allclose(wait, expected, atol=1e-6)
        # Little's law on the queue timeline: time-average queue = rate * wait.
        q = res.queue_frame()
        t, waiting = q["time_s"].to_numpy(), q["waiting"].to_numpy()
        area = float(np.sum(waiting[:-1] * np.diff(t)))
        horizon = t[-1] - arrival[0]
        assert area / horizon == pytest.approx(n / horizon * wait.mean(), rel=0.01)


def test_same_inputs_give_identical_results():
    limits = make_limits(max_total_tokens=12000, chunked_prefill_size=512)
    runs = [
        simulate(random_trace(5), COST, create("round_robin"), limits, instances=3)
        for _ in range(2)
    ]
    a, b = runs
    pd_a, pd_b = a.frame(), b.frame()
    assert pd_a.equals(pd_b)
    assert a.queue_frame().equals(b.queue_frame())
    assert a.summary() == b.summary()


def test_round_robin_spreads_requests_and_fcfs_picks_the_least_loaded():
    limits = make_limits()
    rr = simulate(random_trace(2, n=60), COST, create("round_robin"), limits, instances=3)
    assert list(rr.columns.instance[:6]) == [0, 1, 2, 0, 1, 2]
    # Three long requests occupy instances 0-2; the fourth (tie on counts)
    # goes to the one with the fewest in-flight tokens; the fifth arrives
    # after instance 1 emptied.
    trace = make_trace(
        [0.0, 0.001, 0.002, 0.003, 0.5], [900, 500, 700, 10, 10], [400, 1, 400, 1, 1]
    )
    fcfs = simulate(trace, COST, create("fcfs"), limits, instances=3)
    assert list(fcfs.columns.instance) == [0, 1, 2, 1, 1]


class _Hoarder(Policy):
    name = "hoarder"

    def on_arrival(self, request, now_s, view):
        return NO_DECISIONS


class _ToDecode(Policy):
    name = "to_decode"

    def on_arrival(self, request, now_s, view):
        return Decisions.dispatch(request, view.pool("decode")[0].instance_id)


class _Twice(Policy):
    name = "twice"

    def on_arrival(self, request, now_s, view):
        return Decisions(((request, 0), (request, 0)))


def test_policy_contract_violations_are_reported():
    trace = make_trace([0.0, 1.0], [10, 10], [2, 2])
    limits = make_limits()
    with pytest.raises(RuntimeError, match="never dispatched 2 request"):
        simulate(trace, COST, _Hoarder(), limits)
    with pytest.raises(RuntimeError, match="does not take new requests"):
        simulate(trace, COST, _ToDecode(), limits, pd="1:1")
    with pytest.raises(RuntimeError, match="not an undispatched request"):
        simulate(trace, COST, _Twice(), limits)


def test_a_simulation_runs_once():
    sim = Simulation(make_trace([0.0], [10], [2]), COST, create("fcfs"), make_limits())
    sim.run()
    with pytest.raises(RuntimeError, match="runs once"):
        sim.run()


def test_progress_is_reported_up_to_the_number_of_requests():
    seen: list[int] = []
    simulate(
        random_trace(1, n=50),
        COST,
        create("fcfs"),
        make_limits(),
        progress=seen.append,
        progress_every=10,
    )
    assert seen == [0, 10, 20, 30, 40, 50]


class _ByLength(Policy):
    """Short prompts to the "short" pool, long ones to "long" (what LAPS-style routing does)."""

    name = "by_length"

    def on_arrival(self, request, now_s, view):
        return Decisions.dispatch(request, "short" if request.prompt_tokens < 1000 else "long")


def test_dispatch_to_a_named_pool_picks_the_least_loaded_instance_in_it():
    trace = random_trace(4, n=80)
    res = simulate(
        trace,
        COST,
        _ByLength(),
        make_limits(),
        instances=4,
        pools={"short": (0, 1), "long": (2, 3)},
    )
    short = res.prompt_tokens < 1000
    assert set(res.columns.instance[short]) == {0, 1}
    assert set(res.columns.instance[~short]) == {2, 3}
    with pytest.raises(ValueError, match=r"unknown pool '(short|long)'; known pools: entry"):
        simulate(trace, COST, _ByLength(), make_limits(), instances=4)
