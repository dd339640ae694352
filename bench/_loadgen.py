"""The router bench's load generator: open-loop and closed-loop HTTP/1.1 load from one process.

Callbacks on :class:`asyncio.Protocol` connections under uvloop, with
:mod:`httptools` framing, and no task or future per request, so that one
core sends and reads far more requests than the targets it measures: the
direct baseline (this generator against the mock backends, no router) shows
its ceiling in the same run.

* :func:`open_loop`: sends at scheduled times (Poisson or fixed-interval,
  seeded, so every target sees the same schedule) on pooled keep-alive
  connections, opening more when all are busy (the schedule never waits for
  an answer). Latency is measured from the moment a request was written, and
  how late that was against its schedule (the lag) is reported apart: a lag
  that grows says the generator, not the target, fell behind.
* :func:`closed_loop`: ``concurrency`` connections, each sending its next
  request as soon as the last one ended: the most a target sustains.

Streamed requests measure the time to the first SSE event (the mock sends
content events before its usage event); non-streamed ones the whole
response. A run samples the CPU time of the processes given to it
(``watch``) over its measured window, so a bench can say per request what
a router cost.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import httptools

__all__ = ["closed_loop", "core_busy", "cpu_s", "open_loop", "request_bytes", "wait_s"]

_CLK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds of a process and its live descendants (Linux /proc)."""
    total = 0.0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _CLK
        except (OSError, ValueError, IndexError):
            continue
    return total


def _tree(pid: int) -> list[int]:
    """A process and its live descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(k) for k in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return out


def wait_s(pid: int) -> float:
    """Seconds the threads of a process (and its descendants) spent runnable but waiting for a
    CPU (``/proc/<pid>/task/<tid>/schedstat``, second field): how much others delayed it."""
    total = 0.0
    for p in _tree(pid):
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                total += int((task / "schedstat").read_text().split()[1]) / 1e9
        except (OSError, ValueError, IndexError):
            continue
    return total


def _sample(watch: dict[str, int]) -> dict[str, tuple[float, float]]:
    """(CPU s, run-queue wait s) of each watched process, and of this one (``generator``)."""
    out = {name: (cpu_s(pid), wait_s(pid)) for name, pid in watch.items()}
    out["generator"] = (time.process_time(), wait_s(os.getpid()))
    return out


def _since(before: dict[str, tuple[float, float]], watch: dict[str, int]) -> tuple[dict, dict]:
    after = _sample(watch)
    cpu = {k: after[k][0] - v[0] for k, v in before.items()}
    wait = {k: after[k][1] - v[1] for k, v in before.items()}
    return cpu, wait


def core_busy() -> dict[int, tuple[int, int]]:
    """Per core: (busy, total) jiffies since boot (Linux /proc/stat)."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *vals = line.split()
            v = [int(x) for x in vals]
            idle = v[3] + v[4]  # idle + iowait
            out[int(name[3:])] = (sum(v[:8]) - idle, sum(v[:8]))
    return out


def _busy_since(before: dict[int, tuple[int, int]]) -> dict[int, float]:
    after = core_busy()
    return {
        c: (after[c][0] - b[0]) / max(1, after[c][1] - b[1])
        for c, b in before.items()
        if c in after
    }


def request_bytes(
    host: str, port: int, path: str, stream: bool, max_tokens: int, prompt: str = "unique"
) -> bytes:
    """A request template with one ``%d`` (the request number) in its prompt; fixed length.

    ``prompt``: ``unique``, the number first, so every prompt differs from its
    first token (a router's prefix record fills with distinct blocks), or
    ``shared``, 48 words every prompt shares, then the number.
    """
    opts = ',"stream":true,"stream_options":{"include_usage":true}' if stream else ""
    if prompt == "shared":
        text = " ".join(f"system{k}" for k in range(48)) + " request %010d"
    else:
        text = "request %010d " + " ".join(f"word{k}" for k in range(24))
    if path.endswith("/chat/completions"):
        body = (
            '{"model":"mock","messages":[{"role":"user","content":"'
            + text
            + f'"}}],"max_tokens":{max_tokens}{opts}}}'
        )
    else:
        body = '{"model":"mock","prompt":"' + text + f'","max_tokens":{max_tokens}{opts}}}'
    n = len(body.replace("%010d", "0" * 10))
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
        f"accept: */*\r\ncontent-length: {n}\r\n\r\n"
    )
    return (head + body).encode()


class _Conn(asyncio.Protocol):
    """One keep-alive connection, one request at a time; reports to ``gen.done``."""

    def __init__(self, gen: _Gen, target: int) -> None:
        self.gen, self.target = gen, target
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.t0 = self.t_first = self.t_head = 0.0
        self.index = -1
        self.status = 0

    def send(self, index: int, data: bytes) -> None:
        self.busy, self.index, self.t_first = True, index, 0.0
        self.t0 = time.perf_counter()
        assert self.transport is not None
        self.transport.write(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(f"bad response: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.busy:
            self.fail("connection closed mid-response")
        self.gen.lost(self)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.t_head = time.perf_counter()

    def on_body(self, body: bytes) -> None:
        if not self.t_first and b"data:" in body:
            self.t_first = time.perf_counter()

    def on_message_complete(self) -> None:
        t = time.perf_counter()
        self.busy = False
        if not self.parser.should_keep_alive() and self.transport is not None:
            self.transport.close()
        self.gen.done(self, self.status, self.t0, self.t_first or t, t)

    def fail(self, why: str) -> None:
        if self.busy:
            self.busy = False
            self.gen.failed(self, why)
        if self.transport is not None:
            self.transport.close()


class _Gen:
    """Records of one run: per request, its latency, lag and outcome."""

    def __init__(self, targets: list[tuple[str, int]], templates: list[bytes]) -> None:
        self.targets, self.templates = targets, templates
        self.idle: list[list[_Conn]] = [[] for _ in targets]
        self.loop = asyncio.get_running_loop()
        self.head: dict[int, float] = {}
        self.first: dict[int, float] = {}
        self.full: dict[int, float] = {}
        self.t_end: dict[int, float] = {}
        self.errors: dict[str, int] = {}
        self.opened = 0
        self.on_free = None  # closed loop: called with a connection that just finished
        self.stopping = False
        self.tasks: set[asyncio.Task] = set()
        self.conns: list[_Conn] = []  # closed loop: every connection, to close at the end

    async def connect(self, target: int) -> _Conn:
        host, port = self.targets[target]
        _, conn = await self.loop.create_connection(lambda: _Conn(self, target), host, port)
        self.opened += 1
        return conn  # type: ignore[return-value]

    def done(self, conn: _Conn, status: int, t0: float, t_first: float, t: float) -> None:
        if status == 200:
            self.head[conn.index] = conn.t_head - t0
            self.first[conn.index] = t_first - t0
            self.full[conn.index] = t - t0
            self.t_end[conn.index] = t
        else:
            self.errors[f"HTTP {status}"] = self.errors.get(f"HTTP {status}", 0) + 1
        self.free(conn)

    def failed(self, conn: _Conn, why: str) -> None:
        self.errors[why] = self.errors.get(why, 0) + 1

    def lost(self, conn: _Conn) -> None:
        pool = self.idle[conn.target]
        if conn in pool:
            pool.remove(conn)
        if self.on_free is not None and not self.stopping:
            # Closed loop: a connection the target closed is replaced, so the load stays on.
            task = self.loop.create_task(self._replace(conn.target))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _replace(self, target: int) -> None:
        try:
            conn = await self.connect(target)
        except OSError as exc:
            self.error(f"connect: {exc}")
            return
        self.conns.append(conn)
        self.free(conn)

    def free(self, conn: _Conn) -> None:
        if conn.transport is None:
            return
        if self.on_free is not None:
            self.on_free(conn)
        else:
            self.idle[conn.target].append(conn)

    def error(self, why: str) -> None:
        self.errors[why] = self.errors.get(why, 0) + 1


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _summary(lat: list[float]) -> dict:
    return {"p50_s": _pct(lat, 0.50), "p90_s": _pct(lat, 0.90), "p99_s": _pct(lat, 0.99)}


def _run(coro):
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(coro)


def open_loop(
    targets: list[tuple[str, int]],
    path: str,
    stream: bool,
    rate_rps: float,
    seconds: float,
    *,
    warmup_s: float = 0.5,
    arrivals: str = "poisson",
    seed: int = 1,
    connections: int = 32,
    max_tokens: int = 4,
    watch: dict[str, int] | None = None,
    grace_s: float = 5.0,
    prompt: str = "unique",
) -> dict:
    """Send at ``rate_rps`` for ``warmup_s + seconds`` (requests round-robin over ``targets``)."""
    return _run(
        _open_loop(
            targets, path, stream, rate_rps, seconds, warmup_s, arrivals, seed, connections,
            max_tokens, watch or {}, grace_s, prompt,
        )
    )  # fmt: skip


async def _open_loop(
    targets, path, stream, rate_rps, seconds, warmup_s, arrivals, seed, connections, max_tokens,
    watch, grace_s, prompt,
) -> dict:  # fmt: skip
    templates = [request_bytes(h, p, path, stream, max_tokens, prompt) for h, p in targets]
    gen = _Gen(targets, templates)
    for t in range(len(targets)):
        for conn in await asyncio.gather(*(gen.connect(t) for _ in range(connections))):
            gen.idle[t].append(conn)
    rng = random.Random(seed)
    total_s = warmup_s + seconds
    times, t = [], 0.0
    while True:
        t += rng.expovariate(rate_rps) if arrivals == "poisson" else 1.0 / rate_rps
        if t >= total_s:
            break
        times.append(t)
    n_warm = sum(1 for x in times if x < warmup_s)
    lag: list[float] = []
    loop = asyncio.get_running_loop()
    start = time.perf_counter() + 0.05
    cpu0: dict[str, tuple[float, float]] = {}
    wall0 = 0.0
    busy0: dict[int, tuple[int, int]] = {}

    async def open_and_send(target: int, i: int, data: bytes) -> None:
        try:
            conn = await gen.connect(target)
        except OSError as exc:
            gen.error(f"connect: {exc}")
            return
        conn.send(i, data)

    keep = set()
    for i, at in enumerate(times):
        if i == n_warm:
            cpu0 = _sample(watch)
            busy0 = core_busy()
            wall0 = time.perf_counter()
        due = start + at
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
            now = time.perf_counter()
        if i >= n_warm:
            lag.append(now - due)
        target = i % len(targets)
        data = templates[target] % i
        pool = gen.idle[target]
        if pool:
            pool.pop().send(i, data)
        else:
            task = loop.create_task(open_and_send(target, i, data))
            keep.add(task)
            task.add_done_callback(keep.discard)
    sent_end = time.perf_counter()
    deadline = sent_end + grace_s
    measured = range(n_warm, len(times))
    while time.perf_counter() < deadline:
        if all(i in gen.full for i in measured) or (
            len(gen.full) + sum(gen.errors.values()) >= len(times)
        ):
            break
        await asyncio.sleep(0.01)
    wall = time.perf_counter() - wall0
    cpu, wait = _since(cpu0, watch)
    busy = _busy_since(busy0)
    first = [gen.first[i] for i in measured if i in gen.first]
    full = [gen.full[i] for i in measured if i in gen.full]
    missing = len(measured) - len(full) - sum(gen.errors.values())
    errors = dict(gen.errors)
    if missing > 0:
        errors[f"no answer within {grace_s:g} s"] = missing
    return {
        "kind": "open",
        "offered_rps": rate_rps,
        "sent": len(measured),
        "ok": len(full),
        "errors": errors,
        "latency": _summary(first if stream else full),
        "e2e": _summary(full),
        "lag": _summary(lag),
        "wall_s": wall,
        "cpu_s": cpu,
        "wait_s": wait,
        "core_busy": busy,
        "connections_opened": gen.opened,
    }


def closed_loop(
    targets: list[tuple[str, int]],
    path: str,
    stream: bool,
    concurrency: int,
    seconds: float,
    *,
    warmup_s: float = 0.5,
    max_tokens: int = 4,
    watch: dict[str, int] | None = None,
    max_requests: int | None = None,
    prompt: str = "unique",
) -> dict:
    """``concurrency`` connections (spread over ``targets``) each sending back to back."""
    return _run(
        _closed_loop(
            targets, path, stream, concurrency, seconds, warmup_s, max_tokens, watch or {},
            max_requests, prompt,
        )
    )  # fmt: skip


async def _closed_loop(
    targets, path, stream, concurrency, seconds, warmup_s, max_tokens, watch, max_requests, prompt
) -> dict:
    templates = [request_bytes(h, p, path, stream, max_tokens, prompt) for h, p in targets]
    gen = _Gen(targets, templates)
    conns = await asyncio.gather(*(gen.connect(k % len(targets)) for k in range(concurrency)))
    gen.conns = list(conns)
    counter = 0
    stop_at = float("inf")

    def send_next(conn: _Conn) -> None:
        nonlocal counter
        if time.perf_counter() >= stop_at or (max_requests is not None and counter >= max_requests):
            return
        i = counter
        counter += 1
        conn.send(i, templates[conn.target] % i)

    gen.on_free = send_next
    t_start = time.perf_counter()
    stop_at = t_start + warmup_s + seconds
    for conn in conns:
        send_next(conn)
    await asyncio.sleep(warmup_s)
    cpu0 = _sample(watch)
    busy0 = core_busy()
    t0 = time.perf_counter()
    first_measured = counter
    while time.perf_counter() < stop_at:
        if max_requests is not None and len(gen.full) + sum(gen.errors.values()) >= max_requests:
            break
        await asyncio.sleep(0.02)
    t1 = time.perf_counter()
    cpu, wait = _since(cpu0, watch)
    busy = _busy_since(busy0)
    # Completions inside the window [t0, t1]; their latencies.
    done = [i for i, t in gen.t_end.items() if t0 <= t <= t1]
    stats_ids = [i for i in done if i >= first_measured] or done
    first = [gen.first[i] for i in stats_ids]
    full = [gen.full[i] for i in stats_ids]
    gen.stopping = True
    await asyncio.sleep(0.2)  # let the last requests end before closing
    for conn in gen.conns:
        if conn.transport is not None:
            conn.transport.close()
    return {
        "kind": "closed",
        "concurrency": concurrency,
        "ok": len(done),
        "rps": len(done) / (t1 - t0),
        "errors": dict(gen.errors),
        "latency": _summary(first if stream else full),
        "e2e": _summary(full),
        "wall_s": t1 - t0,
        "cpu_s": cpu,
        "wait_s": wait,
        "core_busy": busy,
        "first_s": first if max_requests is not None else None,
        "head_s": [gen.head[i] for i in stats_ids] if max_requests is not None else None,
        "connections_opened": gen.opened,
    }
