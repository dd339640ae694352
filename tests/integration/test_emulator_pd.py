"""Emulated PD pairs on loopback: SGLang's bootstrap-room handshake and vLLM's kv_transfer_params."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from sim.emulator import EmulatorConfig, running_in_thread
from sim.emulator.server import EmulatorServer
from tests.loopback import free_port
from traces.tokenizer import WordTokenizer

MODEL = "llama-3.1-8b"
TOK = WordTokenizer()


def _pair(proto: str) -> Iterator[tuple[EmulatorServer, EmulatorServer]]:
    """A prefill and a decode emulator of ``proto``, ten times faster than the GPU."""
    common = {"protocol": proto, "model": MODEL, "time_scale": 10.0}
    pre = EmulatorConfig(**common, port=free_port(), role="prefill", bootstrap_port=free_port())
    dec = EmulatorConfig(**common, port=free_port(), role="decode")
    with running_in_thread(pre) as p, running_in_thread(dec) as d:
        yield p, d


@pytest.fixture(scope="module")
def sglang_pair() -> Iterator[tuple[EmulatorServer, EmulatorServer]]:
    yield from _pair("sglang")


@pytest.fixture(scope="module")
def vllm_pair() -> Iterator[tuple[EmulatorServer, EmulatorServer]]:
    yield from _pair("vllm")


def url(srv: EmulatorServer) -> str:
    return f"http://127.0.0.1:{srv.ports[0]}"


def sse(path: str, body: dict) -> tuple[list[dict], float]:
    """The events of a streamed response and when (monotonic) the first one came."""
    events: list[dict] = []
    first = math.nan
    with httpx.stream("POST", path, json=body, timeout=10.0) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                if not events:
                    first = time.monotonic()
                events.append(json.loads(line[len("data: ") :]))
    return events, first


def test_sglang_decode_waits_for_the_room_then_charges_the_transfer(sglang_pair) -> None:
    p, d = sglang_pair
    info = httpx.get(url(p) + "/get_server_info").json()
    assert info["disaggregation_mode"] == "prefill"
    assert info["disaggregation_bootstrap_port"] == p.bootstrap_ports[0]
    assert httpx.get(url(d) + "/get_server_info").json()["disaggregation_mode"] == "decode"
    room = 123456789
    body = {
        "input_ids": TOK.ids_of_length(6000, seed=3),
        "sampling_params": {"max_new_tokens": 8},
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": p.bootstrap_ports[0],
        "bootstrap_room": room,
    }
    # The decode request goes first: its stream must wait for the prefill.
    got: dict = {}

    def decode() -> None:
        got["events"], got["first"] = sse(url(d) + "/generate", {**body, "stream": True})

    t = threading.Thread(target=decode)
    t.start()
    time.sleep(0.05)
    r = httpx.post(url(p) + "/generate", json=body, timeout=10.0)
    prefill_done = time.monotonic()
    t.join(timeout=10.0)
    # The prefill server answers the first token only.
    meta = r.json()["meta_info"]
    assert meta["completion_tokens"] == 1 and meta["finish_reason"]["type"] == "length"
    events = got["events"]
    assert events[-1]["meta_info"]["completion_tokens"] == 8
    assert len(events[-1]["output_ids"]) == 8
    # No decode token before the prefill was done (a little slack for the client threads).
    assert got["first"] >= prefill_done - 0.01
    stats = httpx.get(url(d) + "/emulator/pd").json()
    assert room in stats["rooms"] and stats["transfers"] >= 1 and not stats["errors"]
    cost = d.instances[0].cost
    assert stats["kv_transfer_s_total"] == pytest.approx(
        cost.kv_transfer_time_s(6000) * stats["transfers"]
    )
    assert room in httpx.get(url(p) + "/emulator/pd").json()["rooms"]


def test_sglang_decode_without_a_room_is_a_400(sglang_pair) -> None:
    _, d = sglang_pair
    r = httpx.post(url(d) + "/generate", json={"text": "hello there", "sampling_params": {}})
    assert r.status_code == 400
    assert "bootstrap_room" in r.json()["error"]["message"]


def test_vllm_prefill_names_itself_and_the_decode_charges_the_transfer(vllm_pair) -> None:
    p, d = vllm_pair
    prompt = TOK.ids_of_length(1000, seed=5)
    r = httpx.post(
        url(p) + "/v1/completions",
        json={
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": 1,
            "stream": False,
            "kv_transfer_params": {
                "do_remote_decode": True,
                "do_remote_prefill": False,
                "remote_engine_id": None,
                "remote_block_ids": None,
                "remote_host": None,
                "remote_port": None,
            },
        },
        timeout=10.0,
    )
    assert r.status_code == 200
    out = r.json()
    assert out["usage"]["completion_tokens"] == 1
    params = out["kv_transfer_params"]
    pstats = httpx.get(url(p) + "/emulator/pd").json()
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_engine_id"] == pstats["engine_id"]
    assert (params["remote_host"], params["remote_port"]) == ("127.0.0.1", p.bootstrap_ports[0])
    assert len(params["remote_block_ids"]) == math.ceil(1000 / 16)
    events, _ = sse(
        url(d) + "/v1/completions",
        {
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": 6,
            "stream": True,
            "stream_options": {"include_usage": True},
            "kv_transfer_params": params,
        },
    )
    assert events[-1]["usage"]["completion_tokens"] == 6
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    dstats = httpx.get(url(d) + "/emulator/pd").json()
    assert dstats["kv_transfer_params"][-1]["remote_engine_id"] == pstats["engine_id"]
    cost = d.instances[0].cost
    assert dstats["transfers"] >= 1
    assert dstats["kv_transfer_s_total"] == pytest.approx(
        cost.kv_transfer_time_s(1000) * dstats["transfers"]
    )


def test_vllm_decode_without_params_serves_the_request_itself(vllm_pair) -> None:
    _, d = vllm_pair
    before = httpx.get(url(d) + "/emulator/pd").json()["transfers"]
    r = httpx.post(
        url(d) + "/v1/completions", json={"model": MODEL, "prompt": "hello there", "max_tokens": 3}
    )
    assert r.json()["usage"]["completion_tokens"] == 3
    assert r.json()["kv_transfer_params"] is None
    assert httpx.get(url(d) + "/emulator/pd").json()["transfers"] == before


def test_sglang_decode_fails_the_request_when_the_prefill_refuses_it() -> None:
    # A prefill instance whose KV cache cannot hold the prompt refuses it; the
    # decode instance learns so from the bootstrap port instead of waiting.
    common = {"protocol": "sglang", "model": MODEL, "time_scale": 10.0}
    pre = EmulatorConfig(
        **common,
        port=free_port(),
        role="prefill",
        bootstrap_port=free_port(),
        limits={"max_total_tokens": 1000},
    )
    dec = EmulatorConfig(**common, port=free_port(), role="decode")
    with running_in_thread(pre) as p, running_in_thread(dec) as d:
        body = {
            "input_ids": TOK.ids_of_length(2000, seed=4),
            "sampling_params": {"max_new_tokens": 4},
            "bootstrap_host": "127.0.0.1",
            "bootstrap_port": p.bootstrap_ports[0],
            "bootstrap_room": 42,
        }
        got: dict = {}
        t = threading.Thread(
            target=lambda: got.update(r=httpx.post(url(d) + "/generate", json=body, timeout=10.0))
        )
        t.start()
        time.sleep(0.05)
        assert httpx.post(url(p) + "/generate", json=body, timeout=10.0).status_code == 400
        t.join(timeout=10.0)
        r = got["r"]
        assert r.status_code == 500
        assert "room 42" in r.json()["error"]["message"]
        stats = httpx.get(url(d) + "/emulator/pd").json()
        assert stats["transfers"] == 0 and len(stats["errors"]) == 1
        # Nothing is left counted in flight on the decode instance.
        assert d.instances[0].engine.incoming == 0
