"""The emulated backend over HTTP on loopback: vLLM's and SGLang's endpoints, shapes, usage, errors, metrics."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator

import httpx
import pytest

from sim.emulator import EmulatorConfig, running_in_thread
from tests.loopback import free_port
from traces.tokenizer import WordTokenizer

MODEL = "llama-3.1-8b"
TOK = WordTokenizer()


@pytest.fixture(scope="module", params=["vllm", "sglang"])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, httpx.Client]]:
    # Ten times faster than the GPU: a test's few hundred tokens take milliseconds.
    config = EmulatorConfig(protocol=request.param, model=MODEL, port=free_port(), time_scale=10.0)
    with (
        running_in_thread(config) as srv,
        httpx.Client(base_url=f"http://127.0.0.1:{srv.ports[0]}", timeout=10.0) as client,
    ):
        yield request.param, client


def sse(client: httpx.Client, path: str, body: dict) -> list[dict | str]:
    events: list[dict | str] = []
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_completion_has_the_prompt_count_and_max_tokens(server) -> None:
    _, c = server
    prompt = TOK.text_of_length(120, seed=11)
    r = c.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 7})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "length"
    assert len(choice["text"].split()) == 7
    assert body["usage"]["prompt_tokens"] == 120
    assert body["usage"]["completion_tokens"] == 7
    assert body["usage"]["total_tokens"] == 127


def test_streamed_completion_matches_and_ends_with_usage(server) -> None:
    _, c = server
    prompt = TOK.text_of_length(64, seed=12)
    whole = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6}).json()
    events = sse(
        c,
        "/v1/completions",
        {
            "prompt": prompt,
            "max_tokens": 6,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert events[-1] == "[DONE]"
    *chunks, usage_chunk, _ = events
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 6
    assert usage_chunk["usage"]["prompt_tokens"] == 64
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == whole["choices"][0]["text"]
    assert [ch["choices"][0]["finish_reason"] for ch in chunks][-1] == "length"
    assert all("usage" not in ch for ch in chunks)


def test_stream_without_include_usage_has_no_usage_chunk(server) -> None:
    _, c = server
    events = sse(c, "/v1/completions", {"prompt": "a b c", "max_tokens": 3, "stream": True})
    assert events[-1] == "[DONE]"
    assert all(e["choices"] and "usage" not in e for e in events[:-1])


def test_continuous_usage_stats_put_usage_on_every_chunk(server) -> None:
    _, c = server
    opts = {"include_usage": True, "continuous_usage_stats": True}
    events = sse(
        c,
        "/v1/completions",
        {"prompt": "x y", "max_tokens": 4, "stream": True, "stream_options": opts},
    )
    counts = [e["usage"]["completion_tokens"] for e in events[:-1]]
    assert counts == sorted(counts) and counts[-1] == 4


def test_streamed_chat_starts_with_the_role_and_finishes_by_length(server) -> None:
    _, c = server
    messages = [{"role": "user", "content": TOK.text_of_length(30, seed=13)}]
    events = sse(
        c,
        "/v1/chat/completions",
        {
            "messages": messages,
            "max_tokens": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    first, *content, usage_chunk, done = events
    assert done == "[DONE]"
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(ch["choices"][0]["delta"]["content"] for ch in content)
    assert len(text.split()) == 5
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    # "user: " is one more word than the content: the rendering every component shares.
    assert usage_chunk["usage"]["prompt_tokens"] == 31


def test_chat_not_streamed(server) -> None:
    _, c = server
    r = c.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hello there"}], "max_completion_tokens": 4},
    )
    body = r.json()
    assert body["object"] == "chat.completion"
    msg = body["choices"][0]["message"]
    assert msg["role"] == "assistant" and len(msg["content"].split()) == 4
    assert body["usage"]["completion_tokens"] == 4


def test_repeated_prompt_reports_cached_tokens(server) -> None:
    _, c = server
    prompt = TOK.text_of_length(500, seed=14)
    first = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2}).json()
    again = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2}).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= 496


def test_token_id_prompt_is_counted_exactly(server) -> None:
    _, c = server
    r = c.post("/v1/completions", json={"prompt": list(range(1, 78)), "max_tokens": 1})
    assert r.json()["usage"]["prompt_tokens"] == 77


def _error_message(protocol: str, body: dict) -> str:
    if protocol == "vllm":
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["type"] == "BadRequestError" and err["code"] == 400
        return err["message"]
    assert body["object"] == "error" and body["code"] == 400 and body["type"] == "BadRequest"
    return body["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"max_tokens": 3},  # no prompt
        {"prompt": 5, "max_tokens": 3},
        {"prompt": "a b", "max_tokens": 0},
        {"prompt": "a b", "max_tokens": "many"},
        {"prompt": "a b", "max_tokens": 200_000},  # past the context window
        {"prompt": "", "max_tokens": 3},
        {"prompt": "a b", "max_tokens": 3, "min_tokens": 4},
        {"prompt": "a b", "max_tokens": 3, "stream_options": {"include_usage": True}},
        {"prompt": "a b", "max_tokens": 3, "n": 2},
    ],
    ids=[
        "missing",
        "wrong-type",
        "zero",
        "not-int",
        "too-long",
        "empty",
        "min-over-max",
        "options-unstreamed",
        "n2",
    ],
)
def test_bad_completion_body_gets_400_in_the_servers_shape(server, body: dict) -> None:
    protocol, c = server
    r = c.post("/v1/completions", json=body)
    assert r.status_code == 400
    assert _error_message(protocol, r.json())


def test_body_that_is_not_json_gets_400(server) -> None:
    protocol, c = server
    r = c.post(
        "/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert _error_message(protocol, r.json())


def test_models_and_health(server) -> None:
    _, c = server
    models = c.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL
    assert models["data"][0]["max_model_len"] == 131072
    assert c.get("/health").status_code == 200


def test_metrics_carry_the_servers_names(server) -> None:
    protocol, c = server
    c.post("/v1/completions", json={"prompt": "p q r", "max_tokens": 3})
    text = c.get("/metrics").text
    if protocol == "vllm":
        names = [
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
            "vllm:kv_cache_usage_perc",
            "vllm:time_to_first_token_seconds_bucket",
            "vllm:inter_token_latency_seconds_bucket",
            "vllm:e2e_request_latency_seconds_bucket",
            "vllm:prompt_tokens_total",
            "vllm:generation_tokens_total",
            "vllm:prefix_cache_queries_total",
            "vllm:prefix_cache_hits_total",
        ]
    else:
        names = [
            "sglang:num_running_reqs",
            "sglang:num_queue_reqs",
            "sglang:token_usage",
            "sglang:cache_hit_rate",
            "sglang:prompt_tokens_total",
            "sglang:generation_tokens_total",
            "sglang:time_to_first_token_seconds_bucket",
            "sglang:inter_token_latency_seconds_bucket",
            "sglang:e2e_request_latency_seconds_bucket",
        ]
    names.append("llmsched_emulator_loop_lag_seconds")
    for name in names:
        assert f"\n{name}" in text, name
    prefix = "vllm:" if protocol == "vllm" else "sglang:"
    gen = [ln for ln in text.splitlines() if ln.startswith(f"{prefix}generation_tokens_total")]
    assert gen and float(gen[0].rsplit(" ", 1)[1]) >= 3


# -- vLLM only -----------------------------------------------------------------------------


@pytest.mark.parametrize("server", ["vllm"], indirect=True)
def test_vllm_tokenize_and_version(server) -> None:
    _, c = server
    r = c.post("/tokenize", json={"prompt": "one two three"}).json()
    assert r["count"] == 3 and len(r["tokens"]) == 3 and r["max_model_len"] == 131072
    assert "version" in c.get("/version").json()


@pytest.mark.parametrize("server", ["vllm"], indirect=True)
def test_vllm_unknown_model_is_404(server) -> None:
    _, c = server  # SGLang ignores the model name
    r = c.post("/v1/completions", json={"model": "gpt-9", "prompt": "a", "max_tokens": 1})
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "NotFoundError"


# -- SGLang only ----------------------------------------------------------------------------


def _sglang(server) -> httpx.Client:
    protocol, c = server
    assert protocol == "sglang"
    return c


@pytest.mark.parametrize("server", ["sglang"], indirect=True)
def test_generate_text_and_input_ids(server) -> None:
    c = _sglang(server)
    body = c.post(
        "/generate",
        json={"text": TOK.text_of_length(40, seed=15), "sampling_params": {"max_new_tokens": 5}},
    ).json()
    meta = body["meta_info"]
    assert len(body["text"].split()) == 5 and len(body["output_ids"]) == 5
    assert meta["prompt_tokens"] == 40 and meta["completion_tokens"] == 5
    assert meta["finish_reason"] == {"type": "length", "length": 5}
    assert meta["cached_tokens"] == 0 and meta["e2e_latency"] > 0 and meta["id"]
    by_ids = c.post(
        "/generate", json={"input_ids": list(range(9)), "sampling_params": {"max_new_tokens": 2}}
    )
    assert by_ids.json()["meta_info"]["prompt_tokens"] == 9


@pytest.mark.parametrize("server", ["sglang"], indirect=True)
def test_generate_streams_cumulative_text(server) -> None:
    c = _sglang(server)
    events = sse(
        c,
        "/generate",
        {"text": "a b c d", "sampling_params": {"max_new_tokens": 4}, "stream": True},
    )
    assert events[-1] == "[DONE]"
    texts = [e["text"] for e in events[:-1]]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))
    assert len(texts[-1].split()) == 4
    assert [e["meta_info"]["finish_reason"] for e in events[:-1]][-1] == {
        "type": "length",
        "length": 4,
    }
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-2])


@pytest.mark.parametrize("server", ["sglang"], indirect=True)
def test_generate_bad_body_is_400(server) -> None:
    c = _sglang(server)
    r = c.post("/generate", json={"sampling_params": {"max_new_tokens": 3}})
    assert r.status_code == 400 and r.json()["error"]["message"]
    r = c.post("/generate", json={"text": "a", "sampling_params": {"max_new_tokens": "x"}})
    assert r.status_code == 400 and r.json()["error"]["message"]


@pytest.mark.parametrize("server", ["sglang"], indirect=True)
def test_sglang_info_load_and_flush(server) -> None:
    c = _sglang(server)
    for path in ("/get_model_info", "/model_info"):
        info = c.get(path).json()
        assert info["model_path"] == MODEL and info["is_generation"] is True
    for path in ("/get_server_info", "/server_info"):
        info = c.get(path).json()
        assert info["max_total_tokens"] > 0 and info["version"] and info["internal_states"]
    loads = c.get("/v1/loads").json()
    (load,) = loads["loads"]
    for key in (
        "num_running_reqs",
        "num_waiting_reqs",
        "num_used_tokens",
        "token_usage",
        "max_total_num_tokens",
    ):
        assert key in load
    (get_load,) = c.get("/get_load").json()
    assert set(get_load) >= {"num_reqs", "num_waiting_reqs", "num_tokens"}
    assert c.get("/health_generate").status_code == 200
    prompt = TOK.text_of_length(200, seed=16)
    c.post("/generate", json={"text": prompt, "sampling_params": {"max_new_tokens": 1}})
    assert c.post("/flush_cache").status_code == 200
    again = c.post(
        "/generate", json={"text": prompt, "sampling_params": {"max_new_tokens": 1}}
    ).json()
    assert again["meta_info"]["cached_tokens"] == 0  # the cache really was emptied


def test_a_dropped_stream_leaves_the_server_serving(server) -> None:
    _, c = server
    with c.stream(
        "POST", "/v1/completions", json={"prompt": "a", "max_tokens": 50, "stream": True}
    ) as r:
        next(r.iter_lines())  # read one line, then hang up
    r = c.post("/v1/completions", json={"prompt": "b c", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_request_id_header_names_the_response(server) -> None:
    _, c = server
    r = c.post(
        "/v1/completions", json={"prompt": "a", "max_tokens": 1}, headers={"x-request-id": "abc"}
    )
    assert r.json()["id"] == "cmpl-abc"
