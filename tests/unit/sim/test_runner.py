"""One run spec, one simulation: load scaling, seeds, PD pairing and what the policy is given."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

import sim.runner as runner
from scheduler.registry import create
from sim.runner import build_policy, load_workload, prepare, run
from sim.scenario import parse_run
from traces.errors import ConfigError
from traces.loaders import save
from traces.trace import Trace


@pytest.fixture
def trace_file(tmp_path):
    n = 40
    frame = pd.DataFrame(
        {
            "arrival_s": np.arange(n) * 0.5,
            "prompt_tokens": [200 + 37 * (i % 9) for i in range(n)],
            "output_tokens": [20 + (i % 5) for i in range(n)],
        }
    )
    path = tmp_path / "t.parquet"
    save(Trace(frame, name="t"), path)
    return path


def spec(trace_file, **overrides):
    data = {
        "trace": {"path": str(trace_file)},
        "cluster": {"model": "llama-3.1-8b", "gpu": "h100", "instances": 3},
        "policy": {"name": "fcfs"},
    }
    data.update(overrides)
    return parse_run(data)


def test_load_multiplies_the_arrival_rate(trace_file):
    base = prepare(spec(trace_file))
    double = prepare(spec(trace_file, load=2.0))
    assert np.allclose(double.trace.arrival_s, base.trace.arrival_s / 2)
    assert double.config()["offered_rps"] == pytest.approx(2 * base.config()["offered_rps"])
    assert double.config()["load"] == 2.0


def test_transforms_apply_before_the_load(trace_file):
    prepared = prepare(
        spec(
            trace_file,
            load=4.0,
            trace={"path": str(trace_file), "transforms": {"max_requests": 10}},
        )
    )
    assert len(prepared.trace) == 10
    assert prepared.trace.arrival_s[-1] == pytest.approx(9 * 0.5 / 4)


def test_the_run_seed_seeds_random_policies_unless_the_params_fix_it(trace_file):
    def placements(**kw):
        return run(spec(trace_file, **kw)).columns.instance.tolist()

    rnd = {"name": "random"}
    assert placements(policy=rnd, seed=1) == placements(policy=rnd, seed=1)
    assert placements(policy=rnd, seed=1) != placements(policy=rnd, seed=2)
    fixed = {"name": "random", "params": {"seed": 5}}
    assert placements(policy=fixed, seed=1) == placements(policy=fixed, seed=2)
    config = prepare(spec(trace_file, policy=rnd, seed=9)).config()
    assert config["policy_params"] == {"seed": 9}


def test_pd_pairs_the_prefill_policy_with_the_decode_policy(trace_file):
    cluster = {"model": "llama-3.1-8b", "gpu": "h100", "pd": "1:3"}
    policy = {"name": "fcfs", "decode": "round_robin"}
    result = run(spec(trace_file, cluster=cluster, policy=policy))
    decode = result.columns.decode_instance[:6].tolist()
    assert decode == [1, 2, 3, 1, 2, 3]
    assert result.policy == "fcfs+round_robin"


@pytest.mark.parametrize("choice", ["handoff", "dispatch"])
def test_the_pd_pair_chooses_decode_instances_when_the_scenario_says(trace_file, choice):
    cluster = {"model": "llama-3.1-8b", "gpu": "h100", "pd": "1:3"}
    policy = {"name": "fcfs", "decode": "least_load", "decode_choice": choice}
    prepared = prepare(spec(trace_file, cluster=cluster, policy=policy))
    assert prepared.policy.decode_choice == choice
    assert prepared.config()["decode_choice"] == choice
    result = prepared.run()
    assert (result.columns.outcome == 1).all()
    with pytest.raises(ConfigError, match="decode_choice"):
        spec(trace_file, cluster=cluster, policy={**policy, "decode_choice": "later"})


def test_an_unknown_policy_fails_with_the_known_ones(trace_file):
    with pytest.raises(ConfigError, match=r"unknown policy 'lifo'; known policies: .*fcfs"):
        prepare(spec(trace_file, policy={"name": "lifo"}))


def test_generated_traces_follow_the_seed_unless_fixed():
    gen = {"generator": {"preset": "api", "params": {"n_requests": 30}}}
    a = load_workload(parse_run({"trace": gen, "policy": {"name": "fcfs"}}).trace, seed=1)
    b = load_workload(parse_run({"trace": gen, "policy": {"name": "fcfs"}}).trace, seed=2)
    assert len(a) == len(b) == 30 and not a.equals(b)
    fixed = {"generator": {"preset": "api", "params": {"n_requests": 30, "seed": 4}}}
    trace = parse_run({"trace": fixed, "policy": {"name": "fcfs"}}).trace
    assert load_workload(trace, seed=1).equals(load_workload(trace, seed=2))


def test_a_policy_with_a_cost_model_hook_gets_the_clusters(monkeypatch, trace_file):
    seen = []

    def fake_create(name, **params):
        policy = create(name, **params)
        policy.use_cost_model = seen.append
        return policy

    monkeypatch.setattr(runner, "create", fake_create)
    prepared = prepare(spec(trace_file))
    assert seen == [prepared.cost]
    seen.clear()
    build_policy(spec(trace_file).policy)  # no cost model given: nothing handed over
    assert seen == []


def test_unknown_policy_reads_the_same_from_the_runner_and_the_registry(trace_file):
    from scheduler import registry

    with pytest.raises(ConfigError) as from_registry:
        registry.create("lifo")
    with pytest.raises(ConfigError) as from_runner:
        build_policy(spec(trace_file, policy={"name": "lifo"}).policy)
    assert str(from_runner.value) == str(from_registry.value)
    assert str(from_registry.value).startswith("unknown policy 'lifo'; known policies: ")
    assert all(name in str(from_registry.value) for name in registry.names())


def test_only_a_policy_that_can_choose_decode_instances_is_taken_for_decode(trace_file):
    from scheduler import registry
    from sim.scenario import ScenarioError

    routing = registry.routing_names()
    assert "round_robin" in routing and "laps" not in routing
    assert not registry.can_choose_decode("laps") and registry.can_choose_decode("least_load")
    expected = (
        "decode policy 'laps' cannot choose decode instances; "
        f"routing policies: {', '.join(routing)}"
    )
    with pytest.raises(ConfigError, match=re.escape(expected)):
        registry.create_pd("fcfs", "laps")
    # The scenario check gives the same answer, before anything is built.
    with pytest.raises(ScenarioError, match=re.escape(expected)):
        spec(trace_file, cluster={"pd": "1:2"}, policy={"name": "fcfs", "decode": "laps"})


def test_simulator_options_reach_the_simulation_and_the_runs_config(trace_file, monkeypatch):
    seen = {}

    class Recording(runner.Simulation):
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(runner, "Simulation", Recording)
    default = prepare(spec(trace_file))
    assert {k: default.config()[k] for k in runner.SIMULATION_OPTIONS} == {
        "prefix_knowledge": "estimate",
        "poll_interval_ms": 0.0,
        "batch_hints": "graph",
    }
    cluster = {
        "model": "llama-3.1-8b",
        "gpu": "h100",
        "instances": 2,
        "prefix_knowledge": "oracle",
        "poll_interval_ms": 25,
        "batch_hints": "group",
    }
    chosen = prepare(spec(trace_file, cluster=cluster))
    config = chosen.config()
    assert (config["prefix_knowledge"], config["poll_interval_ms"], config["batch_hints"]) == (
        "oracle",
        25.0,
        "group",
    )
    chosen.run()
    # The simulator takes the interval in seconds.
    assert seen["prefix_knowledge"] == "oracle" and seen["batch_hints"] == "group"
    assert seen["poll_interval_s"] == pytest.approx(0.025)


def test_every_engine_limit_is_a_scenario_key_the_runner_applies(trace_file):
    import dataclasses

    from sim.limits import LIMIT_OPTIONS

    sglang = {
        "max_running_requests": 7,
        "max_prefill_tokens": 3000,
        "chunked_prefill_size": 1024,
        "max_total_tokens": 50_000,
        "cuda_graph_max_bs": 12,
        "enable_mixed_chunk": True,
        "page_size": 64,
    }
    vllm = {
        "max_num_seqs": 9,
        "max_num_batched_tokens": 512,
        "long_prefill_token_threshold": 128,
        "num_gpu_blocks_override": 1000,
        "block_size": 32,
        "max_cudagraph_capture_size": 4,
    }
    # The table and the scenarios stay in step: every row is set here, by its engine.
    inputs = {"mem_fraction_static", "gpu_memory_utilization"}
    assert {o.key for o in LIMIT_OPTIONS} - inputs == set(sglang) | set(vllm)

    def limits(engine, given):
        cluster = {"model": "llama-3.1-8b", "gpu": "h100", "engine": engine, "limits": given}
        return dataclasses.asdict(prepare(spec(trace_file, cluster=cluster)).limits)

    assert limits("sglang", sglang) == {
        "max_running_requests": 7,
        "max_prefill_tokens": 3000,
        "chunked_prefill_size": 1024,
        "max_total_tokens": 49_984,  # whole pages of 64
        "cuda_graph_max_bs": 12,
        "mixed_chunk": True,
        "engine": "sglang",
        "block_tokens": 64,
        "long_prefill_token_threshold": 0,
    }
    assert limits("vllm", vllm) == {
        "max_running_requests": 9,
        "max_prefill_tokens": 512,
        "chunked_prefill_size": 512,
        "max_total_tokens": 32_000,
        "cuda_graph_max_bs": 4,
        "mixed_chunk": True,
        "engine": "vllm",
        "block_tokens": 32,
        "long_prefill_token_threshold": 128,
    }
