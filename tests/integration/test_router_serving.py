"""``llmsched router`` serving real traffic on loopback, in front of ``llmsched emulate`` processes.

What a client would notice: answers that arrive intact and in order (the
same tokens the emulator sends when asked directly, with the same seed),
usage as vLLM sends it, errors in OpenAI's shape, request ids, the hints
reaching the policy (``--record``), a client's disconnect ending the
upstream request, and the admin API (PD in ``test_router_pd.py``; health,
metrics and shutdown in ``test_router_ops.py``; the helpers all three use
are in ``router_support.py``). Routers run as the real CLI (a subprocess) or in-process
(:func:`scheduler.router.server.running_in_thread`); emulators always as
subprocesses, ten times faster than the GPU. A ``Tap`` between router and
emulator shows what went upstream. Every process is stopped by pid.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from scheduler.router.config import RouterConfig
from scheduler.router.server import running_in_thread
from tests.integration.router_support import (
    ADMIN,
    MODEL,
    NO_TRACE,
    SECRET,
    TOK,
    Procs,
    Tap,
    assert_leaving_closes_upstream,
    chat,
    completion,
    counter,
    emulate,
    events,
    procs_in,
    sse,
    start_router,
    texts,
)
from tests.loopback import free_port

# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("router_serving")


@pytest.fixture(scope="module")
def procs(folder: Path) -> Iterator[Procs]:
    with procs_in(folder) as p:
        yield p


@pytest.fixture(scope="module")
def vllm(procs: Procs) -> list[str]:
    """Two emulated vLLM instances: the router starts with the first, the admin API adds the second."""
    return emulate(procs, "vllm", instances=2)


@pytest.fixture(scope="module")
def sglang(procs: Procs) -> list[str]:
    return emulate(procs, "sglang")


@pytest.fixture(scope="module")
def tap(vllm: list[str]) -> Iterator[Tap]:
    t = Tap(vllm[0])
    yield t
    t.close()


@pytest.fixture(scope="module")
def cli(procs: Procs, tap: Tap) -> tuple[str, subprocess.Popen]:
    """The real CLI in front of the first vLLM instance (through the tap)."""
    args = ["--backend", tap.url, "--protocol", "vllm", "--model", MODEL]
    args += ["--policy", "round_robin", "--admin-key", ADMIN, "--api-key", SECRET]
    args += ["--access-log", "--log-level", "info"]
    return start_router(procs, args)


@pytest.fixture(scope="module")
def strict(vllm: list[str]) -> Iterator[str]:
    """An in-process router with tight limits and no admin key."""
    cfg = RouterConfig(
        port=free_port(),
        backends=[{"url": vllm[0], "protocol": "vllm"}],
        model=MODEL,
        max_body_bytes=4096,
        max_prompt_tokens=50,
    )
    with running_in_thread(cfg) as srv:
        yield f"http://127.0.0.1:{srv.port}"


@pytest.fixture(scope="module")
def sgl_router(sglang: list[str]) -> Iterator[str]:
    cfg = RouterConfig(port=free_port(), backends=[{"url": sglang[0], "protocol": "sglang"}])
    with running_in_thread(cfg) as srv:
        yield f"http://127.0.0.1:{srv.port}"


# -- 1. answers arrive intact and in order ----------------------------------------------


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_answers_match_the_emulator_asked_directly(vllm, cli, endpoint: str) -> None:
    router, _ = cli
    path = f"/v1/{'chat/' if endpoint == 'chat' else ''}completions"
    body = chat(9) if endpoint == "chat" else completion(40, 9)
    direct = httpx.post(vllm[0] + path, json=body, timeout=20.0).json()
    routed = httpx.post(router + path, json=body, timeout=20.0)
    assert routed.status_code == 200, routed.text
    got = routed.json()

    def pick(r: dict) -> str:
        c = r["choices"][0]
        return c["message"]["content"] if endpoint == "chat" else c["text"]

    assert pick(got) == pick(direct) and len(pick(got).split()) == 9
    # The same counts (the second asking hits the prefix cache, so cached tokens differ).
    for k in ("prompt_tokens", "completion_tokens"):
        assert got["usage"][k] == direct["usage"][k]
    assert got["choices"][0]["finish_reason"] == "length"
    # Streamed: the same text, its pieces in order, then [DONE]. (How many tokens
    # share a chunk depends on the emulator's timing, so the cuts may differ.)
    sbody = {**body, "stream": True}
    want = texts(events(sse(vllm[0] + path, sbody)[0]), endpoint == "chat")
    evs = events(sse(router + path, sbody)[0])
    pieces = texts(evs, endpoint == "chat")
    assert "".join(pieces) == "".join(want) == pick(direct)
    assert all(pieces[1:]) and len(pieces) >= 2
    if endpoint == "chat":
        assert evs[0]["choices"][0]["delta"]["role"] == "assistant"
    assert evs[-1]["choices"][0]["finish_reason"] == "length"


def test_streams_cut_in_small_pieces_and_side_by_side_arrive_whole(vllm, sglang) -> None:
    # Each backend's answers reach its router a few bytes at a time, nine streams at once.
    taps = [Tap(vllm[0], dribble_bytes=7), Tap(sglang[0], dribble_bytes=5)]
    cases = [
        (0, "/v1/completions", completion(30, 12, stream=True)),
        (0, "/v1/chat/completions", chat(12, stream=True)),
        (
            1,
            "/generate",
            {"text": "a b", "sampling_params": {"max_new_tokens": 12}, "stream": True},
        ),
    ]
    direct = (vllm[0], sglang[0])
    want = [whole_text(events(sse(direct[r] + p, b)[0]), p) for r, p, b in cases]
    got: dict[int, str] = {}
    with contextlib.ExitStack() as stack:
        for t in taps:
            stack.callback(t.close)
        routers = [
            stack.enter_context(
                running_in_thread(
                    RouterConfig(port=free_port(), backends=[{"url": t.url, "protocol": proto}])
                )
            )
            for t, proto in zip(taps, ("vllm", "sglang"), strict=True)
        ]

        def one(k: int) -> None:
            r, path, body = cases[k % 3]
            url = f"http://127.0.0.1:{routers[r].port}{path}"
            got[k] = whole_text(events(sse(url, body)[0]), path)

        threads = [threading.Thread(target=one, args=(k,)) for k in range(9)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30.0)
        url = f"http://127.0.0.1:{routers[0].port}/v1/completions"
        plain = httpx.post(url, json=completion(30, 12), timeout=20.0).json()
    assert {k: got.get(k) for k in range(9)} == {k: want[k % 3] for k in range(9)}
    assert all(len(w.split()) == 12 for w in want)
    assert plain["choices"][0]["text"] == want[0]


def whole_text(evs: list[dict], path: str) -> str:
    """The text a stream carried (SGLang's ``/generate`` sends the text so far)."""
    if path == "/generate":
        return evs[-1]["text"]
    return "".join(texts(evs, "chat" in path))


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_usage_chunk_reaches_the_client_only_when_asked(
    procs: Procs, vllm, cli, endpoint: str
) -> None:
    router, proc = cli
    path = f"/v1/{'chat/' if endpoint == 'chat' else ''}completions"
    body = {**(chat(6) if endpoint == "chat" else completion(20, 6)), "stream": True}
    asked = events(sse(router + path, {**body, "stream_options": {"include_usage": True}})[0])
    assert asked[-1]["choices"] == [] and asked[-1]["usage"]["completion_tokens"] == 6
    assert all(e["choices"] for e in asked[:-1])
    rid = f"no-usage-{endpoint}"
    plain = events(sse(router + path, body, {"x-request-id": rid})[0])
    assert all(e["choices"] for e in plain), plain[-1]
    assert not any(e.get("usage") for e in plain)
    # The router asked upstream for usage anyway: its access log knows the output length.
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        lines = [json.loads(x) for x in procs.log_of(proc).splitlines() if rid in x]
        if lines:
            break
        time.sleep(0.05)
    assert [x["output_tokens"] for x in lines if x.get("request_id") == rid] == [6]
    # stream_options without include_usage: vLLM's default is true, so usage comes, as direct.
    for opts in ({}, {"continuous_usage_stats": True}, {"include_usage": False}):
        direct = events(sse(vllm[0] + path, {**body, "stream_options": opts})[0])
        routed = events(sse(router + path, {**body, "stream_options": opts})[0])
        shape = [(e["choices"] == [], bool(e.get("usage"))) for e in direct]
        assert [(e["choices"] == [], bool(e.get("usage"))) for e in routed] == shape, opts


def test_sglang_generate_streamed_and_not(sglang, sgl_router) -> None:
    body = {"text": TOK.text_of_length(30, seed=4), "sampling_params": {"max_new_tokens": 7}}
    direct = httpx.post(sglang[0] + "/generate", json=body, timeout=20.0).json()
    r = httpx.post(sgl_router + "/generate", json=body, timeout=20.0)
    assert r.status_code == 200, r.text
    assert r.json()["text"] == direct["text"] and len(direct["text"].split()) == 7
    assert r.json()["meta_info"]["completion_tokens"] == 7
    want = [e["text"] for e in events(sse(sglang[0] + "/generate", {**body, "stream": True})[0])]
    evs = events(sse(sgl_router + "/generate", {**body, "stream": True})[0])
    got = [e["text"] for e in evs]
    # SGLang streams the text so far: each event extends the one before.
    assert got[-1] == want[-1] == direct["text"] and len(got) >= 2
    assert all(b.startswith(a) and b != a for a, b in itertools.pairwise(got))
    assert evs[-1]["meta_info"]["completion_tokens"] == 7
    assert evs[-1]["meta_info"]["finish_reason"]["type"] == "length"
    # The OpenAI endpoints of an SGLang server go through too, usage as SGLang sends it
    # (its include_usage, like vLLM's, defaults to true once stream_options is given).
    out = httpx.post(sgl_router + "/v1/completions", json=completion(10, 3), timeout=20.0)
    assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 3
    for opts in (None, {}, {"include_usage": False}, {"include_usage": True}):
        body = chat(4, stream=True, stream_options=opts)
        direct = events(sse(sglang[0] + "/v1/chat/completions", body)[0])
        routed = events(sse(sgl_router + "/v1/chat/completions", body)[0])
        shape = [(e["choices"] == [], bool(e.get("usage"))) for e in direct]
        assert [(e["choices"] == [], bool(e.get("usage"))) for e in routed] == shape, opts
        assert texts(routed, chat=True) == texts(direct, chat=True)


# -- 2. the official openai client ------------------------------------------------------


def test_openai_client_through_the_router(cli) -> None:
    openai = pytest.importorskip("openai")
    router, _ = cli
    with openai.OpenAI(base_url=router + "/v1", api_key="x", timeout=20.0, max_retries=0) as c:
        r = c.completions.create(model=MODEL, prompt="one two three", max_tokens=5)
        assert len(r.choices[0].text.split()) == 5 and r.usage.completion_tokens == 5
        chunks = list(
            c.completions.create(
                model=MODEL,
                prompt="one two three",
                max_tokens=5,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
        assert chunks[-1].usage.completion_tokens == 5
        m = c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert m.choices[0].message.role == "assistant"
        assert len(m.choices[0].message.content.split()) == 4
        parts = list(
            c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
            )
        )
        streamed = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
        assert streamed == m.choices[0].message.content
        assert parts[-1].choices[0].finish_reason == "length"
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            c.completions.create(model="no-such-model", prompt="x", max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            c.completions.create(model=MODEL, prompt="x", max_tokens=0)


# -- 4. errors --------------------------------------------------------------------------

BAD = {
    "not json": (b'{"model": ', 400, "not valid JSON"),
    "not an object": (b"[1, 2]", 400, "JSON object"),
    "max_tokens x": (dict(completion(3, 1), max_tokens="x"), 400, "max_tokens"),
    "stream yes": (dict(completion(3, 1), stream="yes"), 400, "stream"),
    "prompt 5": (dict(completion(3, 1), prompt=5), 400, "prompt"),
    "model 5": (dict(completion(3, 1), model=5), 400, "model"),
    "unknown model": (dict(completion(3, 1), model="gpt-9"), 404, "gpt-9"),
    "too large": (dict(completion(3, 1), prompt="word " * 2000), 413, "max_body_bytes"),
    "prompt too long": (completion(80, 1), 400, "at most 50"),
    "bad slo header": (completion(3, 1), 400, "x-slo-ttft-ms"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_requests_get_openai_errors(strict: str, case: str) -> None:
    body, status, words = BAD[case]
    headers = {"content-type": "application/json"}
    if case == "bad slo header":
        headers["x-slo-ttft-ms"] = "soon"
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(strict + "/v1/completions", content=raw, headers=headers, timeout=10.0)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["code"] == status and err["type"]
    assert not any(t in r.text for t in NO_TRACE)
    assert r.headers["x-request-id"]


def test_unknown_paths_are_404_in_openai_shape(strict: str) -> None:
    for method, path in (("GET", "/nope"), ("POST", "/v1/nope"), ("GET", "/v1/completions")):
        r = httpx.request(method, strict + path, timeout=5.0)
        assert r.status_code in (404, 405), (method, path, r.text)
        assert path in r.json()["error"]["message"]
        assert not any(t in r.text for t in NO_TRACE)


# -- 5. request hints -------------------------------------------------------------------


def test_request_id_is_returned_and_forwarded(cli, tap: Tap) -> None:
    router, _ = cli
    r = httpx.post(
        router + "/v1/completions", json=completion(5, 2), headers={"x-request-id": "abc-123"}
    )
    assert r.headers["x-request-id"] == "abc-123"
    assert "abc-123" in r.json()["id"]  # the backend named its answer after it
    made = httpx.post(router + "/v1/completions", json=completion(5, 2))
    rid = made.headers["x-request-id"]
    assert len(rid) >= 16 and rid in made.json()["id"]
    _, stream_headers = sse(router + "/v1/completions", completion(5, 2, stream=True))
    assert len(stream_headers["x-request-id"]) >= 16
    sent = {h.get("x-request-id") for _, p, h, _ in tap.requests() if p == "/v1/completions"}
    assert {"abc-123", rid, stream_headers["x-request-id"]} <= sent


def test_hints_reach_the_policy_and_the_record(vllm, tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    cfg = RouterConfig(
        port=free_port(), backends=[{"url": vllm[0], "protocol": "vllm"}], record=str(tmp_path)
    )
    with running_in_thread(cfg) as srv:
        url = f"http://127.0.0.1:{srv.port}"
        hints = {"x-session-id": "s-42", "x-slo-ttft-ms": "250", "x-slo-tpot-ms": "40"}
        r = httpx.post(
            url + "/v1/completions", json=completion(12, 3), headers={**hints, "x-request-id": "r1"}
        )
        assert r.status_code == 200
        sse(url + "/v1/chat/completions", chat(5, stream=True), {"x-request-id": "r2"})
    rows = pd.read_parquet(tmp_path / "results.parquet")
    assert list(rows["x_request_id"]) == ["r1", "r2"]
    one, two = rows.iloc[0], rows.iloc[1]
    assert one["session_id"] == "s-42" and pd.isna(two["session_id"])
    assert one["slo_ttft_s"] == pytest.approx(0.25) and one["slo_tpot_s"] == pytest.approx(0.04)
    assert list(rows["outcome"]) == ["ok", "ok"]
    # A stream whose client never asked for usage still counts its output.
    assert list(rows["output_tokens"]) == [3, 5] and one["prompt_tokens"] == 12


# -- 6. a client that goes away ---------------------------------------------------------


def test_a_client_gone_mid_stream_closes_the_upstream_request(vllm) -> None:
    tap = Tap(vllm[0])
    cfg = RouterConfig(
        port=free_port(), backends=[{"url": tap.url, "protocol": "vllm"}], poll_interval_s=0
    )
    try:
        with running_in_thread(cfg) as srv:
            url = f"http://127.0.0.1:{srv.port}"
            assert_leaving_closes_upstream(url, tap, "a stream")
    finally:
        tap.close()


# -- 7. the admin API ---------------------------------------------------------------------


def test_admin_api_adds_and_removes_backends(
    vllm, cli, tap: Tap, strict: str, procs: Procs
) -> None:
    router, proc = cli
    auth = {"authorization": f"Bearer {ADMIN}"}
    assert httpx.get(router + "/workers").status_code == 401
    wrong = httpx.get(router + "/workers", headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "bearer" in wrong.json()["error"]["message"]
    off = httpx.get(strict + "/workers", headers=auth)
    assert off.status_code == 403 and "--admin-key" in off.json()["error"]["message"]
    (w,) = httpx.get(router + "/workers", headers=auth).json()["workers"]
    assert w["available"] is True
    far = httpx.post(router + "/workers", json={"url": "http://10.1.2.3:8000"}, headers=auth)
    assert far.status_code == 403 and "10.1.2.3" in far.json()["error"]["message"]
    assert httpx.post(router + "/workers", json={"url": "http://127.0.0.1:1"}).status_code == 401
    # Credentials belong in api_key: a URL's user:password would show in /workers and logs.
    userinfo = {"url": f"http://user:{SECRET}@{vllm[1][len('http://') :]}"}
    refused = httpx.post(router + "/workers", json=userinfo, headers=auth)
    assert refused.status_code == 400 and "api_key" in refused.json()["error"]["message"]
    assert SECRET not in refused.text
    added = httpx.post(
        router + "/workers", json={"url": vllm[1], "api_key": SECRET}, headers=auth, timeout=10.0
    )
    assert added.status_code == 201, added.text
    assert added.json()["available"] is True and added.json()["protocol"] == "vllm"
    again = httpx.post(router + "/workers", json={"url": vllm[1]}, headers=auth)
    assert again.status_code == 409
    assert len(httpx.get(router + "/workers", headers=auth).json()["workers"]) == 2

    def served(n: int) -> list[float]:
        before = [counter(u, "vllm:request_success_total") for u in vllm]
        for _ in range(n):
            r = httpx.post(router + "/v1/completions", json=completion(8, 2), timeout=10.0)
            assert r.status_code == 200, r.text
        return [
            counter(u, "vllm:request_success_total") - b for u, b in zip(vllm, before, strict=True)
        ]

    assert served(4) == [2.0, 2.0]  # round robin over both
    gone = httpx.delete(router + "/workers/" + vllm[1], headers=auth)
    assert gone.status_code == 200
    assert httpx.delete(router + "/workers/" + vllm[1], headers=auth).status_code == 404
    assert served(3) == [3.0, 0.0]
    # The API key went upstream, and shows nowhere.
    sent = [h.get("authorization") for _, _, h, _ in tap.requests()]
    assert f"Bearer {SECRET}" in sent
    seen = [
        httpx.get(router + "/metrics").text,
        httpx.get(router + "/workers", headers=auth).text,
        added.text,
        procs.log_of(proc),
    ]
    assert not any(SECRET in s for s in seen)
