"""``llmsched router`` serving real traffic on loopback, in front of ``llmsched emulate`` processes.

What a client would notice: answers that arrive intact and in order (the
same tokens the emulator sends when asked directly, with the same seed),
usage as vLLM sends it, errors in OpenAI's shape, request ids, the hints
reaching the policy (``--record``), a client's disconnect ending the
upstream request, and the admin API (PD in ``test_router_pd.py``; health,
metrics and shutdown in ``test_router_ops.py``, both using the helpers
here). Routers run as the real CLI (a subprocess) or in-process
(:func:`scheduler.router.server.running_in_thread`); emulators always as
subprocesses, ten times faster than the GPU. A :class:`Tap` between router
and emulator shows what went upstream. Every process is stopped by pid.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from scheduler.router.config import RouterConfig
from scheduler.router.server import running_in_thread
from tests.loopback import free_port, wait_healthy
from traces.tokenizer import WordTokenizer

BIN = Path(sys.executable).parent
LLMSCHED = BIN / "llmsched"
MODEL = "llama-3.1-8b"
TOK = WordTokenizer()
START_S = 30.0
SECRET = "sk-upstream-4f1c9e2b7a"  # the backends' API key: must never show
ADMIN = "admin-7d1e0c"
NO_TRACE = ("Traceback", 'File "')


# -- processes ------------------------------------------------------------------------


_LOGS = itertools.count()


class Procs:
    """Processes a test started, each stderr in a file; stopped by pid at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []

    def start(
        self, name: str, cmd: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        log = self.folder / f"{name.split()[0]}-{next(_LOGS)}.log"
        with log.open("wb") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        self.procs.append((name, proc, log))
        return proc

    def log_of(self, proc: subprocess.Popen) -> str:
        (path,) = [p for _, q, p in self.procs if q is proc]
        return path.read_text(errors="replace")

    def check(self) -> None:
        for name, proc, log in self.procs:
            if proc.poll() is not None:
                raise AssertionError(
                    f"{name} exited ({proc.returncode}): {log.read_text(errors='replace')[-2000:]}"
                )

    def stop(self) -> None:
        for _, proc, _ in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for _, proc, _ in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@contextlib.contextmanager
def procs_in(folder: Path) -> Iterator[Procs]:
    p = Procs(folder)
    try:
        yield p
    finally:
        p.stop()


def emulate(procs: Procs, protocol: str, *extra: str, instances: int = 1) -> list[str]:
    """Start ``llmsched emulate`` (ten times faster than the GPU); its URLs once healthy."""
    port = free_port(instances)
    cmd = [str(LLMSCHED), "emulate", "--protocol", protocol, "--port", str(port)]
    cmd += ["--model", MODEL, "--time-scale", "10", "--instances", str(instances), *extra]
    procs.start(f"emulate {protocol} {' '.join(extra)}", cmd)
    urls = [f"http://127.0.0.1:{port + i}" for i in range(instances)]
    if not wait_healthy(urls, procs.check, START_S):
        raise AssertionError(f"emulate did not come up on {urls}")
    return urls


def start_router(procs: Procs, args: list[str]) -> tuple[str, subprocess.Popen]:
    """Start ``llmsched router`` on loopback; its URL and process once it is ready."""
    port = free_port()
    cmd = [str(LLMSCHED), "router", "--host", "127.0.0.1", "--port", str(port), *args]
    proc = procs.start("router", cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        procs.check()
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url + "/readiness", timeout=2.0).status_code == 200:
                return url, proc
        time.sleep(0.1)
    raise AssertionError(f"the router was not ready within {START_S:g} s")


class Tap:
    """A TCP forwarder from the router to a backend that keeps what the router sent.

    ``sent[k]`` is everything connection ``k`` carried upstream; ``closed_at[k]``
    is when (monotonic) the router's side of it closed, if it did. With
    ``dribble_bytes`` the backend's answers reach the router that many bytes
    at a time, as a slow network cuts them (events and chunk framing split).
    """

    def __init__(self, target: str, dribble_bytes: int = 0) -> None:
        self.target = int(target.rsplit(":", 1)[1])
        self.dribble_bytes = dribble_bytes
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.sent: list[bytearray] = []
        self.closed_at: dict[int, float] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                k = len(self.sent)
                self.sent.append(bytearray())
            threading.Thread(target=self._serve, args=(k, conn), daemon=True).start()

    def _serve(self, k: int, conn: socket.socket) -> None:
        try:
            up = socket.create_connection(("127.0.0.1", self.target))
        except OSError:  # the backend is gone: so is the connection
            conn.close()
            return

        def back() -> None:
            n = self.dribble_bytes
            with contextlib.suppress(OSError):
                while data := up.recv(65536):
                    if not n:
                        conn.sendall(data)
                        continue
                    for i in range(0, len(data), n):
                        conn.sendall(data[i : i + n])
                        time.sleep(0.0005)
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)

        threading.Thread(target=back, daemon=True).start()
        with contextlib.suppress(OSError):
            while data := conn.recv(65536):
                self.sent[k] += data
                up.sendall(data)
        self.closed_at[k] = time.monotonic()
        up.close()
        conn.close()

    def requests(self) -> list[tuple[int, str, dict[str, str], Any]]:
        """Every request sent upstream so far: (connection, path, headers, JSON body or None)."""
        out = []
        for k, raw in enumerate(list(self.sent)):
            data = bytes(raw)
            while (end := data.find(b"\r\n\r\n")) >= 0:
                head, *lines = data[:end].decode("latin-1").split("\r\n")
                headers = dict(line.split(": ", 1) for line in lines)
                headers = {h.lower(): v for h, v in headers.items()}
                n = int(headers.get("content-length", "0"))
                body = data[end + 4 : end + 4 + n]
                data = data[end + 4 + n :]
                out.append((k, head.split()[1], headers, json.loads(body) if body else None))
        return out

    def close(self) -> None:
        self.sock.close()


# -- clients --------------------------------------------------------------------------


def sse(url: str, body: dict, headers: dict | None = None) -> tuple[list[str], httpx.Headers]:
    """The ``data:`` payloads of a streamed answer, [DONE] included, and its headers."""
    with httpx.stream("POST", url, json=body, headers=headers, timeout=20.0) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        return data, r.headers


def events(data: list[str]) -> list[dict]:
    assert data and data[-1] == "[DONE]" and "[DONE]" not in data[:-1], data[-3:]
    return [json.loads(d) for d in data[:-1]]


def texts(evs: list[dict], chat: bool) -> list[str]:
    if chat:
        return [e["choices"][0]["delta"].get("content") or "" for e in evs if e["choices"]]
    return [e["choices"][0]["text"] for e in evs if e["choices"]]


def counter(worker: str, name: str) -> float:
    """The sum of a counter's samples on ``worker``'s ``/metrics``."""
    total = 0.0
    for line in httpx.get(worker + "/metrics", timeout=5.0).text.splitlines():
        if line.startswith((name + "{", name + " ")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def completion(prompt_words: int, max_tokens: int, seed: int = 1, **extra: Any) -> dict:
    prompt = TOK.text_of_length(prompt_words, seed=seed)
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, **extra}


def chat(max_tokens: int, **extra: Any) -> dict:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me"}]
    return {"model": MODEL, "messages": msgs, "max_tokens": max_tokens, **extra}


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
            body = completion(10, 4000, stream=True)  # about 3 s of tokens at --time-scale 10
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=10.0) as r:
                lines = r.iter_lines()
                seen = 0
                while seen < 5:
                    seen += next(lines).startswith("data: ")
            gone = time.monotonic()
            (k,) = [k for k, p, _, b in tap.requests() if b and b.get("max_tokens") == 4000]
            deadline = gone + 2.0
            while k not in tap.closed_at and time.monotonic() < deadline:
                time.sleep(0.02)
            assert k in tap.closed_at, "the router kept reading a stream nobody wants"
            assert tap.closed_at[k] - gone < 1.0
            # The router still serves afterwards.
            ok = httpx.post(url + "/v1/completions", json=completion(5, 2), timeout=10.0)
            assert ok.status_code == 200
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
