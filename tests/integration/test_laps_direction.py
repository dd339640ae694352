"""LAPS's experiments in the simulator (``examples/laps_experiments.py --quick``): the direction.

Asserts what the model shows robustly (see docs/laps.md for the figures and
the mechanism): on one prefill instance LAPS cuts mean and p90 TTFT and SLO
violations at the load where FCFS's p90 TTFT is 0.4 s, by less than the
paper's 20-30% in mean TTFT; on 8 instances it has at least 25% fewer SLO
violations than round robin and at least 10% fewer than least load; under
overload it keeps throughput and raises goodput.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "laps_experiments.py"


@pytest.fixture(scope="module")
def experiments():
    spec = importlib.util.spec_from_file_location("laps_experiments", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module.run_all(module.Setup.quick(), log=lambda *_: None)


def pick(out, experiment, load):
    return {r.policy: r for r in out["rows"] if r.experiment == experiment and r.load_rps == load}


def test_the_reference_loads_are_where_fcfs_p90_ttft_is_near_the_slo(experiments):
    out = experiments
    for scan in out["scans"].values():
        p90 = [row.ttft_p90_s for row in scan]
        assert min(p90) < 0.4 < max(p90)  # the scan brackets the SLO
    at_ref = pick(out, "1 PD 1P:3D", out["ref_pd"])["fcfs"]
    assert 0.3 < at_ref.ttft_p90_s < 0.55


def test_one_prefill_instance_laps_cuts_mean_and_p90_ttft_and_violations(experiments):
    out = experiments
    rows = pick(out, "1 PD 1P:3D", out["ref_pd"])
    laps, fcfs = rows["laps"], rows["fcfs"]
    assert laps.ttft_mean_s < 0.9 * fcfs.ttft_mean_s, (laps, fcfs)
    assert laps.ttft_p90_s < 0.9 * fcfs.ttft_p90_s, (laps, fcfs)
    assert laps.slo_violation < fcfs.slo_violation
    for factor in (0.85, 1.15):
        other = pick(out, "1 PD 1P:3D", round(out["ref_pd"] * factor, 2))
        assert other["laps"].ttft_mean_s < other["fcfs"].ttft_mean_s


def test_eight_instances_laps_has_fewer_slo_violations_than_round_robin_and_least_load(
    experiments,
):
    out = experiments
    rows = pick(out, "2 DP x8", out["ref_dp"])
    laps = rows["laps"].slo_violation
    assert laps <= 0.75 * rows["round_robin"].slo_violation, rows
    assert laps <= 0.90 * rows["least_load"].slo_violation, rows


def test_under_overload_laps_keeps_throughput_and_raises_goodput(experiments):
    out = experiments
    pd = pick(out, "3 high PD", round(out["ref_pd"] * 2.0, 2))
    assert pd["laps"].throughput_rps == pytest.approx(pd["fcfs"].throughput_rps, rel=0.03)
    assert pd["laps"].goodput_rps > 1.2 * pd["fcfs"].goodput_rps
    dp = pick(out, "3 high x8", round(out["ref_dp"] * 2.0, 1))
    # Measured 1.20x here (quick traces, one seed) and 1.31x in the full run at the same
    # 2x load; every laps variant (pending or queued backlog, long requests together or
    # one at a time) gave 1.20-1.27x, so 1.1x is the margin the direction holds by.
    assert dp["laps"].goodput_rps > 1.1 * dp["least_load"].goodput_rps
