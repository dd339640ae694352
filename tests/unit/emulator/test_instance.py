"""One emulated instance without HTTP: tokens arrive as the engine model says, on the asyncio clock."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from sim.emulator import EmulatorConfig, Rejected, build_instances
from sim.loop import Simulation
from sim.runner import build_engine, build_policy
from sim.specs import PolicySpec
from traces import Request
from traces.tokenizer import WordTokenizer
from traces.trace import Trace

CONFIG = EmulatorConfig(model="llama-3.1-8b", gpu="h100")


def _predicted_ttft_s(prompt_tokens: int) -> float:
    cost, limits = build_engine(CONFIG.cluster())
    trace = Trace.from_requests([Request(0, 0.0, prompt_tokens, 4)])
    sim = Simulation(trace, cost, build_policy(PolicySpec(name="fcfs")), limits)
    return float(sim.run().ttft_s[0])


async def test_every_token_arrives_and_the_first_when_the_simulator_says() -> None:
    inst = build_instances(CONFIG)[0]
    inst.start()
    tok = WordTokenizer()
    s = inst.submit(tok.ids_of_length(2048, seed=1), 5, "r1")
    counts = []
    while not s.done:
        counts.append(await asyncio.wait_for(s.wait(s.n_tokens), 5))
    assert s.n_tokens == 5 and counts[-1] == 5
    assert counts == sorted(counts)  # no token counted twice, none lost
    assert s.first_token_s - s.arrival_s == pytest.approx(_predicted_ttft_s(2048), rel=0.05)


async def test_repeated_prompt_hits_the_prefix_cache() -> None:
    inst = build_instances(EmulatorConfig(time_scale=20.0))[0]
    inst.start()
    ids = WordTokenizer().ids_of_length(300, seed=2)
    first = inst.submit(ids, 2, "a")
    await asyncio.wait_for(first.finished(), 5)
    again = inst.submit(ids, 2, "b")
    await asyncio.wait_for(again.finished(), 5)
    assert first.cached_tokens == 0
    assert again.cached_tokens >= 288  # every full 16-token block of the 300
    assert inst.cached_tokens_total == again.cached_tokens


def test_output_text_is_deterministic_for_a_seed_and_deltas_add_up() -> None:
    a, b = build_instances(EmulatorConfig(seed=3))[0], build_instances(EmulatorConfig(seed=3))[0]
    other = build_instances(EmulatorConfig(seed=4))[0]
    n = 2500  # past the end of the cycle of output ids
    assert a.output_text(0, n) == b.output_text(0, n)
    assert a.output_text(0, 50) != other.output_text(0, 50)
    assert a.output_text(0, 7) + a.output_text(7, n) == a.output_text(0, n)
    assert len(a.output_text(0, n).split()) == n  # built-in tokenizer: a token per word


async def test_a_request_that_can_never_fit_is_rejected() -> None:
    inst = build_instances(EmulatorConfig(limits={"max_total_tokens": 1000}))[0]
    inst.start()
    with pytest.raises(Rejected, match="KV cache"):
        inst.submit(list(range(900)), 200, "big")


async def test_loop_lag_is_measured() -> None:
    inst = build_instances(CONFIG)[0]
    inst.start()
    s = inst.submit(list(range(64)), 3, "x")
    await asyncio.wait_for(s.finished(), 5)
    assert 0.0 <= inst.loop_lag_s <= inst.max_loop_lag_s < 0.5


async def test_the_vllm_engine_serves_under_vllm_limits_and_blocks() -> None:
    config = EmulatorConfig(
        engine="vllm", time_scale=20.0, limits={"max_num_seqs": 4, "block_size": 32}
    )
    inst = build_instances(config)[0]
    assert (inst.limits.engine, inst.limits.max_running_requests) == ("vllm", 4)
    assert inst.limits.block_tokens == 32 and inst.limits.max_total_tokens % 32 == 0
    inst.start()
    ids = WordTokenizer().ids_of_length(300, seed=2)
    first = inst.submit(ids, 2, "a")
    await asyncio.wait_for(first.finished(), 5)
    again = inst.submit(ids, 2, "b")
    await asyncio.wait_for(again.finished(), 5)
    assert again.cached_tokens == 288  # whole 32-token engine blocks of the 16-token hits
    with pytest.raises(ValidationError, match="use max_num_seqs"):
        EmulatorConfig(engine="vllm", limits={"max_running_requests": 4}).cluster()
