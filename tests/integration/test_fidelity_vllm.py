"""The simulator against the real vLLM V1 engine on this CPU: calibrate, replay, simulate, compare.

The real server of :mod:`tests.integration.real_vllm` (a random-weight
4-layer Llama, 16 sequences, a 4,096-token step budget, KV blocks of 128,
its worker on a core of its own) is calibrated from the client side
(:func:`tests.integration.fidelity_support.calibrate_real`), then 80
requests of a Poisson-like window of the bundled Azure code trace, prompts
capped at 512 tokens, at 0.6 of what the calibrated server serves
(:func:`~tests.integration.fidelity_support.real_loads`), are replayed
against it and simulated with vLLM's engine model, the profile and the
server's limits (:func:`sim.fidelity.fidelity`): directly, and through
``llmsched router`` with ``fcfs`` and with ``laps``.

Asserted, in every direct and router run: no request fails, the replay client
kept to its schedule (send lag p99 under 100 ms), and live and simulated
throughput agree within 10%. Directly (three runs, fresh prompts each),
TTFT p50 and p90 and E2E p50 within 50% of the simulation at the median of
the runs (:data:`GUARD`; each run is printed against the 25% goal,
:data:`BOUND`). Through the router, its own ``/metrics`` agree with
vLLM's ``/metrics`` on the requests and the prompt and generation tokens of
the run; the router runs' latencies are printed against the bound (the
router's own hold is part of them, which the one-instance simulation of
``fcfs`` does not have). A heavier load near saturation (0.9 of capacity)
is then replayed twice directly and printed with the simulation's band
(step costs scaled by the calibration's rms error) beside the real
engine's spread from one run to the next; it is not held to a bound. All
of it, the server's start included, takes about 3 minutes here.

Measured on a 2-core AMD EPYC with bf16 instructions, nothing else
running, fresh prompts each run (``bench/bench_fidelity.py`` and this test,
alone and in the whole suite, 21 direct runs on seven server starts): the
simulation's TTFT p50 was +1% to -26% off the real engine's, p90 +10% to
-48%, E2E p50 +21% to -39%, throughput within 1%, while the real engine
moved 24-31% between runs of the same requests. Before the engine core was
given a lower priority, in the caller's scheduling group
(:func:`tests.integration.real_vllm.yield_engine_core`), the client starved
beside it and TTFT read 50-80% off.

The real server is started once for the module and stopped at its end
(its engine spins on a core while it lives); every figure is printed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from scheduler.profile import Profile
from sim.fidelity import FidelityResult
from tests.integration import real_vllm
from tests.integration.fidelity_support import (
    REAL_TRANSFORMS,
    SERVED,
    calibrate_real,
    real_loads,
    replay_real,
)
from tests.integration.router_support import procs_in, start_router

#: What each run is printed against: the error this set-up is meant to stay within.
BOUND = 0.25
#: What the direct runs are held to, at the median of three. On the 2-core AMD EPYC
#: the 25% above is missed: in 21 direct runs of one day the simulation's TTFT p90 was
#: +10% to -48% off the real engine's, E2E p50 +21% to -39%, TTFT p50 +1% to -26% (README,
#: "Fidelity against a real engine"), the simulation always the faster near the tail.
#: Twice the goal still fails a client starving beside the engine (50-80% off) or a
#: cost model off by a factor.
GUARD = 0.5
#: The most the replay client's send lag may reach at its 99th percentile (wall seconds).
CLIENT_LAG_P99_S = 0.1
HELD = ("ttft_p50_s", "ttft_p90_s", "e2e_p50_s")


@dataclass
class Server:
    url: str
    profile: Path
    fit: Profile
    limits: dict
    work: Path
    started_s: float
    #: Arrival-rate multipliers of the moderate and the near-saturation runs.
    moderate: float
    heavy: float


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    started = time.monotonic()
    work = tmp_path_factory.mktemp("fidelity-vllm")
    try:
        cm = real_vllm.real_vllm_server(SERVED, work / "vllm-server.log")
        url = cm.__enter__()
    except (real_vllm.RealVllmError, OSError) as exc:
        pytest.fail(f"real vLLM set-up failed: {exc}", pytrace=False)
    try:
        up = time.monotonic()
        profile = work / "profile.json"
        fit, limits = calibrate_real(url, real_vllm.model_dir(), profile, real_vllm.VLLM_VERSION)
        moderate, heavy = real_loads(profile, limits, real_vllm.model_dir())
        print(
            f"\nreal vLLM up in {up - started:.0f} s, calibrated in {time.monotonic() - up:.0f} s; "
            f"fit: {', '.join(f'{k} rms {q.rms_rel_error:.1%}' for k, q in fit.fit.items())}; "
            f"loads {moderate:.3g} and {heavy:.3g}"
        )
        yield Server(url, profile, fit, limits, work, started, moderate, heavy)
    finally:
        cm.__exit__(None, None, None)
        print(f"\nreal vLLM fidelity: {time.monotonic() - started:.0f} s in all, set-up included")


def _run(s: Server, target: str, name: str, load: float, seed: int, band: float | None = None):
    t0 = time.monotonic()
    result = replay_real(
        target,
        s.profile,
        s.work / name,
        s.limits,
        model_dir=real_vllm.model_dir(),
        load=load,
        seed=seed,
        band=band,
    )
    lag = result.send_lag
    print(
        f"\n{name} (load {load:g}, {time.monotonic() - t0:.0f} s; client send lag p50 "
        f"{lag['lag_p50_s'] * 1e3:.1f} ms, p99 {lag['lag_p99_s'] * 1e3:.1f} ms, max "
        f"{lag['lag_max_s'] * 1e3:.1f} ms):\n{result.markdown()}"
    )
    return result


def _assert_served(result: FidelityResult, name: str) -> None:
    """Every request served, at the simulated throughput; latency errors printed against the bound."""
    assert result.n_errors == 0, f"{name}: {result.n_errors} requests did not complete"
    # A client that falls behind its schedule adds its own delay to every live TTFT (with
    # vLLM's engine core spinning on the client's core it sent requests up to 8 s late).
    assert result.send_lag["lag_p99_s"] < CLIENT_LAG_P99_S, (
        f"{name}: {result.lag_warning}; the live figures are not the server's"
    )
    thr = result.error("throughput_rps")
    assert abs(thr) <= 0.10, (
        f"{name}: throughput {thr:+.1%} off the simulation\n{result.markdown()}"
    )
    missed = {k: result.error(k) for k in HELD if not abs(result.error(k)) <= BOUND}
    print(
        f"{name}: beyond the {BOUND:.0%} goal: "
        + (", ".join(f"{k} {e:+.1%}" for k, e in missed.items()) or "none")
    )


def _counts(url: str, names: dict[str, tuple[str, dict]]) -> dict[str, float]:
    """Sums of the samples named, each with the labels given, from a ``/metrics`` scrape."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for key, (name, labels) in names.items():
                if sample.name == name and labels.items() <= sample.labels.items():
                    out[key] += sample.value
    return out


VLLM_COUNTS = {
    "requests": ("vllm:request_success_total", {}),
    "prompt_tokens": ("vllm:prompt_tokens_total", {}),
    "generation_tokens": ("vllm:generation_tokens_total", {}),
}
ROUTER_COUNTS = {
    "requests": ("llmsched_router_requests_total", {"status": "200"}),
    "prompt_tokens": ("llmsched_router_tokens_total", {"kind": "prompt"}),
    "generation_tokens": ("llmsched_router_tokens_total", {"kind": "generation"}),
}


#: Direct runs are held to the guard on TTFT p50 and p90 and E2E p50 at the median of
#: three: the real engine moves 24-31% from one run of the same requests to the next
#: (README, "Fidelity against a real engine"), so one run alone strays from the engine's
#: own spread, and the median still fails a simulation gone wrong.
DIRECT_RUNS = 3


def test_direct_replay_serves_every_request_at_the_simulated_latency(server: Server) -> None:
    results = []
    for k in range(DIRECT_RUNS):
        name = f"direct-{k + 1}"
        result = _run(server, server.url, name, server.moderate, seed=100 + k)
        _assert_served(result, name)
        results.append(result)
    for key in HELD:
        errors = sorted(r.error(key) for r in results)
        median = statistics.median(errors)
        assert abs(median) <= GUARD, (
            f"direct: {key} {median:+.1%} off the simulation at the median of "
            f"{', '.join(f'{e:+.1%}' for e in errors)}\n"
            + "\n\n".join(r.markdown() for r in results)
        )


@pytest.mark.parametrize("policy", ["fcfs", "laps"])
def test_through_the_router_every_request_is_served_and_its_metrics_agree_with_vllms(
    server: Server, policy: str
) -> None:
    with procs_in(server.work) as procs:
        router, _ = start_router(
            procs, ["--backend", server.url, "--protocol", "vllm", "--policy", policy]
        )
        before = _counts(server.url, VLLM_COUNTS)
        result = _run(
            server, router, f"router-{policy}", server.moderate, seed={"fcfs": 2, "laps": 3}[policy]
        )
        after = _counts(server.url, VLLM_COUNTS)
        routed = _counts(router, ROUTER_COUNTS)
    engine = {k: after[k] - before[k] for k in VLLM_COUNTS}
    assert routed == engine, f"router {policy}: router's counts {routed}, vLLM's {engine}"
    assert routed["requests"] == REAL_TRANSFORMS["max_requests"]
    _assert_served(result, f"router {policy}")


def test_near_saturation_the_band_and_the_engines_own_spread_are_reported(
    server: Server,
) -> None:
    band = max(q.rms_rel_error for q in server.fit.fit.values())
    first = _run(server, server.url, "heavy-1", server.heavy, seed=11, band=band)
    second = _run(server, server.url, "heavy-2", server.heavy, seed=12)
    lines = [f"near saturation (load {server.heavy:.3g}), band ±{band:.1%} of step cost:"]
    for key in HELD:
        row = first.table.set_index("metric").loc[key]
        a = row["live"]
        b = second.table.set_index("metric").loc[key, "live"]
        lines.append(
            f"  {row['name']}: real {a:,.0f} and {b:,.0f} ms (spread {abs(a - b) / min(a, b):.0%}), "
            f"simulated {row['simulated']:,.0f} ms, band {row['simulated_low']:,.0f}-"
            f"{row['simulated_high']:,.0f} ms"
        )
    print("\n" + "\n".join(lines))
    assert first.n_errors == second.n_errors == 0
    # The band is a range around the point prediction, widening with queueing.
    table = first.table.set_index("metric")
    for key in HELD:
        assert table.loc[key, "simulated_low"] <= table.loc[key, "simulated"]
        assert table.loc[key, "simulated"] <= table.loc[key, "simulated_high"]
