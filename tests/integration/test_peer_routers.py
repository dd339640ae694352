"""The peers' routers in front of emulated workers: ``sglang-router`` and ``vllm-router``, regular and PD.

Each test starts ``llmsched emulate`` processes and the real router binary
(from the dev extra, pinned in ``pyproject.toml``) on loopback, sends a few
requests through the router (streamed and not), and checks what a user
would: complete responses, traffic on every worker (their own ``/metrics``
counters), and under PD that the handshake reached the decode worker and
its KV transfer was charged (``/emulator/pd``). A router that is not
installed fails the test with the reason.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from scheduler.cost_model import CostModel
from tests.loopback import free_port, wait_healthy
from traces.tokenizer import WordTokenizer

BIN = Path(sys.executable).parent
LLMSCHED = BIN / "llmsched"
MODEL = "llama-3.1-8b"
TOK = WordTokenizer()
START_S = 30.0


def router_bin(name: str) -> str:
    path = BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]' (pinned in pyproject.toml)")
    return found


class Procs:
    """Processes started by a test, stopped by pid at its end (failed or not)."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace"
        )
        self.procs.append((name, proc))
        return proc

    def check(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                err = proc.stderr.read() if proc.stderr else ""
                raise AssertionError(f"{name} exited ({proc.returncode}): {err[-2000:]}")

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            if proc.stderr:
                proc.stderr.close()


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        p.stop()


def emulate(procs: Procs, protocol: str, port: int, *extra: str) -> list[str]:
    """Start ``llmsched emulate``; the URLs of its instances once they answer ``/health``."""
    n = int(extra[extra.index("--instances") + 1]) if "--instances" in extra else 1
    cmd = [str(LLMSCHED), "emulate", "--protocol", protocol, "--port", str(port)]
    cmd += ["--model", MODEL, "--time-scale", "10", *extra]
    procs.start(f"emulate {' '.join(extra)}", cmd)
    urls = [f"http://127.0.0.1:{port + i}" for i in range(n)]
    if wait_healthy(urls, procs.check, START_S):
        return urls
    raise AssertionError(f"emulate did not come up on {urls}")


def start_router(procs: Procs, name: str, args: list[str]) -> str:
    """Start a router on loopback; its URL once a request goes through it."""
    port = free_port()
    cmd = [router_bin(name), *([] if name == "vllm-router" else ["launch"])]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
    cmd += ["--log-level", "warn" if name == "sglang-router" else "warning", *args]
    procs.start(name, cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_S
    last = ""
    while time.monotonic() < deadline:
        procs.check()
        try:
            r = httpx.post(
                url + "/v1/completions",
                json={"model": MODEL, "prompt": "ready", "max_tokens": 1},
                timeout=5.0,
            )
            if r.status_code == 200:
                return url
            last = f"{r.status_code} {r.text[:300]}"
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise AssertionError(f"{name} did not route a request within {START_S:g} s: {last}")


def counter(worker: str, name: str) -> float:
    """The sum of a counter's samples on a worker's ``/metrics``."""
    total = 0.0
    for line in httpx.get(worker + "/metrics", timeout=5.0).text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def stream(url: str, path: str, body: dict) -> list[dict]:
    events: list[dict] = []
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=20.0) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: ") :]))
    return events


def send_mix(router: str, protocol: str, n: int = 4, max_tokens: int = 5) -> None:
    """``n`` requests through ``router``, streamed and not, each checked complete."""
    for k in range(n):
        prompt = TOK.text_of_length(64 + 32 * k, seed=100 + k)
        if protocol == "sglang" and k % 2 == 0:
            body = {"text": prompt, "sampling_params": {"max_new_tokens": max_tokens}}
            if k % 4 == 0:
                r = httpx.post(router + "/generate", json=body, timeout=20.0)
                assert r.status_code == 200, r.text
                out = r.json()
            else:
                out = stream(router, "/generate", body)[-1]
            assert out["meta_info"]["completion_tokens"] == max_tokens
            assert out["meta_info"]["finish_reason"]["type"] == "length"
            continue
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}
        if k % 4 == 1:
            events = stream(router, "/v1/completions", body)
            text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
            assert events[-1]["choices"][0]["finish_reason"] == "length"
        else:
            r = httpx.post(router + "/v1/completions", json=body, timeout=20.0)
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["usage"]["completion_tokens"] == max_tokens
            text = out["choices"][0]["text"]
        assert len(text.split()) == max_tokens


REQUESTS = {"sglang": "sglang:num_requests_total", "vllm": "vllm:request_success_total"}


def _regular(procs: Procs, protocol: str, router: str, policy: str) -> None:
    workers = emulate(procs, protocol, free_port(2), "--instances", "2")
    url = start_router(procs, router, ["--worker-urls", *workers, "--policy", policy])
    before = [counter(w, REQUESTS[protocol]) for w in workers]
    send_mix(url, protocol, n=6)
    after = [counter(w, REQUESTS[protocol]) for w in workers]
    assert sum(after) - sum(before) == 6
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)


def _pd(procs: Procs, protocol: str, router: str, flag: str) -> tuple[dict, dict, list[str]]:
    boot = free_port()
    (pre,) = emulate(
        procs, protocol, free_port(), "--role", "prefill", "--bootstrap-port", str(boot)
    )
    (dec,) = emulate(procs, protocol, free_port(), "--role", "decode")
    args = [flag, "--prefill", pre, str(boot), "--decode", dec, "--policy", "round_robin"]
    url = start_router(procs, router, args)
    before = [counter(w, REQUESTS[protocol]) for w in (pre, dec)]
    send_mix(url, protocol, n=4)
    after = [counter(w, REQUESTS[protocol]) for w in (pre, dec)]
    assert all(a - b >= 4 for a, b in zip(after, before, strict=True)), (before, after)
    pstats = httpx.get(pre + "/emulator/pd").json()
    dstats = httpx.get(dec + "/emulator/pd").json()
    assert dstats["role"] == "decode" and pstats["role"] == "prefill"
    assert not dstats["errors"], dstats["errors"]
    # Every request (the readiness probe too) was a handshake, and its transfer was charged.
    assert dstats["handshakes"] >= 5 and dstats["transfers"] == dstats["handshakes"]
    # Charged from the cost model: the four prompts' transfers, plus the probes' one-token ones.
    cost = CostModel.from_names(MODEL, "h100", 1, None)
    prompts = sum(cost.kv_transfer_time_s(64 + 32 * k) for k in range(4))
    probes = (dstats["handshakes"] - 4) * cost.kv_transfer_time_s(1)
    assert dstats["kv_transfer_s_total"] == pytest.approx(prompts + probes, rel=1e-6)
    # Chat completions take the same handshake, streamed and not.
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 3}
    events = stream(url, "/v1/chat/completions", chat)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    r = httpx.post(url + "/v1/chat/completions", json=chat, timeout=20.0)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    again = httpx.get(dec + "/emulator/pd").json()
    assert again["handshakes"] == dstats["handshakes"] + 2
    assert again["transfers"] == again["handshakes"] and not again["errors"]
    return pstats, dstats, [pre, dec]


def test_sglang_router_round_robin_spreads_requests_over_emulated_workers(procs: Procs) -> None:
    _regular(procs, "sglang", "sglang-router", "round_robin")


def test_sglang_router_cache_aware_keeps_a_prefix_on_its_worker(procs: Procs) -> None:
    workers = emulate(procs, "sglang", free_port(2), "--instances", "2")
    # Balance by load as soon as one worker has a request more than the other,
    # so that a busy worker sends a new prompt elsewhere.
    args = ["--worker-urls", *workers, "--policy", "cache_aware"]
    args += ["--balance-abs-threshold", "0", "--balance-rel-threshold", "1.0"]
    url = start_router(procs, "sglang-router", args)

    def counts() -> list[float]:
        return [counter(w, REQUESTS["sglang"]) for w in workers]

    shared = TOK.text_of_length(400, seed=7)
    c0 = counts()
    r1 = httpx.post(
        url + "/v1/completions", json={"model": MODEL, "prompt": shared, "max_tokens": 2}
    )
    c1 = counts()
    longer = {"model": MODEL, "prompt": shared + " tail word", "max_tokens": 2}
    r2 = httpx.post(url + "/v1/completions", json=longer)
    c2 = counts()
    assert r1.status_code == r2.status_code == 200
    # The longer prompt went where its prefix was, and hit that worker's cache.
    (j,) = [k for k in range(2) if c1[k] - c0[k] == 1]
    assert c2[j] - c1[j] == 1
    assert r2.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 384
    # A worker busy with a long stream (about 0.7 s): the next prompt goes to the other one.
    busy: dict = {}
    before = counts()
    with httpx.stream(
        "POST",
        url + "/generate",
        json={"text": shared, "sampling_params": {"max_new_tokens": 1000}, "stream": True},
        timeout=20.0,
    ) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data: "):
            pass
        busy["other"] = httpx.post(
            url + "/generate",
            json={"text": TOK.text_of_length(50, seed=9), "sampling_params": {"max_new_tokens": 2}},
            timeout=20.0,
        )
        for _ in lines:
            pass
    after = counts()
    assert busy["other"].json()["meta_info"]["completion_tokens"] == 2
    assert [a - b for a, b in zip(after, before, strict=True)] == [1.0, 1.0], (before, after)


def test_sglang_router_pd_pairs_an_emulated_prefill_and_decode(procs: Procs) -> None:
    pstats, dstats, _ = _pd(procs, "sglang", "sglang-router", "--pd-disaggregation")
    # The router injected the rooms; the decode worker learned each from the prefill's bootstrap port.
    assert dstats["rooms"] and set(dstats["rooms"]) <= set(pstats["rooms"])


def test_vllm_router_spreads_requests_over_emulated_workers(procs: Procs) -> None:
    _regular(procs, "vllm", "vllm-router", "round_robin")


def test_vllm_router_pd_passes_the_prefills_kv_transfer_params_on(procs: Procs) -> None:
    pstats, dstats, _ = _pd(procs, "vllm", "vllm-router", "--vllm-pd-disaggregation")
    # The router asked the prefill for a remote decode and gave its answer to the decode worker.
    assert all(p["do_remote_decode"] for p in pstats["kv_transfer_params"])
    assert dstats["kv_transfer_params"]
    assert {p["remote_engine_id"] for p in dstats["kv_transfer_params"]} == {pstats["engine_id"]}
