"""A profile's per-request overhead delays each request before the engine, once, at any load."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from scheduler.cost_model import CostModel
from scheduler.profile import CoefficientsModel, Profile, save_profile
from sim.loop import Simulation
from sim.runner import build_engine, build_policy
from sim.specs import ClusterSpec, PolicySpec
from traces import Request
from traces.trace import Trace


def _profile(path, overhead_s: float) -> str:
    base = CostModel.from_names("llama-3.1-8b", "h100").coefficients
    coefficients = dataclasses.replace(base, request_overhead_s=overhead_s)
    save_profile(
        Profile(
            model="Llama-3.1-8B",
            gpu="H100-SXM",
            tp=1,
            coefficients=CoefficientsModel(**dataclasses.asdict(coefficients)),
        ),
        path,
    )
    return str(path)


def _simulate(profile: str | None, gap_s: float, n: int = 20) -> Simulation:
    cluster = ClusterSpec(model="llama-3.1-8b", gpu="h100", profile=profile)
    cost, limits = build_engine(cluster)
    reqs = [Request(i, i * gap_s, 512 + 64 * (i % 5), 16) for i in range(n)]
    return Simulation(
        Trace.from_requests(reqs), cost, build_policy(PolicySpec(name="fcfs")), limits
    ).run()


def test_overhead_of_x_ms_shifts_ttft_by_x_ms_at_low_load(tmp_path) -> None:
    plain = _simulate(_profile(tmp_path / "none.json", 0.0), gap_s=1.0)
    slowed = _simulate(_profile(tmp_path / "x.json", 0.008), gap_s=1.0)
    shift = np.asarray(slowed.ttft_s) - np.asarray(plain.ttft_s)
    assert shift == pytest.approx(np.full(len(shift), 0.008), abs=1e-9)
    e2e = np.asarray(slowed.e2e_s) - np.asarray(plain.e2e_s)
    assert e2e == pytest.approx(np.full(len(e2e), 0.008), abs=1e-9)


def test_overhead_is_per_request_not_per_step() -> None:
    """Sixteen output tokens take sixteen steps; the overhead is paid once, not sixteen times."""
    cost = CostModel.from_names("llama-3.1-8b", "h100")
    k = dataclasses.replace(cost.coefficients, request_overhead_s=0.05)
    slowed = CostModel(cost.model, cost.gpu, coefficients=k)
    assert slowed.decode_time_s(4, 4096) == cost.decode_time_s(4, 4096)
    assert slowed.prefill_time_s([512], [0]) == cost.prefill_time_s([512], [0])
    assert slowed.request_overhead_s == 0.05
