"""The Ray executor gives the local executor's results for the same scenario and seeds.

Starts a private Ray instance on loopback (2 CPUs, no dashboard) and stops it.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from sim.scenario import parse_scenario
from sim.sweep import RAY_LOOPBACK_ENV, LocalExecutor, RayExecutor, points_of, run_sweep
from traces.loaders import save
from traces.trace import Trace

os.environ.setdefault(*RAY_LOOPBACK_ENV)  # before Ray is imported: loopback addresses only
ray = pytest.importorskip("ray", reason="ray is in the dev extra (llmsched[ray])")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    try:
        yield
    finally:
        ray.shutdown()


def test_ray_and_local_executors_write_identical_summaries(tmp_path, local_ray):
    n = 100
    frame = pd.DataFrame(
        {
            "arrival_s": np.arange(n) * 0.2,
            "prompt_tokens": [90 + 173 * (i % 11) for i in range(n)],
            "output_tokens": [12 + (i % 9) for i in range(n)],
        }
    )
    save(Trace(frame, name="t"), tmp_path / "t.parquet")
    scenario = parse_scenario(
        {
            "loads": [1.0, 2.5],
            "seeds": [0, 1],
            "trace": {"path": str(tmp_path / "t.parquet")},
            "cluster": {"model": "llama-3.1-8b", "gpu": "h100", "instances": 3},
            "slo": {"ttft_ms": 120, "tpot_ms": 40},
            "policies": [{"name": "random"}, {"name": "least_load"}],
        }
    )
    local = run_sweep(scenario, tmp_path / "local", LocalExecutor(1))
    remote = run_sweep(scenario, tmp_path / "ray", RayExecutor())
    assert local.ran == remote.ran == 8
    placements = set()
    for point in points_of(scenario):
        a, b = (
            json.loads((tmp_path / d / "points" / point.id / "summary.json").read_text())
            for d in ("local", "ray")
        )
        for timing in ("wall_s", "cpu_s"):
            a["config"].pop(timing), b["config"].pop(timing)
        assert a == b, point.id
        results = pd.read_parquet(tmp_path / "ray" / "points" / point.id / "results.parquet")
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "local" / "points" / point.id / "results.parquet"), results
        )
        if point.spec.policy.name == "random":
            placements.add((point.spec.seed, tuple(results["instance"])))
    # The seed reached the random policy: each seed placed requests its own way.
    assert len({p for s, p in placements}) == 2
