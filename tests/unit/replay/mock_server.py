"""A small streaming server on 127.0.0.1 that speaks just enough OpenAI and SGLang for replay tests.

It streams ``max_tokens`` tokens (one a chunk, or ``tokens_per_chunk``),
after ``first_token_delay_s`` and ``token_gap_s`` between chunks, and keeps
what each request looked like: when it came (monotonic seconds), its
headers, its body, and how many prompt tokens it had (ids counted, text by
the built-in tokenizer, chat rendered by the shared rendering). Usage comes
back as vLLM and SGLang send it, with ``cached_tokens`` set to
``cached_tokens``. ``status`` answers every request with that error code.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from traces.tokenizer import WordTokenizer, render_chat

__all__ = ["MockServer", "Seen"]


@dataclass
class Seen:
    """One request as the server saw it."""

    path: str
    at_s: float
    headers: dict[str, str]
    body: dict[str, Any]
    prompt_tokens: int
    prompt_ids: list[int] | None


@dataclass
class MockServer:
    """Run with ``with MockServer(...) as server:``; ``server.url`` is its base URL."""

    first_token_delay_s: float = 0.0
    token_gap_s: float = 0.0
    tokens_per_chunk: int = 1
    cached_tokens: int = 0
    status: int | None = None
    seen: list[Seen] = field(default_factory=list)
    url: str = ""

    def __post_init__(self) -> None:
        self._tok = WordTokenizer()
        self.app = self._make_app()

    # -- the app --------------------------------------------------------------------

    def _make_app(self) -> FastAPI:
        app = FastAPI()
        for path in ("/v1/completions", "/v1/chat/completions", "/generate"):
            app.add_api_route(path, self._handler(path), methods=["POST"])
        return app

    def _handler(self, path: str):
        async def handle(request: Request):
            at = time.monotonic()
            body = await request.json()
            ids, n_prompt = self._prompt(path, body)
            self.seen.append(Seen(path, at, dict(request.headers), body, n_prompt, ids))
            if self.status is not None:
                return JSONResponse(
                    {"object": "error", "message": "mock overloaded", "code": self.status},
                    status_code=self.status,
                )
            if path == "/generate":
                n_out = body["sampling_params"]["max_new_tokens"]
            else:
                n_out = body["max_tokens"]
            return StreamingResponse(
                self._stream(path, n_out, n_prompt), media_type="text/event-stream"
            )

        return handle

    def _prompt(self, path: str, body: dict[str, Any]) -> tuple[list[int] | None, int]:
        if path == "/generate":
            if "input_ids" in body:
                return body["input_ids"], len(body["input_ids"])
            return None, self._tok.count(body["text"])
        if path == "/v1/chat/completions":
            return None, self._tok.count(render_chat(body["messages"]))
        prompt = body["prompt"]
        if isinstance(prompt, list):
            return prompt, len(prompt)
        return None, self._tok.count(prompt)

    async def _stream(self, path: str, n_out: int, n_prompt: int):
        await asyncio.sleep(self.first_token_delay_s)
        out_ids: list[int] = []
        sent = 0
        if path == "/v1/chat/completions":
            role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
            yield f"data: {json.dumps(role)}\n\n"
        while sent < n_out:
            k = min(self.tokens_per_chunk, n_out - sent)
            new = [(7 * (sent + j)) % 4096 for j in range(k)]
            out_ids += new
            sent += k
            text = " " + self._tok.decode(new)
            done = sent >= n_out
            if path == "/generate":
                msg: dict[str, Any] = {
                    "text": self._tok.decode(out_ids),
                    "output_ids": list(out_ids),
                    "meta_info": {
                        "id": "x",
                        "finish_reason": {"type": "length", "length": n_out} if done else None,
                        "prompt_tokens": n_prompt,
                        "completion_tokens": sent,
                        "cached_tokens": self.cached_tokens,
                    },
                }
            else:
                usage = {
                    "prompt_tokens": n_prompt,
                    "completion_tokens": sent,
                    "total_tokens": n_prompt + sent,
                }
                if path == "/v1/chat/completions":
                    choice: dict[str, Any] = {"index": 0, "delta": {"content": text}}
                else:
                    choice = {"index": 0, "text": text}
                choice["finish_reason"] = "length" if done else None
                msg = {"object": "text_completion", "choices": [choice], "usage": usage}
            yield f"data: {json.dumps(msg)}\n\n"
            if not done and self.token_gap_s:
                await asyncio.sleep(self.token_gap_s)
        if path != "/generate":
            final = {
                "choices": [],
                "usage": {
                    "prompt_tokens": n_prompt,
                    "completion_tokens": n_out,
                    "total_tokens": n_prompt + n_out,
                    "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
                },
            }
            yield f"data: {json.dumps(final)}\n\n"
        yield "data: [DONE]\n\n"

    # -- running --------------------------------------------------------------------

    def __enter__(self) -> MockServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._sock = sock
        port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(self.app, log_level="error", lifespan="off", loop="asyncio")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("mock server did not start within 10 s")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()
