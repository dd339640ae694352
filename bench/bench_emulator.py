"""Benchmark: streamed tokens per second that one ``llmsched emulate`` process sustains.

Starts ``llmsched emulate`` (one instance, vLLM's API) in its own process,
fast enough (``--time-scale``) that the engine model is never what limits
it, then keeps ``--concurrency`` streamed completions of ``--output-tokens``
tokens in flight from an asyncio client until ``--requests`` are done.
Prints tokens/s and SSE chunks/s as the client received them, and the
emulator's CPU seconds, so tokens per emulator CPU second says what one core
of emulator does (the client runs on another core; a token per chunk unless
a stream falls behind, when the emulator sends the tokens so far in one
chunk, as vLLM does).

At this time scale the engine model plans steps faster than one process can
stream their tokens, so the emulator runs flat out and its loop lag grows
through the run (it is printed): the figures are its ceiling. At real speed
the same lag stays near zero until the token rate nears that ceiling.

Run from the repository root::

    .venv/bin/python bench/bench_emulator.py [--concurrency 128] [--requests 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

__all__ = ["main"]

LLMSCHED = Path(sys.executable).with_name("llmsched")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_s(pid: int) -> float:
    """User plus system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _client(
    port: int, concurrency: int, requests: int, output_tokens: int
) -> tuple[int, int]:
    """Streamed completions over raw keep-alive HTTP/1.1 connections.

    A general-purpose async client spends more CPU per chunk than the
    emulator does, so this one reads the chunked SSE bytes itself and only
    counts: chunks that carry text, and the tokens the usage chunk reports.
    """
    tokens = chunks = 0
    left = requests
    done_marker = b"data: [DONE]"

    async def worker(i: int) -> None:
        nonlocal tokens, chunks, left
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while left > 0:
                left -= 1
                body = json.dumps(
                    {
                        "prompt": f"request {i} {left} " + "word " * 32,
                        "max_tokens": output_tokens,
                        "stream": True,
                        "stream_options": {"include_usage": True},
                    }
                ).encode()
                writer.write(
                    b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\n"
                    b"Content-Type: application/json\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
                buf = bytearray()
                while not (done_marker in buf and buf.endswith(b"\r\n0\r\n\r\n")):
                    data = await reader.read(65536)
                    if not data:
                        raise ConnectionError("emulator closed the connection")
                    buf += data
                text = bytes(buf)
                chunks += text.count(b'"text":')
                tail = text.rsplit(b'"completion_tokens":', 1)[1]
                tokens += int(tail.split(b",", 1)[0].split(b"}", 1)[0])
        finally:
            writer.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return tokens, chunks


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print its figures."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--requests", type=int, default=1024)
    ap.add_argument("--output-tokens", type=int, default=256)
    ap.add_argument("--time-scale", type=float, default=50.0)
    args = ap.parse_args(argv)
    port = _free_port()
    cmd = [str(LLMSCHED), "emulate", "--protocol", "vllm", "--port", str(port)]
    cmd += ["--time-scale", str(args.time_scale)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise SystemExit(f"emulator did not start: {proc.stderr.read() if proc.stderr else ''}")
        cpu0, t0 = _cpu_s(proc.pid), time.perf_counter()
        tokens, chunks = asyncio.run(
            _client(port, args.concurrency, args.requests, args.output_tokens)
        )
        wall, cpu = time.perf_counter() - t0, _cpu_s(proc.pid) - cpu0
        lag = [
            ln
            for ln in httpx.get(url + "/metrics").text.splitlines()
            if ln.startswith("llmsched_emulator_loop_lag_max_seconds")
        ]
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    print(
        f"{args.requests} streamed requests x {args.output_tokens} tokens, "
        f"{args.concurrency} in flight, time scale {args.time_scale:g}"
    )
    print(f"tokens received     {tokens:,} in {wall:.2f} s: {tokens / wall:,.0f} tokens/s")
    print(f"SSE chunks received {chunks:,}: {chunks / wall:,.0f} chunks/s")
    print(
        f"emulator CPU        {cpu:.2f} s ({cpu / wall:.0%} of one core): "
        f"{tokens / cpu:,.0f} tokens per CPU second"
    )
    if lag:
        print(f"worst loop lag      {float(lag[0].split()[-1]) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
