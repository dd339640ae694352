"""Relaying a backend's stream, and the PD request bodies (scheduler/router/upstream.py)."""

from __future__ import annotations

import json

import pytest

from scheduler.router.config import BackendConfig
from scheduler.router.upstream import (
    DEFAULT_BOOTSTRAP_PORT,
    Backend,
    StreamRelay,
    sglang_pd_body,
    usage_of,
    vllm_decode_body,
    vllm_prefill_body,
)


def sse(*events: dict | str) -> bytes:
    out = b""
    for e in events:
        data = e if isinstance(e, str) else json.dumps(e, separators=(",", ":"))
        out += b"data: " + data.encode() + b"\n\n"
    return out


def chat_chunk(content: str | None, role: bool = False) -> dict:
    delta: dict = {"role": "assistant", "content": ""} if role else {"content": content}
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}


USAGE = {
    "object": "chat.completion.chunk",
    "choices": [],
    "usage": {
        "prompt_tokens": 7,
        "completion_tokens": 3,
        "prompt_tokens_details": {"cached_tokens": 4},
    },
}
CHAT = sse(
    chat_chunk(None, role=True),
    chat_chunk("a"),
    chat_chunk(" b"),
    chat_chunk(" c"),
    USAGE,
    "[DONE]",
)


def relay_all(relay: StreamRelay, body: bytes, piece: int) -> tuple[bytes, int]:
    out, n = b"", 0
    for k in range(0, len(body), piece):
        passed, got = relay.feed(body[k : k + piece])
        out += passed
        n += got
    return out + relay.finish(), n


@pytest.mark.parametrize("piece", [1, 7, 64, 100_000])
def test_a_chat_stream_passes_whole_events_however_it_is_cut(piece: int) -> None:
    relay = StreamRelay("chat", keep_usage=True)
    out, n = relay_all(relay, CHAT, piece)
    assert out == CHAT
    # The role-only first event carries no token; three events do.
    assert n == 3 and relay.events == 3 and relay.first
    assert relay.usage == (7, 4, 3)


def test_the_usage_event_is_dropped_when_the_client_did_not_ask_for_it() -> None:
    relay = StreamRelay("chat", keep_usage=False)
    out, _ = relay_all(relay, CHAT, 64)
    assert b'"usage"' not in out
    assert out.endswith(b"data: [DONE]\n\n") and out.count(b"data: ") == 5
    assert relay.usage == (7, 4, 3)  # still recorded


def test_the_first_token_is_the_first_event_with_content() -> None:
    relay = StreamRelay("chat", keep_usage=True)
    assert relay.feed(sse(chat_chunk(None, role=True)))[1] == 0 and not relay.first
    assert relay.feed(sse(chat_chunk("")))[1] == 0 and not relay.first
    assert relay.feed(sse(chat_chunk("x")))[1] == 1 and relay.first


def test_completions_and_generate_streams_count_their_tokens() -> None:
    comp = sse(*({"choices": [{"index": 0, "text": t}]} for t in ("a", " b")), "[DONE]")
    relay = StreamRelay("completions", keep_usage=True)
    assert relay_all(relay, comp, 5) == (comp, 2)
    gen = sse(
        {
            "text": "a",
            "meta_info": {"prompt_tokens": 3, "completion_tokens": 1, "cached_tokens": 0},
        },
        {
            "text": "a b",
            "meta_info": {"prompt_tokens": 3, "completion_tokens": 2, "cached_tokens": 0},
        },
        "[DONE]",
    )
    relay = StreamRelay("generate", keep_usage=True)
    out, n = relay_all(relay, gen, 9)
    assert out == gen and n == 2 and relay.usage == (3, 0, 2)


def test_an_error_event_in_the_stream_is_noted_and_passed_on() -> None:
    body = sse(chat_chunk("a"), {"error": {"message": "engine died", "code": 500}})
    relay = StreamRelay("chat", keep_usage=True)
    out, _ = relay_all(relay, body, 11)
    assert out == body and relay.error == "engine died"


def test_usage_of_reads_openai_usage_and_sglang_meta_info() -> None:
    assert usage_of(USAGE) == (7, 4, 3)
    assert usage_of({"meta_info": {"prompt_tokens": 5, "completion_tokens": 2}}) == (5, -1, 2)
    assert usage_of({"choices": []}) == (-1, -1, -1)
    assert usage_of([1, 2]) == (-1, -1, -1)


def test_sglang_pairs_get_the_prefill_servers_bootstrap_address_and_a_room() -> None:
    prefill = Backend(
        BackendConfig(url="http://10.0.0.5:30000", protocol="sglang", role="prefill"), 0, 1.0
    )
    a = sglang_pd_body({"text": "hi"}, prefill)
    b = sglang_pd_body({"text": "hi"}, prefill)
    assert a["bootstrap_host"] == "10.0.0.5" and a["bootstrap_port"] == DEFAULT_BOOTSTRAP_PORT
    assert 0 <= a["bootstrap_room"] < 2**63 and a["bootstrap_room"] != b["bootstrap_room"]
    assert a["text"] == "hi"
    custom = Backend(
        BackendConfig(url="http://h:1", protocol="sglang", role="prefill", bootstrap_port=9100),
        0,
        1.0,
    )
    assert sglang_pd_body({}, custom)["bootstrap_port"] == 9100


def test_vllm_pd_legs_carry_the_connectors_fields() -> None:
    body = {
        "prompt": "hi",
        "max_tokens": 50,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    pre = vllm_prefill_body(body)
    assert pre["max_tokens"] == 1 and pre["stream"] is False and "stream_options" not in pre
    assert pre["kv_transfer_params"]["do_remote_decode"] is True
    assert body["max_tokens"] == 50  # the client's body is untouched
    params = {"do_remote_prefill": True, "remote_engine_id": "e1", "remote_block_ids": [1, 2]}
    dec = vllm_decode_body(body, json.dumps({"kv_transfer_params": params}).encode())
    assert dec["kv_transfer_params"] == params and dec["max_tokens"] == 50 and dec["stream"] is True
    with pytest.raises(ValueError, match="no kv_transfer_params"):
        vllm_decode_body(body, b'{"choices": []}')
    with pytest.raises(ValueError, match="not JSON"):
        vllm_decode_body(body, b"<html>")


def test_an_api_key_goes_upstream_as_a_bearer_token_and_is_never_in_the_repr() -> None:
    b = Backend(BackendConfig(url="http://h:1", api_key="sk-secret"), 0, 1.0)
    assert b.headers["authorization"] == "Bearer sk-secret"
    assert "sk-secret" not in repr(b) and "sk-secret" not in repr(b.config)
