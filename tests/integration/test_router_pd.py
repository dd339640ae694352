"""``llmsched router`` in front of emulated prefill/decode pairs: SGLang's bootstrap rooms, vLLM's kv_transfer_params.

Each test starts a prefill and a decode ``llmsched emulate`` process and
the router CLI (flags for SGLang, a ``--config`` file for vLLM), sends
requests through it, streamed and not, and checks what a user would:
complete answers, and on the emulators' ``GET /emulator/pd`` that the
handshake reached the decode server and every transfer was made. For
vLLM a :class:`Tap` in front of the prefill server shows what it was asked.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from scheduler.router.config import RouterConfig
from scheduler.router.server import running_in_thread
from tests.integration.router_support import (
    MODEL,
    TOK,
    Procs,
    Tap,
    assert_leaving_closes_upstream,
    chat,
    completion,
    emulate,
    events,
    procs_in,
    sse,
    start_router,
    texts,
)
from tests.loopback import free_port

Pair = tuple[str, str, int]  # prefill URL, decode URL, bootstrap port


@pytest.fixture(scope="module")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Procs]:
    with procs_in(tmp_path_factory.mktemp("router_pd")) as p:
        yield p


def _pair(procs: Procs, protocol: str) -> Pair:
    boot = free_port()
    (pre,) = emulate(procs, protocol, "--role", "prefill", "--bootstrap-port", str(boot))
    (dec,) = emulate(procs, protocol, "--role", "decode")
    return pre, dec, boot


@pytest.fixture(scope="module")
def sglang_pair(procs: Procs) -> Pair:
    return _pair(procs, "sglang")


@pytest.fixture(scope="module")
def vllm_pair(procs: Procs) -> Pair:
    return _pair(procs, "vllm")


def pd_stats(url: str) -> dict:
    return httpx.get(url + "/emulator/pd", timeout=5.0).json()


def test_sglang_pd_pairs_the_servers_through_bootstrap_rooms(
    procs: Procs, sglang_pair: Pair
) -> None:
    pre, dec, boot = sglang_pair
    args = ["--prefill", pre, "--bootstrap-port", str(boot), "--decode", dec]
    router, _ = start_router(procs, [*args, "--protocol", "sglang"])
    before = pd_stats(dec)
    gen = {"text": TOK.text_of_length(300, seed=2), "sampling_params": {"max_new_tokens": 6}}
    r = httpx.post(router + "/generate", json=gen, timeout=20.0)
    assert r.status_code == 200, r.text
    assert r.json()["meta_info"]["completion_tokens"] == 6
    assert len(r.json()["text"].split()) == 6
    evs = events(sse(router + "/generate", {**gen, "stream": True})[0])
    assert evs[-1]["text"] == r.json()["text"]
    assert evs[-1]["meta_info"]["finish_reason"]["type"] == "length"
    evs = events(sse(router + "/v1/completions", completion(50, 5, stream=True))[0])
    assert len("".join(texts(evs, chat=False)).split()) == 5
    out = httpx.post(router + "/v1/chat/completions", json=chat(4), timeout=20.0)
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 4
    pstats, dstats = pd_stats(pre), pd_stats(dec)
    # Four requests, four handshakes: the decode server learned each room
    # from the prefill server's bootstrap port (host and port as the router sent them).
    assert not dstats["errors"], dstats["errors"]
    assert dstats["handshakes"] - before["handshakes"] == 4
    assert dstats["transfers"] - before["transfers"] == 4
    rooms = set(dstats["rooms"]) - set(before["rooms"])
    assert len(rooms) == 4 and rooms <= set(pstats["rooms"])
    assert pstats["bootstrap_port"] == boot


def test_vllm_pd_from_a_config_file_passes_the_prefills_params_on(
    procs: Procs, vllm_pair: Pair, tmp_path: Path
) -> None:
    pre, dec, _ = vllm_pair
    tap = Tap(pre)
    config = tmp_path / "router.toml"
    config.write_text(
        f'model = "{MODEL}"\npolicy = "round_robin"\n'
        f'[[backends]]\nurl = "{tap.url}"\nprotocol = "vllm"\nrole = "prefill"\n'
        f'[[backends]]\nurl = "{dec}"\nprotocol = "vllm"\nrole = "decode"\n'
    )
    try:
        router, _ = start_router(procs, ["--config", str(config)])
        before = pd_stats(dec)
        r = httpx.post(router + "/v1/completions", json=completion(200, 7), timeout=20.0)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 7
        assert len(r.json()["choices"][0]["text"].split()) == 7
        streamed = completion(200, 7, stream=True, stream_options={"include_usage": True})
        evs = events(sse(router + "/v1/completions", streamed)[0])
        assert "".join(texts(evs, chat=False)) == r.json()["choices"][0]["text"]
        assert evs[-1]["choices"] == [] and evs[-1]["usage"]["completion_tokens"] == 7
        # A chat's budget under OpenAI's newer name: the prefill gets one token of it too.
        body = {**chat(5, stream=True), "max_tokens": None, "max_completion_tokens": 5}
        evs = events(sse(router + "/v1/chat/completions", body)[0])
        assert len("".join(texts(evs, chat=True)).split()) == 5
        asked = [b for _, p, _, b in tap.requests() if p.startswith("/v1/")]
    finally:
        tap.close()
    # The prefill server was asked for one token, whole, to be decoded elsewhere.
    assert len(asked) == 3
    assert asked[-1]["max_completion_tokens"] == 1
    for body in asked:
        assert body["max_tokens"] == 1 and body["stream"] is False
        assert "stream_options" not in body
        assert body["kv_transfer_params"]["do_remote_decode"] is True
    pstats, dstats = pd_stats(pre), pd_stats(dec)
    assert not dstats["errors"], dstats["errors"]
    assert dstats["transfers"] - before["transfers"] == 3
    # The decode server got the prefill's own answer: its engine id.
    assert [p["remote_engine_id"] for p in dstats["kv_transfer_params"][-3:]] == [
        pstats["engine_id"]
    ] * 3


@pytest.mark.parametrize("protocol", ["sglang", "vllm"])
def test_a_client_gone_mid_stream_closes_the_decode_request(
    request: pytest.FixtureRequest, protocol: str
) -> None:
    pre, dec, boot = request.getfixturevalue(f"{protocol}_pair")
    tap = Tap(dec)
    cfg = RouterConfig(
        port=free_port(),
        poll_interval_s=0,
        backends=[
            {"url": pre, "protocol": protocol, "role": "prefill", "bootstrap_port": boot},
            {"url": tap.url, "protocol": protocol, "role": "decode"},
        ],
    )
    try:
        with running_in_thread(cfg) as srv:
            url = f"http://127.0.0.1:{srv.port}"
            assert_leaving_closes_upstream(url, tap, "a decode stream")
    finally:
        tap.close()
