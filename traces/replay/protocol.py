"""The wire: request bodies and streamed chunks of the OpenAI (vLLM, SGLang) and SGLang APIs.

Three endpoints, all streamed as server-sent events (``data: {...}`` lines,
ending with ``data: [DONE]``):

``completions`` (``POST /v1/completions``)
    ``prompt`` is the list of token ids (vLLM and SGLang take one) or the
    text. ``max_tokens`` with vLLM's and SGLang's ``min_tokens`` and
    ``ignore_eos`` holds the output to the trace's length;
    ``stream_options`` asks for ``include_usage`` (the last chunk, with
    ``choices: []``, carries ``usage``) and ``continuous_usage_stats``
    (every chunk carries the running ``usage``, so tokens per chunk are
    exact). A chunk's text is ``choices[0].text``.
``chat`` (``POST /v1/chat/completions``)
    One user message of the prompt's text; the same length fields; a
    chunk's text is ``choices[0].delta.content`` (or ``reasoning_content``);
    the first chunk, with only the role, carries no token.
``generate`` (SGLang's ``POST /generate``)
    ``input_ids`` or ``text``; ``sampling_params`` with ``max_new_tokens``,
    ``min_new_tokens`` and ``ignore_eos``. Each chunk has ``text`` and
    ``output_ids`` (cumulative, or only the new part under SGLang's
    ``--incremental-streaming-output``) and ``meta_info`` with the running
    ``completion_tokens`` and ``prompt_tokens``, ``cached_tokens``.

Usage read back: prompt tokens, cached tokens (OpenAI's
``usage.prompt_tokens_details.cached_tokens``, which vLLM fills when run
with ``--enable-prompt-tokens-details``; SGLang's ``meta_info.cached_tokens``)
and completion tokens. Where a server gives no running count, a chunk's
tokens are its text's as the tokenizer counts them (at least one).
An error inside a stream (``data: {"error": ...}``) ends the request as an
error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from traces.tokenizer import Tokenizer, render_chat

__all__ = [
    "ENDPOINTS",
    "PROTOCOL_ENDPOINTS",
    "Endpoint",
    "StreamState",
    "error_message",
    "request_body",
]

Endpoint = Literal["completions", "chat", "generate"]

#: Endpoint name -> URL path.
ENDPOINTS: dict[str, str] = {
    "completions": "/v1/completions",
    "chat": "/v1/chat/completions",
    "generate": "/generate",
}

#: Endpoints each protocol offers; the first is the default.
PROTOCOL_ENDPOINTS: dict[str, tuple[str, ...]] = {
    "openai": ("completions", "chat"),
    "sglang": ("generate", "completions", "chat"),
}


def chat_overhead(tokenizer: Tokenizer) -> int:
    """Tokens the built-in chat rendering adds around one user message's content."""
    return tokenizer.count(render_chat([{"role": "user", "content": ""}]))


def request_body(
    endpoint: str,
    prompt: list[int] | str,
    max_tokens: int,
    model: str | None,
) -> bytes:
    """The JSON body of one streamed request (``prompt``: token ids or text)."""
    body: dict[str, Any]
    if endpoint == "generate":
        body = {"input_ids" if isinstance(prompt, list) else "text": prompt}
        body["sampling_params"] = {
            "max_new_tokens": max_tokens,
            "min_new_tokens": max_tokens,
            "ignore_eos": True,
        }
        body["stream"] = True
    else:
        body = {"model": model} if model else {}
        if endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        body.update(
            max_tokens=max_tokens,
            min_tokens=max_tokens,
            ignore_eos=True,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )
    return json.dumps(body, separators=(",", ":")).encode()


def error_message(body: bytes) -> str:
    """A readable message from an error body: OpenAI's, vLLM's, SGLang's or FastAPI's shape."""
    text = body[:2000].decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:300] or "(empty body)"
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            for key in ("message", "detail", "msg"):
                if isinstance(err.get(key), str):
                    return err[key][:300]
            if isinstance(err.get("detail"), list):
                return json.dumps(err["detail"])[:300]
        elif isinstance(err, str):
            return err[:300]
    return text[:300]


@dataclass(slots=True)
class StreamState:
    """What one request's stream has said so far.

    :meth:`feed` takes each event's JSON text and returns the tokens it
    carried (0 for a chunk without content: the role, the usage, a keep-alive).
    """

    endpoint: str
    tokenizer: Tokenizer
    completion_tokens: int = 0
    prompt_tokens: int = -1
    cached_tokens: int = 0
    text_parts: list[str] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    error: str | None = None
    error_status: int | None = None
    finish_reason: str | None = None

    def feed(self, data: bytes) -> int:
        """Parse one event's data; the tokens it carried (``error`` set on an in-stream error)."""
        try:
            msg = json.loads(data)
        except ValueError:
            return 0
        if not isinstance(msg, dict):
            return 0
        if msg.get("error"):
            err = msg["error"]
            self.error = error_message(json.dumps(msg).encode())
            code = err.get("code") if isinstance(err, dict) else None
            self.error_status = code if isinstance(code, int) else None
            return 0
        if self.endpoint == "generate":
            return self._feed_generate(msg)
        return self._feed_openai(msg)

    def _feed_generate(self, msg: dict[str, Any]) -> int:
        meta = msg.get("meta_info") or {}
        done = meta.get("completion_tokens")
        ids = msg.get("output_ids")
        text = msg.get("text")
        before = self.completion_tokens
        if isinstance(done, int):
            new = done - before
        else:
            new = len(ids) if isinstance(ids, list) else 0
            done = before + new
        if isinstance(ids, list):
            # Cumulative unless the server streams increments: tell by length.
            if len(ids) == done and len(ids) >= len(self.output_ids):
                self.output_ids = list(ids)
            else:
                self.output_ids.extend(ids)
        if isinstance(text, str):
            whole = "".join(self.text_parts)
            if text.startswith(whole) and (not ids or len(ids) == done):
                self.text_parts = [text]
            else:
                self.text_parts.append(text)
        self.completion_tokens = max(before, done)
        if isinstance(meta.get("prompt_tokens"), int):
            self.prompt_tokens = meta["prompt_tokens"]
        if isinstance(meta.get("cached_tokens"), int):
            self.cached_tokens = meta["cached_tokens"]
        reason = meta.get("finish_reason")
        if reason:
            self.finish_reason = reason.get("type") if isinstance(reason, dict) else str(reason)
        return max(new, 0)

    def _feed_openai(self, msg: dict[str, Any]) -> int:
        text = ""
        choices = msg.get("choices") or ()
        if choices:
            choice = choices[0]
            if self.endpoint == "chat":
                delta = choice.get("delta") or {}
                text = delta.get("content") or delta.get("reasoning_content") or ""
            else:
                text = choice.get("text") or ""
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        usage = msg.get("usage")
        before = self.completion_tokens
        if isinstance(usage, dict):
            self._read_usage(usage, final=not choices)
        if text:
            self.text_parts.append(text)
            if self.completion_tokens > before:
                return self.completion_tokens - before
            # No running count from the server: count the text.
            n = max(1, self.tokenizer.count(text))
            self.completion_tokens = before + n
            return n
        return 0

    def _read_usage(self, usage: dict[str, Any], final: bool) -> None:
        done = usage.get("completion_tokens")
        if isinstance(done, int):
            # The usage-only last chunk is the server's own count: it beats a text-based guess.
            self.completion_tokens = done if final else max(self.completion_tokens, done)
        if isinstance(usage.get("prompt_tokens"), int):
            self.prompt_tokens = usage["prompt_tokens"]
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            self.cached_tokens = details["cached_tokens"]

    @property
    def text(self) -> str:
        """The response text so far."""
        return "".join(self.text_parts)

    def response_ids(self) -> list[int]:
        """The response's token ids: the server's where it sent them, else the text encoded."""
        if self.output_ids:
            return self.output_ids
        return self.tokenizer.encode(self.text)
