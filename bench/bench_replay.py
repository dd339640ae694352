"""The replay client's own ceiling: requests/s and streamed chunks/s one process sustains.

The target is a near-zero-latency endpoint on loopback: a bare asyncio HTTP/1.1
server in a separate process (so it does not share the client's core) that
answers every POST at once with a canned SSE stream of ``--chunks`` events,
each carrying one token (SGLang ``/generate`` shape, or OpenAI completions
with running usage). The client is the real :class:`traces.replay.Replay`
on one event loop. For each offered rate, it replays ``--seconds`` of a
constant-rate trace and prints what it achieved, its CPU time, and how late
requests left (p99 send lag): when the lag grows, the client, not the
server, is the limit.

    .venv/bin/python bench/bench_replay.py                 # 500, 1000, 2000 req/s, 20 chunks
    .venv/bin/python bench/bench_replay.py --rates 1500 --chunks 40 --protocol openai
    .venv/bin/python bench/bench_replay.py --profile       # cProfile of the client at 1000 req/s

Targets: at least 1,000 requests/s and 20,000 chunks/s on one core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd

from traces.replay import Replay, ReplayConfig, lag_report, records_frame
from traces.trace import Trace


def _canned(protocol: str, chunks: int) -> bytes:
    """One whole chunked SSE response of ``chunks`` one-token events."""
    events = []
    for k in range(1, chunks + 1):
        if protocol == "sglang":
            msg = {
                "text": "x " * k,
                "output_ids": list(range(k)),
                "meta_info": {"prompt_tokens": 8, "completion_tokens": k, "cached_tokens": 0},
            }
        else:
            msg = {
                "choices": [{"index": 0, "text": " x"}],
                "usage": {"prompt_tokens": 8, "completion_tokens": k},
            }
        events.append(b"data: " + json.dumps(msg, separators=(",", ":")).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    body = b"".join(events)
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    return head + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"


class _Answer(asyncio.Protocol):
    """Reads requests (headers, content-length body) and answers each at once."""

    def __init__(self, response: bytes) -> None:
        self.response = response
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15 : head.find(b"\r\n", at)]) if at >= 0 else 0
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length :]
            self.transport.write(self.response)  # type: ignore[attr-defined]


def _serve(sock: socket.socket, response: bytes) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Answer(response), sock=sock, backlog=4096)
        await server.serve_forever()

    asyncio.run(main())


def _trace(rate_rps: float, seconds: float) -> Trace:
    n = int(rate_rps * seconds)
    frame = pd.DataFrame(
        {
            "arrival_s": np.arange(n) / rate_rps,
            "prompt_tokens": np.full(n, 8),
            "output_tokens": np.full(n, 20),
        }
    )
    return Trace(frame, name=f"constant-{rate_rps:g}")


def _one(url: str, protocol: str, rate: float, seconds: float, profile: bool) -> dict:
    replay = Replay(_trace(rate, seconds), ReplayConfig(url, protocol=protocol, timeout_s=60))
    cpu0 = time.process_time()
    if profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        asyncio.run(replay.run())
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    else:
        asyncio.run(replay.run())
    cpu = time.process_time() - cpu0
    frame = records_frame(replay)
    ok = frame[frame["outcome"] == "ok"]
    span = float(ok["finish_s"].max() - ok["send_s"].min()) if len(ok) else float("nan")
    lag = lag_report(replay)
    return {
        "offered_rps": rate,
        "ok": len(ok),
        "errors": dict(replay.errors),
        "rps": len(ok) / span,
        "chunks_per_s": float(ok["n_chunks"].sum()) / span,
        "cpu_per_wall": cpu / replay.wall_s,
        "lag_p99_ms": lag.get("lag_p99_s", float("nan")) * 1000,
        "late": lag["n_late"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[500, 1000, 2000])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--protocol", choices=("sglang", "openai"), default="sglang")
    ap.add_argument("--profile", action="store_true", help="cProfile one run at the first rate")
    args = ap.parse_args()

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = mp.get_context("fork").Process(
        target=_serve, args=(sock, _canned(args.protocol, args.chunks)), daemon=True
    )
    server.start()
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # the client on one core
    try:
        print(
            f"replay client vs a zero-latency {args.protocol} endpoint, "
            f"{args.chunks} chunks a response, {args.seconds:g} s a rate"
        )
        print(
            f"{'offered':>8} {'req/s':>8} {'chunks/s':>9} {'CPU/wall':>8} "
            f"{'p99 lag ms':>10} {'late':>6}  errors"
        )
        for rate in args.rates[:1] if args.profile else args.rates:
            r = _one(url, args.protocol, rate, args.seconds, args.profile)
            print(
                f"{r['offered_rps']:>8,.0f} {r['rps']:>8,.0f} {r['chunks_per_s']:>9,.0f} "
                f"{r['cpu_per_wall']:>8.0%} {r['lag_p99_ms']:>10,.1f} {r['late']:>6,}  "
                f"{r['errors'] or '-'}"
            )
    finally:
        server.terminate()
        server.join(5)


if __name__ == "__main__":
    main()
