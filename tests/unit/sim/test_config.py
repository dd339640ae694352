"""Engine limits, cluster roles and pools: defaults, overrides, and errors naming the field."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from scheduler.cost_model import CostModel, sglang_defaults
from sim.cluster import Cluster, cluster_roles, parse_pd
from sim.limits import EngineLimits, resolve_limits
from tests.unit.sim.fakes import AffineCost, make_limits
from traces.errors import ConfigError

DEFAULTS = SimpleNamespace(
    max_running_requests=2048,
    max_prefill_tokens=16384,
    chunked_prefill_size=8192,
    mem_fraction_static=0.9,
    max_total_tokens=500_000,
    cuda_graph_max_bs=256,
)


def test_limits_default_to_sglang_and_take_overrides():
    cost = AffineCost(kv_capacity_tokens=123_456)
    limits = resolve_limits(cost, DEFAULTS, max_prefill_tokens=4096, chunked_prefill_size=None)
    assert (limits.max_prefill_tokens, limits.chunked_prefill_size) == (4096, 8192)
    assert limits.step_budget_tokens == 4096 and limits.chunking
    assert limits.max_total_tokens == 500_000
    # A memory fraction recomputes the KV capacity unless it is given too.
    assert resolve_limits(cost, DEFAULTS, mem_fraction_static=0.5).max_total_tokens == 123_456
    both = resolve_limits(cost, DEFAULTS, mem_fraction_static=0.5, max_total_tokens=7)
    assert both.max_total_tokens == 7


def test_limits_from_the_real_cost_model_and_sglang_defaults():
    cost = CostModel.from_names("qwen2.5-32b", "h200")
    limits = resolve_limits(cost, sglang_defaults("qwen2.5-32b", "h200"))
    assert limits.max_total_tokens > 100_000
    assert not limits.mixed_chunk and limits.chunked_prefill_size > 0


def test_bad_limits_name_the_field():
    with pytest.raises(ConfigError, match="max_total_tokens: expected an integer >= 1"):
        EngineLimits(
            max_running_requests=1, max_prefill_tokens=1, chunked_prefill_size=0, max_total_tokens=0
        )
    with pytest.raises(ConfigError, match="unknown engine limit"):
        resolve_limits(AffineCost(), DEFAULTS, max_batch=4)
    assert not make_limits(chunked_prefill_size=-1).chunking
    assert make_limits(chunked_prefill_size=0, max_prefill_tokens=999).step_budget_tokens == 999


def test_roles_from_instances_or_a_pd_split():
    assert cluster_roles(3) == ("mixed",) * 3
    assert cluster_roles(0, "1:2") == ("prefill", "decode", "decode")
    assert cluster_roles(3, "2:1") == ("prefill", "prefill", "decode")
    assert parse_pd("3:5") == (3, 5)
    with pytest.raises(ConfigError, match="--pd 1:1 needs 2 instances; got 4"):
        cluster_roles(4, "1:1")
    for bad in ("1", "a:b", "0:2", "1:2:3"):
        with pytest.raises(ConfigError, match="pd: expected P:D"):
            parse_pd(bad)
    with pytest.raises(ConfigError, match="instances: expected an integer >= 1"):
        cluster_roles(0)


def test_pools_and_views():
    cluster = Cluster(
        AffineCost(),
        make_limits(),
        ("mixed",) * 4,
        lambda: 0.0,
        pools={"short": (0, 1), "long": (2, 3)},
    )
    view = cluster.view
    assert [v.instance_id for v in view.pool("short")] == [0, 1]
    assert [v.instance_id for v in view.pool("entry")] == [0, 1, 2, 3]
    assert view.pool("decode") == ()
    assert set(view.pool_names) >= {"entry", "all", "mixed", "short", "long"}
    with pytest.raises(ValueError, match="unknown pool 'tiny'; known pools: entry"):
        view.pool("tiny")
    inst = view.instance(2)
    assert (inst.role, inst.n_waiting, inst.kv_used_tokens, inst.kv_capacity_tokens) == (
        "mixed",
        0,
        0,
        200_000,
    )
    with pytest.raises(ConfigError, match="'entry' is a built-in pool"):
        Cluster(
            AffineCost(),
            make_limits(),
            ("mixed",),
            lambda: 0.0,
            pools={"entry": (0,)},
        )
    with pytest.raises(ConfigError, match="names unknown instances"):
        Cluster(
            AffineCost(),
            make_limits(),
            ("mixed",),
            lambda: 0.0,
            pools={"big": (0, 5)},
        )
    with pytest.raises(ConfigError, match="PD needs prefill and decode instances"):
        Cluster(AffineCost(), make_limits(), ("prefill", "mixed"), lambda: 0.0)
