"""Backends on the wire: sending a request upstream, relaying its stream, and both PD handshakes.

A :class:`Backend` is one server: its config, a keep-alive connection
pool (:class:`traces.replay.http.HttpPool`, an ``asyncio.Protocol`` per
connection; asyncio turns Nagle off on every TCP socket it makes, so a
streamed chunk leaves as soon as it is written) and the headers it gets.

Relaying a stream (:class:`StreamRelay`): the server's body is cut into
server-sent events as it arrives and every complete event is passed on at
once, in one write per piece received, so nothing is held back for
batching. On the way the relay notes

* the first token: the first event with content (a chat stream's first
  event carries only the role);
* usage: the router always asks an OpenAI server for it
  (``stream_options.include_usage``) and drops the usage-only event when
  the client did not ask, as vLLM would not have sent it; SGLang's
  ``/generate`` reports counts in every event's ``meta_info``;
* an in-stream error event, which ends the request as an error.

Prefill/decode handshakes (:func:`sglang_pd_bodies`, :func:`vllm_prefill_body`):

* SGLang: the same body, with ``bootstrap_host`` (the prefill server's
  host), ``bootstrap_port`` and a random 63-bit ``bootstrap_room``, goes to
  the prefill and the decode server at once; the client gets the decode
  server's answer.
* vLLM (the NIXL connector): the prefill server gets the request with
  ``max_tokens`` 1, no stream, and ``kv_transfer_params``
  ``do_remote_decode``; its answer's ``kv_transfer_params`` go into the
  decode request, whose answer the client gets.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any
from urllib.parse import urlsplit

import orjson

from scheduler.router.config import BackendConfig
from traces.replay.http import HttpPool

__all__ = [
    "DEFAULT_BOOTSTRAP_PORT",
    "Backend",
    "StreamRelay",
    "sglang_pd_body",
    "usage_of",
    "vllm_decode_body",
    "vllm_prefill_body",
]

#: SGLang's default ``--disaggregation-bootstrap-port``.
DEFAULT_BOOTSTRAP_PORT = 8998
_DONE = b"[DONE]"


class Backend:
    """One server behind the router."""

    __slots__ = ("config", "headers", "host", "instance_id", "label", "pool")

    def __init__(self, config: BackendConfig, instance_id: int, connect_timeout_s: float) -> None:
        self.config = config
        self.instance_id = instance_id
        self.label = config.label
        self.host = urlsplit(config.url).hostname or ""
        self.pool = HttpPool(config.url, connect_timeout_s)
        headers = {"content-type": "application/json"}
        if config.api_key is not None:
            headers["authorization"] = f"Bearer {config.api_key.get_secret_value()}"
        self.headers = headers

    @property
    def auth_headers(self) -> dict[str, str]:
        """The headers a GET to the server needs (its API key)."""
        return {k: v for k, v in self.headers.items() if k == "authorization"}

    def close(self) -> None:
        self.pool.close()

    def __repr__(self) -> str:
        return f"Backend({self.instance_id}, {self.label})"


def usage_of(data: Any) -> tuple[int, int, int]:
    """``(prompt, cached, completion)`` tokens from an OpenAI ``usage`` or SGLang ``meta_info`` (-1: unknown)."""
    if not isinstance(data, dict):
        return -1, -1, -1
    usage = data.get("usage")
    if isinstance(usage, dict):
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        return (
            _int(usage.get("prompt_tokens")),
            _int(cached),
            _int(usage.get("completion_tokens")),
        )
    meta = data.get("meta_info")
    if isinstance(meta, dict):
        return (
            _int(meta.get("prompt_tokens")),
            _int(meta.get("cached_tokens")),
            _int(meta.get("completion_tokens")),
        )
    return -1, -1, -1


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else -1


class StreamRelay:
    """Cuts a server-sent-event body into events and says what passes on (see the module doc).

    Args:
        endpoint: ``completions``, ``chat`` or ``generate``.
        keep_usage: pass the usage-only event on (the client asked for it).
    """

    __slots__ = (
        "_buf",
        "_keep_usage",
        "_last",
        "chat",
        "endpoint",
        "error",
        "events",
        "first",
        "usage",
    )

    def __init__(self, endpoint: str, keep_usage: bool) -> None:
        self.endpoint = endpoint
        self.chat = endpoint == "chat"
        self._keep_usage = keep_usage
        self._buf = b""
        self._last: bytes | None = None
        #: Whether an event with content has passed.
        self.first = False
        #: Events with content passed on.
        self.events = 0
        self.usage: tuple[int, int, int] = (-1, -1, -1)
        #: The message of an in-stream error event, if one came.
        self.error: str | None = None

    def feed(self, piece: bytes) -> tuple[bytes, int]:
        """The bytes to pass on for this piece, and how many of its events carried content."""
        buf = self._buf + piece if self._buf else piece
        end = buf.rfind(b"\n\n")
        if end < 0:
            self._buf = buf
            return b"", 0
        self._buf = buf[end + 2 :]
        whole = buf[: end + 2]
        out: list[bytes] | None = None
        content = 0
        start = 0
        for event in whole.split(b"\n\n")[:-1]:
            keep, has = self._event(event)
            content += has
            if not keep:
                if out is None:
                    out = [whole[:start]] if start else []
            elif out is not None:
                out.append(event + b"\n\n")
            start += len(event) + 2
        if content:
            self.events += content
        if out is None:
            return whole, content
        return b"".join(out), content

    def _event(self, event: bytes) -> tuple[bool, int]:
        """(pass it on, 1 if it carried content)."""
        data = event
        if data.startswith(b"data:"):
            data = data[5:].lstrip()
        elif not data.strip() or data.startswith(b":"):
            return True, 0  # a comment or keep-alive
        else:
            # A field other than data (id:, event:): look for the data line.
            for line in data.split(b"\n"):
                if line.startswith(b"data:"):
                    data = line[5:].lstrip()
                    break
            else:
                return True, 0
        if data == _DONE:
            return True, 0
        if self.endpoint == "generate":
            self._last = data
            if not self.first:
                self.first = self._generate_has_content(data)
                return True, int(self.first)
            return True, 1
        if b'"usage"' in data and (b'"choices":[]' in data or b'"choices": []' in data):
            with contextlib.suppress(orjson.JSONDecodeError):
                self.usage = usage_of(orjson.loads(data))
            return self._keep_usage, 0
        if b'"error"' in data[:20]:
            self._set_error(data)
            return True, 0
        if self.first:
            if b'"usage"' in data:
                self._note_usage(data)
            return True, 1
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            return True, 0
        if isinstance(msg, dict) and msg.get("error"):
            self._set_error(data)
            return True, 0
        if isinstance(msg, dict) and isinstance(msg.get("usage"), dict):
            self.usage = usage_of(msg)
        has = _openai_has_content(msg, self.chat)
        self.first = has
        return True, int(has)

    def _note_usage(self, data: bytes) -> None:
        with contextlib.suppress(orjson.JSONDecodeError):
            self.usage = usage_of(orjson.loads(data))

    def _set_error(self, data: bytes) -> None:
        try:
            msg = orjson.loads(data)
            err = msg.get("error") if isinstance(msg, dict) else None
            text = err.get("message") if isinstance(err, dict) else err
            self.error = str(text or data[:300].decode("utf-8", "replace"))
        except orjson.JSONDecodeError:
            self.error = data[:300].decode("utf-8", "replace")

    @staticmethod
    def _generate_has_content(data: bytes) -> bool:
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(msg, dict):
            return False
        meta = msg.get("meta_info")
        if isinstance(meta, dict) and isinstance(meta.get("completion_tokens"), int):
            return meta["completion_tokens"] > 0
        return bool(msg.get("text") or msg.get("output_ids"))

    def finish(self) -> bytes:
        """What is left unpassed at the end of the body (an unterminated last event)."""
        rest, self._buf = self._buf, b""
        if self.endpoint == "generate" and self._last is not None and self.usage[2] < 0:
            with contextlib.suppress(orjson.JSONDecodeError):
                self.usage = usage_of(orjson.loads(self._last))
        return rest


def _openai_has_content(msg: Any, chat: bool) -> bool:
    if not isinstance(msg, dict):
        return False
    choices = msg.get("choices")
    if not choices or not isinstance(choices, list):
        return False
    choice = choices[0]
    if not isinstance(choice, dict):
        return False
    if chat:
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return False
        return bool(
            delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls")
        )
    return bool(choice.get("text"))


def sglang_pd_body(body: dict[str, Any], prefill: Backend) -> dict[str, Any]:
    """The body both servers of an SGLang PD pair get: ``body`` with the bootstrap fields."""
    out = dict(body)
    out["bootstrap_host"] = prefill.host
    out["bootstrap_port"] = prefill.config.bootstrap_port or DEFAULT_BOOTSTRAP_PORT
    out["bootstrap_room"] = random.getrandbits(63)
    return out


#: What vLLM's prefill server is asked for (the NIXL connector's fields).
_VLLM_PREFILL_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def vllm_prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The prefill leg of vLLM's PD flow: one token, no stream, ``kv_transfer_params`` to decode remotely."""
    out = dict(body)
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    out["stream"] = False
    out.pop("stream_options", None)
    out["kv_transfer_params"] = dict(_VLLM_PREFILL_PARAMS)
    return out


def vllm_decode_body(body: dict[str, Any], prefill_answer: bytes) -> dict[str, Any]:
    """The decode leg: ``body`` with the prefill's ``kv_transfer_params``.

    Raises:
        ValueError: the prefill's answer has none (it is not a PD prefill server).
    """
    try:
        answer = orjson.loads(prefill_answer)
    except orjson.JSONDecodeError:
        raise ValueError("the prefill server's answer is not JSON") from None
    params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
    if not isinstance(params, dict):
        raise ValueError(
            "the prefill server's answer has no kv_transfer_params: is it a vLLM server with "
            "a KV connector in the producer role?"
        )
    out = dict(body)
    out["kv_transfer_params"] = params
    return out
