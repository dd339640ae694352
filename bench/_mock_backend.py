"""A near-zero-latency mock of a vLLM server's OpenAI API, for measuring what sits in front of it.

One process serves any number of ports (one "backend" each) on a bare
:class:`asyncio.Protocol` with :mod:`httptools` framing and canned byte
templates, so that a request costs it a few tens of microseconds of CPU:
far less than any router in front of it. It answers

* ``POST /v1/completions`` and ``POST /v1/chat/completions``: at once, with
  ``max_tokens`` tokens (one ``" x"`` each; 4 when none is given). Not
  streamed: one JSON body with vLLM's fields and usage. Streamed
  (``"stream": true``): the head at once, then one SSE event per token in a
  write of its own (chat: a first ``role`` event), the last one with
  ``finish_reason``, then a usage event (``choices: []``) when
  ``stream_options.include_usage`` is set, then ``data: [DONE]``. Between
  the head and the first token and between tokens it waits ``ttft_ms`` and
  ``itl_ms`` (0: the next turn of the event loop, so every event is still a
  write, a TCP segment, of its own);
* ``GET /health``, ``/v1/models``, ``/version``, ``/metrics`` (vLLM's
  gauges and a per-backend request counter, so that a router polling it is
  content), ``/v1/loads`` and ``/get_load`` (SGLang's load reports);
* ``POST /mock/config`` (JSON ``{"ttft_ms": .., "itl_ms": ..}``, all ports
  of the process), ``GET /mock/stats`` (requests served per port, and every
  other path asked for, so a bench can see what a router polls);
* anything else: 404 with vLLM's error shape.

Run on its own (``python bench/_mock_backend.py --port 8001 --port 8002``)
or from a bench through :func:`serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import time
from collections import Counter

import httptools

__all__ = ["MockState", "serve"]

MODEL = "mock"
_MAX_TOKENS = re.compile(rb'"max_tokens"\s*:\s*(\d+)')
_STREAM = re.compile(rb'"stream"\s*:\s*true')
_USAGE = re.compile(rb'"include_usage"\s*:\s*true')


class MockState:
    """What all ports of one process share: timing knobs and counters."""

    def __init__(self) -> None:
        self.ttft_s = 0.0
        self.itl_s = 0.0
        self.served: Counter[int] = Counter()  # port -> completions answered
        self.other_paths: Counter[str] = Counter()  # polled paths, for the bench's report
        self.running = 0  # streams in progress, reported as vllm:num_requests_running
        self.seq = 0
        self.created = int(time.time())


def _response(status: bytes, ctype: bytes, body: bytes, close: bool = False) -> bytes:
    conn = b"connection: close\r\n" if close else b""
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: " + ctype + b"\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n" + conn + b"\r\n" + body
    )  # fmt: skip


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


_JSON = b"application/json"
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
)
_DONE = _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"

# Templates with %(id)s style fields filled by bytes %-formatting (cheap per request).
_COMPLETION = (
    b'{"id":"cmpl-%(id)d","object":"text_completion","created":%(created)d,"model":"'
    + MODEL.encode()
    + b'","choices":[{"index":0,"text":"%(text)s","logprobs":null,"finish_reason":"length",'
    b'"stop_reason":null,"prompt_logprobs":null,"prompt_token_ids":null,"token_ids":null}],'
    b'"service_tier":null,"system_fingerprint":null,"kv_transfer_params":null,'
    b'"usage":{"prompt_tokens":%(prompt)d,"total_tokens":%(total)d,"completion_tokens":%(n)d,'
    b'"prompt_tokens_details":null,"completion_tokens_details":null}}'
)
_CHAT = (
    b'{"id":"chatcmpl-%(id)d","object":"chat.completion","created":%(created)d,"model":"'
    + MODEL.encode()
    + b'","choices":[{"index":0,"message":{"role":"assistant","content":"%(text)s",'
    b'"refusal":null,"annotations":null,"audio":null,"function_call":null,"tool_calls":[],'
    b'"reasoning":null},"logprobs":null,"finish_reason":"length","stop_reason":null,'
    b'"token_ids":null}],"service_tier":null,"system_fingerprint":null,"prompt_logprobs":null,'
    b'"kv_transfer_params":null,"usage":{"prompt_tokens":%(prompt)d,"total_tokens":%(total)d,'
    b'"completion_tokens":%(n)d,"prompt_tokens_details":null}}'
)
_EVENT = (
    b'data: {"id":"cmpl-%(id)d","object":"text_completion","created":%(created)d,"model":"'
    + MODEL.encode()
    + b'","choices":[{"index":0,"text":" x","logprobs":null,"finish_reason":%(finish)s,'
    b'"stop_reason":null,"prompt_token_ids":null,"token_ids":null}]}\n\n'
)
_CHAT_EVENT = (
    b'data: {"id":"chatcmpl-%(id)d","object":"chat.completion.chunk","created":%(created)d,'
    b'"model":"'
    + MODEL.encode()
    + b'","choices":[{"index":0,"delta":{"content":" x"},"logprobs":null,'
    b'"finish_reason":%(finish)s,"token_ids":null}]}\n\n'
)
_CHAT_ROLE = (
    b'data: {"id":"chatcmpl-%(id)d","object":"chat.completion.chunk","created":%(created)d,'
    b'"model":"'
    + MODEL.encode()
    + b'","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
    b'"finish_reason":null}],"prompt_token_ids":null}\n\n'
)
_USAGE_EVENT = (
    b'data: {"id":"%(pre)s-%(id)d","object":"%(obj)s","created":%(created)d,"model":"'
    + MODEL.encode()
    + b'","choices":[],"usage":{"prompt_tokens":%(prompt)d,"total_tokens":%(total)d,'
    b'"completion_tokens":%(n)d},"system_fingerprint":null}\n\n'
)


def _static(state: MockState, path: str) -> bytes | None:
    """Answers to the GET endpoints (None: not one of them)."""
    if path == "/health":
        return b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
    if path == "/v1/models":
        card = {
            "id": MODEL,
            "object": "model",
            "created": state.created,
            "owned_by": "vllm",
            "root": MODEL,
            "parent": None,
            "max_model_len": 131072,
            "permission": [],
        }
        return _response(b"200 OK", _JSON, _dumps({"object": "list", "data": [card]}))
    if path == "/version":
        return _response(b"200 OK", _JSON, b'{"version":"0.11.0"}')
    if path == "/metrics":
        labels = f'{{engine="0",model_name="{MODEL}"}}'
        served = sum(state.served.values())
        lines = [
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{labels} {state.running}",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{labels} 0.0",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{labels} 0.0",
            "# TYPE vllm:gpu_cache_usage_perc gauge",
            f"vllm:gpu_cache_usage_perc{labels} 0.0",
            "# TYPE vllm:request_success_total counter",
            f'vllm:request_success_total{{engine="0",finished_reason="length",'
            f'model_name="{MODEL}"}} {served}',
        ]
        body = ("\n".join(lines) + "\n").encode()
        return _response(b"200 OK", b"text/plain; version=0.0.4; charset=utf-8", body)
    if path in ("/v1/loads", "/get_load"):
        load = {
            "dp_rank": 0,
            "timestamp": time.time(),
            "num_running_reqs": state.running,
            "num_waiting_reqs": 0,
            "num_reqs": state.running,
            "num_tokens": 0,
            "num_used_tokens": 0,
            "num_total_tokens": 0,
            "max_total_num_tokens": 1_000_000,
            "token_usage": 0.0,
            "gen_throughput": 0.0,
            "cache_hit_rate": 0.0,
            "utilization": 0.0,
            "max_running_requests": 4096,
        }
        out: object = [load]
        if path == "/v1/loads":
            out = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S+00:00"), "loads": [load]}
        return _response(b"200 OK", _JSON, _dumps(out))
    if path == "/mock/stats":
        stats = {"served": dict(state.served), "other_paths": dict(state.other_paths)}
        return _response(b"200 OK", _JSON, _dumps(stats))
    return None


class _Conn(asyncio.Protocol):
    """One client connection; answers requests in order (a stream finishes before the next)."""

    def __init__(self, state: MockState, port: int) -> None:
        self.state, self.port = state, port
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.pending: list[tuple[bytes, bytes, bytes, bool]] = []
        self.streaming = False
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()

    # -- httptools callbacks -------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        req = (self.parser.get_method(), self.url, b"".join(self.body))
        keep = self.parser.should_keep_alive()
        self.url, self.body = b"", []
        if self.streaming:
            self.pending.append((*req, keep))
        else:
            self.answer(*req, keep)

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.write(_response(b"400 Bad Request", _JSON, b'{"error":"bad request"}', True))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    # -- answering -----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def answer(self, method: bytes, url: bytes, body: bytes, keep: bool) -> None:
        path = url.split(b"?", 1)[0].decode("latin-1")
        state = self.state
        if method == b"POST" and path in ("/v1/completions", "/v1/chat/completions"):
            state.served[self.port] += 1
            state.seq += 1
            m = _MAX_TOKENS.search(body)
            n = max(1, int(m.group(1))) if m else 4
            chat = path == "/v1/chat/completions"
            fields = {
                b"id": state.seq,
                b"created": state.created,
                b"prompt": 1 + body.count(b" "),
                b"n": n,
            }
            fields[b"total"] = fields[b"prompt"] + n
            if _STREAM.search(body):
                self.stream(fields, chat, bool(_USAGE.search(body)), keep)
                return
            fields[b"text"] = b" x" * n
            self.write(_response(b"200 OK", _JSON, (_CHAT if chat else _COMPLETION) % fields))
        elif method == b"POST" and path == "/mock/config":
            try:
                cfg = json.loads(body or b"{}")
                state.ttft_s = float(cfg.get("ttft_ms", 0.0)) / 1e3
                state.itl_s = float(cfg.get("itl_ms", 0.0)) / 1e3
            except (ValueError, TypeError, AttributeError) as exc:
                msg = _dumps({"error": f"bad /mock/config body: {exc}"})
                self.write(_response(b"400 Bad Request", _JSON, msg))
            else:
                self.write(_response(b"200 OK", _JSON, b"{}"))
        else:
            out = _static(state, path) if method == b"GET" else None
            if out is None:
                state.other_paths[f"{method.decode()} {path}"] += 1
                err = {"error": {"message": f"Not Found: {path}", "type": "NotFoundError"}}
                out = _response(b"404 Not Found", _JSON, _dumps({**err, "code": 404}))
            elif path not in ("/mock/stats",):
                state.other_paths[f"GET {path}"] += 1
            self.write(out)
        if not keep:
            self.close()

    def stream(self, fields: dict, chat: bool, usage: bool, keep: bool) -> None:
        """Head now; then the events, one write each, paced by ttft_s and itl_s."""
        state, loop = self.state, self.loop
        state.running += 1
        self.streaming = True
        self.write(_SSE_HEAD)
        n = fields[b"n"]
        events: list[bytes] = []
        if chat:
            events.append(_CHAT_ROLE % fields)
        tmpl = _CHAT_EVENT if chat else _EVENT
        for k in range(n):
            fields[b"finish"] = b'"length"' if k == n - 1 else b"null"
            events.append(tmpl % fields)
        if chat and len(events) > 1:  # the role event and the first token leave together
            events[:2] = [events[0] + events[1]]
        tail = b""
        if usage:
            fields[b"pre"], fields[b"obj"] = (
                (b"chatcmpl", b"chat.completion.chunk") if chat else (b"cmpl", b"text_completion")
            )
            tail = _chunk(_USAGE_EVENT % fields)
        events[-1] = _chunk(events[-1]) + tail + _DONE
        for i in range(len(events) - 1):
            events[i] = _chunk(events[i])
        it = iter(events)

        def step() -> None:
            if self.transport is None:  # the client left: stop
                state.running -= 1
                return
            ev = next(it, None)
            if ev is None:
                return
            self.write(ev)
            if ev is events[-1]:
                self.finish_stream(keep)
                return
            if state.itl_s > 0:
                loop.call_later(state.itl_s, step)
            else:
                loop.call_soon(step)

        if state.ttft_s > 0:
            loop.call_later(state.ttft_s, step)
        else:
            loop.call_soon(step)

    def finish_stream(self, keep: bool) -> None:
        self.state.running -= 1
        self.streaming = False
        if not keep:
            self.close()
            return
        while self.pending and not self.streaming:
            self.answer(*self.pending.pop(0))


async def _main(socks: list[socket.socket], state: MockState, ready: object | None) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for sock in socks:
        port = sock.getsockname()[1]
        servers.append(
            await loop.create_server(lambda port=port: _Conn(state, port), sock=sock, backlog=4096)
        )
    if ready is not None:
        ready.set()  # type: ignore[attr-defined]
    await asyncio.gather(*(s.serve_forever() for s in servers))


def listen(port: int = 0) -> socket.socket:
    """A listening socket on 127.0.0.1 (``port`` 0: any free one)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    return sock


def serve(
    socks: list[socket.socket], cpus: set[int] | None = None, ready: object | None = None
) -> None:
    """Serve the mock on listening sockets until killed (the body of a backend process).

    ``cpus``: pin this process to them first. ``ready``: an event to set once serving.
    """
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
    try:
        import uvloop

        uvloop.run(_main(socks, MockState(), ready))
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(_main(socks, MockState(), ready))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, action="append", required=True, help="repeatable")
    ap.add_argument("--cpus", type=int, nargs="*", help="pin to these cores")
    args = ap.parse_args()
    socks = [listen(p) for p in args.port]
    print("mock backends on " + " ".join(f"http://127.0.0.1:{p}" for p in args.port), flush=True)
    serve(socks, set(args.cpus) if args.cpus else None)


if __name__ == "__main__":
    main()
