"""What the router's integration tests share: emulators and routers as processes, a tap, SSE reading.

Processes are started on 127.0.0.1 and stopped by pid (:class:`Procs`); a
:class:`Tap` sits between a router and an emulator and shows what went
upstream and when the router closed a connection.
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


def assert_leaving_closes_upstream(url: str, tap: Tap, what: str) -> None:
    """A client that leaves a long stream after five events makes the router close its upstream request."""
    body = completion(10, 4000, stream=True)  # seconds of tokens
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=10.0) as r:
        lines = r.iter_lines()
        seen = 0
        while seen < 5:
            seen += next(lines).startswith("data: ")
    gone = time.monotonic()
    (k,) = [k for k, _, _, b in tap.requests() if b and b.get("max_tokens") == 4000]
    deadline = gone + 2.0
    while k not in tap.closed_at and time.monotonic() < deadline:
        time.sleep(0.02)
    assert k in tap.closed_at, f"the router kept reading {what} nobody wants"
    assert tap.closed_at[k] - gone < 1.0
    # The router still serves afterwards.
    ok = httpx.post(url + "/v1/completions", json=completion(5, 2), timeout=10.0)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
