"""The HTTP face of an emulated instance: vLLM's or SGLang's API over one :class:`EmulatedInstance`.

Both protocols serve the OpenAI endpoints (``/v1/completions``,
``/v1/chat/completions``, streamed as server-sent events or not),
``/v1/models``, ``/health`` and ``/metrics``; then

* ``vllm``: ``/tokenize``, ``/version``; errors as vLLM sends them
  (``{"error": {"message", "type", "param", "code"}}``), metric names
  ``vllm:*``;
* ``sglang``: ``/generate`` (text or ``input_ids``, ``sampling_params``,
  cumulative streamed text with ``meta_info``), ``/health_generate``,
  ``/get_model_info`` and ``/model_info``, ``/get_server_info`` and
  ``/server_info``, ``/v1/loads``, ``/get_load``, ``/flush_cache``; OpenAI
  errors as SGLang sends them (``{"object": "error", "message", "type",
  "param", "code"}``), metric names ``sglang:*``.

Usage rules are vLLM's: a streamed response carries usage only when asked
(``stream_options.include_usage``: a last chunk with empty ``choices``;
``continuous_usage_stats``: usage on every chunk). Usage always reports
``prompt_tokens_details.cached_tokens`` (vLLM does with
``--enable-prompt-tokens-details``), since the prefix cache is much of what
the emulator is for.

Simplifications: one prompt and one choice per request (``n`` above 1 and
batched prompts get a 400); sampling parameters are accepted and ignored;
the output is always ``max_tokens`` tokens (:mod:`sim.emulator.instance`).
A request without a budget gets the real server's default (16 for vLLM's
completions, 128 for SGLang's ``max_new_tokens``), except chat completions,
where vLLM's default (the rest of the context window) would be thousands of
emulated tokens: they get :data:`DEFAULT_CHAT_MAX_TOKENS`. Prompts are
counted by the instance's tokenizer; chat messages are rendered with
:func:`traces.tokenizer.render_chat`, not the model's template.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from sim.emulator.faults import error_body
from sim.emulator.instance import EmulatedInstance, Rejected, TokenStream
from sim.emulator.metrics import METRICS_CONTENT_TYPE, SglangMetrics, VllmMetrics
from sim.emulator.pd import Handshake, PdRole
from traces.errors import ConfigError
from traces.tokenizer import render_chat

__all__ = ["DEFAULT_CHAT_MAX_TOKENS", "EMULATED_VERSIONS", "PROTOCOLS", "build_app"]

#: The wire protocols served.
PROTOCOLS: tuple[str, ...] = ("sglang", "vllm")
#: What ``/version`` and ``/get_server_info`` say (the API versions imitated).
EMULATED_VERSIONS = {"vllm": "0.11.0", "sglang": "0.5.3"}
#: ``max_tokens`` of a chat completion that gives none.
DEFAULT_CHAT_MAX_TOKENS = 256
_DEFAULT_COMPLETION_MAX_TOKENS = 16
_DEFAULT_MAX_NEW_TOKENS = 128
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    """OpenAI's ``stream_options``."""

    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class _OpenAIBody(_Body):
    model: str | None = None
    max_tokens: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None


class CompletionBody(_OpenAIBody):
    """``POST /v1/completions``."""

    prompt: str | list[int] | list[str] | list[list[int]]


class ChatBody(_OpenAIBody):
    """``POST /v1/chat/completions``."""

    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None


class SamplingParams(_Body):
    """SGLang's ``sampling_params`` (only the budget matters here)."""

    max_new_tokens: int | None = _DEFAULT_MAX_NEW_TOKENS
    min_new_tokens: int = 0
    ignore_eos: bool = False
    temperature: float | None = None


class GenerateBody(_Body):
    """SGLang's ``POST /generate``."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: SamplingParams = Field(default_factory=SamplingParams)
    stream: bool = False
    rid: str | None = None


class TokenizeBody(_Body):
    """vLLM's ``POST /tokenize``."""

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    model: str | None = None


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def build_app(
    instance: EmulatedInstance,
    protocol: Literal["sglang", "vllm"],
    model: str,
    *,
    context_length: int,
    pd: PdRole | None = None,
) -> FastAPI:
    """The FastAPI app serving ``instance`` over ``protocol`` as model ``model``.

    ``context_length``: the model's context window (tokens); prompt plus
    budget may not exceed it; ``pd``: the instance's prefill or decode role
    and its handshakes (:mod:`sim.emulator.pd`), None for a regular server.
    The instance must be started on the loop that serves the app.

    Raises:
        ConfigError: an unknown protocol.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol: expected one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    app = FastAPI(title=f"llmsched emulated {protocol}", docs_url=None, redoc_url=None)
    metrics = (VllmMetrics if protocol == "vllm" else SglangMetrics)(instance, model)
    vllm = protocol == "vllm"
    tok = instance.tokenizer
    created_at = int(time.time())

    def error(path: str, status: int, message: str, param: str | None) -> JSONResponse:
        body = error_body(protocol, path, status, message, param)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        return error(request.url.path, 400, _describe(errors), _param_of(errors))

    @app.exception_handler(_BadRequest)
    async def _bad(request: Request, exc: _BadRequest) -> JSONResponse:
        return error(request.url.path, exc.status, exc.message, exc.param)

    # -- shared pieces ------------------------------------------------------------

    def check_model(name: str | None) -> None:
        if vllm and name is not None and name != model:
            raise _BadRequest(f"The model `{name}` does not exist.", "model", 404)

    def budget(prompt_ids: list[int], max_tokens: int | None, default: int) -> int:
        if not prompt_ids:
            raise _BadRequest("The prompt cannot be empty.", "prompt")
        n = default if max_tokens is None else max_tokens
        if n < 1:
            raise _BadRequest(f"max_tokens must be at least 1, got {n}.", "max_tokens")
        if len(prompt_ids) + n > context_length:
            raise _BadRequest(
                f"This model's maximum context length is {context_length} tokens. However, you "
                f"requested {len(prompt_ids) + n} tokens ({len(prompt_ids)} in the messages, "
                f"{n} in the completion). Please reduce the length of the messages or completion.",
                "max_tokens",
            )
        return n

    def submit(
        prompt_ids: list[int], max_tokens: int, request_id: str, body: _Body | None = None
    ) -> TokenStream:
        try:
            if pd is not None:
                extra = (body.model_extra if body is not None else None) or {}
                return pd.submit(prompt_ids, max_tokens, request_id, extra)
            return instance.submit(prompt_ids, max_tokens, request_id)
        except Rejected as exc:
            raise _BadRequest(str(exc), "max_tokens") from None
        except Handshake as exc:
            raise _BadRequest(str(exc)) from None

    async def finished(s: TokenStream) -> None:
        await s.finished()
        if s.error is not None:
            raise _BadRequest(s.error, status=500)

    def pd_fields(s: TokenStream) -> dict[str, Any]:
        return pd.response_fields(s) if pd is not None else {}

    def usage(s: TokenStream, completion: int | None = None) -> dict[str, Any]:
        c = s.n_tokens if completion is None else completion
        return {
            "prompt_tokens": s.prompt_tokens,
            "total_tokens": s.prompt_tokens + c,
            "completion_tokens": c,
            "prompt_tokens_details": {"cached_tokens": s.cached_tokens},
        }

    def final_usage(s: TokenStream) -> dict[str, Any]:
        """Usage of a non-streamed response (vLLM names completion_tokens_details there)."""
        out = usage(s)
        if vllm:
            out["completion_tokens_details"] = None
        return out

    def prompt_of(body: CompletionBody) -> list[int]:
        p = body.prompt
        if isinstance(p, str):
            return tok.encode(p)
        if p and all(isinstance(x, int) for x in p):
            return list(p)  # type: ignore[arg-type]
        if isinstance(p, list) and len(p) == 1:
            one = p[0]
            return tok.encode(one) if isinstance(one, str) else list(one)  # type: ignore[arg-type]
        if not p:
            return []
        raise _BadRequest("the emulator serves one prompt per request", "prompt")

    def check_openai(body: _OpenAIBody, max_tokens: int) -> None:
        """vLLM's checks of the parameters the emulator reads."""
        if body.n != 1:
            raise _BadRequest("the emulator serves n=1 only", "n")
        if body.stream_options is not None and not body.stream:
            raise _BadRequest(
                "Stream options can only be defined when `stream=True`.", "stream_options"
            )
        if body.min_tokens > max_tokens:
            raise _BadRequest(
                f"min_tokens must be less than or equal to max_tokens={max_tokens}, "
                f"got {body.min_tokens}.",
                "min_tokens",
            )

    def req_id(request: Request, prefix: str) -> str:
        given = request.headers.get("x-request-id")
        return f"{prefix}{given}" if given else f"{prefix}{uuid.uuid4().hex}"

    def sse(
        s: TokenStream,
        chunk: Callable[[int, int, bool], dict],
        body: _OpenAIBody,
        first: dict | None,
    ) -> StreamingResponse:
        opts = body.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(opts and opts.include_usage and opts.continuous_usage_stats)

        async def events() -> AsyncIterator[bytes]:
            seen = 0
            while seen < s.max_tokens:
                n = await s.wait(seen)
                if n == seen:
                    if s.done:  # ended short (a PD transfer that never came)
                        break
                    continue
                parts = []
                if seen == 0 and first is not None:
                    if continuous:
                        first["usage"] = usage(s, 0)
                    parts.append(b"data: " + _dumps(first).encode() + b"\n\n")
                last = n >= s.max_tokens
                c = chunk(seen, n, last)
                if continuous:
                    c["usage"] = usage(s, n)
                if vllm and last and not include_usage:
                    c["system_fingerprint"] = _FINGERPRINT  # vLLM: on the stream's final chunk
                parts.append(b"data: " + _dumps(c).encode() + b"\n\n")
                seen = n
                yield b"".join(parts)
            if include_usage:
                yield b"data: " + _dumps(tail(s)).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        def tail(s: TokenStream) -> dict:
            out = dict(head)
            out["choices"] = []
            out["usage"] = usage(s)
            if vllm:
                out["system_fingerprint"] = _FINGERPRINT
            return out

        head = {k: v for k, v in chunk(0, 0, False).items() if k != "choices"}
        return StreamingResponse(events(), media_type="text/event-stream")

    # -- OpenAI endpoints ---------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Any:
        check_model(body.model)
        ids = prompt_of(body)
        n = budget(ids, body.max_tokens, _DEFAULT_COMPLETION_MAX_TOKENS)
        check_openai(body, n)
        rid = req_id(request, "cmpl-")
        s = submit(ids, n, rid, body)
        created = int(time.time())
        name = body.model or model

        def chunk(a: int, b: int, last: bool) -> dict:
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": name,
                "choices": [
                    {
                        "index": 0,
                        "text": instance.output_text(a, b),
                        "logprobs": None,
                        "finish_reason": "length" if last else None,
                        "stop_reason": None,
                        **({"prompt_token_ids": None, "token_ids": None} if vllm else {}),
                    }
                ],
            }

        if body.stream:
            return sse(s, chunk, body, None)
        await finished(s)
        out = chunk(0, s.n_tokens, True)
        out["choices"][0]["prompt_logprobs"] = None
        if vllm:
            out["choices"][0]["routed_experts"] = None
            out |= _VLLM_RESPONSE_NULLS
        out["usage"] = final_usage(s)
        out.update(pd_fields(s))
        return JSONResponse(out)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request) -> Any:
        check_model(body.model)
        try:
            ids = tok.encode(render_chat(body.messages))
        except ConfigError as exc:
            raise _BadRequest(str(exc), "messages") from None
        limit = (
            body.max_completion_tokens
            if body.max_completion_tokens is not None
            else body.max_tokens
        )
        n = budget(ids, limit, DEFAULT_CHAT_MAX_TOKENS)
        check_openai(body, n)
        rid = req_id(request, "chatcmpl-")
        s = submit(ids, n, rid, body)
        created = int(time.time())
        name = body.model or model

        def frame(delta: dict, finish: str | None) -> dict:
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": name,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }

        def chunk(a: int, b: int, last: bool) -> dict:
            out = frame({"content": instance.output_text(a, b)}, "length" if last else None)
            if vllm:
                choice = out["choices"][0]
                choice["token_ids"] = None
                if last:
                    choice["stop_reason"] = None
            return out

        if body.stream:
            first = frame({"role": "assistant", "content": ""}, None)
            if vllm:
                first |= {"prompt_token_ids": None, "prompt_text": None}
            return sse(s, chunk, body, first)
        await finished(s)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": instance.output_text(0, s.n_tokens),
        }
        choice: dict[str, Any] = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
        }
        out: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": name,
            "choices": [choice],
        }
        if vllm:
            # vLLM names every optional field, null when unused; no tool calls: no key.
            message |= dict.fromkeys(("refusal", "annotations", "audio", "function_call"))
            message["reasoning"] = None
            choice |= {"token_ids": None, "routed_experts": None}
            out |= _VLLM_RESPONSE_NULLS
            out |= {"prompt_logprobs": None, "prompt_text": None, "prompt_token_ids": None}
        else:
            message["tool_calls"] = []
        out["usage"] = final_usage(s)
        out.update(pd_fields(s))
        return JSONResponse(out)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {
            "id": model,
            "object": "model",
            "created": created_at,
            "owned_by": "vllm" if vllm else "sglang",
            "root": model,
            "parent": None,
            "max_model_len": context_length,
        }
        if vllm:
            card["permission"] = [
                {
                    "id": f"modelperm-{uuid.uuid4().hex}",
                    "object": "model_permission",
                    "created": created_at,
                    "allow_create_engine": False,
                    "allow_sampling": True,
                    "allow_logprobs": True,
                    "allow_search_indices": False,
                    "allow_view": True,
                    "allow_fine_tuning": False,
                    "organization": "*",
                    "group": None,
                    "is_blocking": False,
                }
            ]
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    if pd is not None:

        @app.get("/emulator/pd")
        async def pd_stats() -> dict:
            return pd.stats()

    if vllm:
        _vllm_routes(app, instance, model, context_length)
    else:
        _sglang_routes(
            app, instance, model, context_length, submit, budget, created_at, pd, finished
        )
    return app


def _vllm_routes(app: FastAPI, instance: EmulatedInstance, model: str, context_length: int) -> None:
    tok = instance.tokenizer

    @app.post("/tokenize")
    async def tokenize(body: TokenizeBody) -> dict:
        if body.prompt is not None:
            ids = tok.encode(body.prompt)
        elif body.messages is not None:
            try:
                ids = tok.encode(render_chat(body.messages))
            except ConfigError as exc:
                raise _BadRequest(str(exc), "messages") from None
        else:
            raise _BadRequest("either prompt or messages is required", "prompt")
        return {
            "count": len(ids),
            "max_model_len": context_length,
            "tokens": ids,
            "token_strs": None,
        }

    @app.get("/version")
    async def version() -> dict:
        return {"version": EMULATED_VERSIONS["vllm"]}


def _sglang_routes(
    app: FastAPI,
    instance: EmulatedInstance,
    model: str,
    context_length: int,
    submit: Callable[..., TokenStream],
    budget: Callable[[list[int], int | None, int], int],
    created_at: int,
    pd: PdRole | None,
    finished: Callable[[TokenStream], Awaitable[None]],
) -> None:
    tok = instance.tokenizer
    limits = instance.limits

    def meta(s: TokenStream, done: bool) -> dict:
        return {
            "id": s.request_id,
            "finish_reason": {"type": "length", "length": s.n_tokens} if done else None,
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.n_tokens,
            "cached_tokens": s.cached_tokens,
            "e2e_latency": (s.last_token_s - s.arrival_s) if s.n_tokens else 0.0,
        }

    @app.post("/generate")
    async def generate(body: GenerateBody, request: Request) -> Any:
        if body.input_ids is not None:
            ids = body.input_ids
            if ids and isinstance(ids[0], list):
                if len(ids) != 1:
                    raise _BadRequest("the emulator serves one prompt per request")
                ids = ids[0]
            ids = list(ids)  # type: ignore[arg-type]
        elif body.text is not None:
            text = body.text
            if isinstance(text, list):
                if len(text) != 1:
                    raise _BadRequest("the emulator serves one prompt per request")
                text = text[0]
            ids = tok.encode(text)
        else:
            raise _BadRequest("Either text or input_ids should be provided.")
        sp = body.sampling_params
        n = budget(ids, sp.max_new_tokens, _DEFAULT_MAX_NEW_TOKENS)
        rid = body.rid or request.headers.get("x-request-id") or uuid.uuid4().hex
        s = submit(ids, n, rid, body)
        if not body.stream:
            await finished(s)
            return JSONResponse(
                {
                    "text": instance.output_text(0, s.n_tokens),
                    "output_ids": instance.output_ids(0, s.n_tokens),
                    "meta_info": meta(s, True),
                }
            )

        async def events() -> AsyncIterator[bytes]:
            seen = 0
            while seen < s.max_tokens:
                got = await s.wait(seen)
                if got == seen:
                    if s.done:  # ended short (a PD transfer that never came)
                        break
                    continue
                seen = got
                out = {
                    "text": instance.output_text(0, got),
                    "output_ids": instance.output_ids(0, got),
                    "meta_info": meta(s, got >= s.max_tokens),
                }
                yield b"data: " + _dumps(out).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health_generate")
    async def health_generate() -> Response:
        return Response(status_code=200)

    async def model_info() -> dict:
        return {
            "model_path": model,
            "tokenizer_path": instance.tokenizer.name,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": None,
            "architectures": None,
        }

    async def server_info() -> dict:
        return {
            "model_path": model,
            "served_model_name": model,
            "tokenizer_path": instance.tokenizer.name,
            "context_length": context_length,
            "max_running_requests": limits.max_running_requests,
            "max_prefill_tokens": limits.max_prefill_tokens,
            "chunked_prefill_size": limits.chunked_prefill_size,
            "max_total_tokens": limits.max_total_tokens,
            "cuda_graph_max_bs": limits.cuda_graph_max_bs,
            "enable_mixed_chunk": limits.mixed_chunk,
            "page_size": instance.block_tokens,
            "disaggregation_mode": "null",
            "internal_states": [
                {
                    "last_gen_throughput": 0.0,
                    "max_total_num_tokens": limits.max_total_tokens,
                    "avg_spec_accept_length": None,
                }
            ],
            "version": EMULATED_VERSIONS["sglang"],
            **(pd.server_info() if pd is not None else {}),
        }

    for path in ("/get_model_info", "/model_info"):
        app.get(path)(model_info)
    for path in ("/get_server_info", "/server_info"):
        app.get(path)(server_info)

    def load() -> dict:
        waiting_tokens = sum(r.prompt_tokens for r in instance.engine.waiting)
        prompt = instance.prompt_tokens_total
        return {
            "dp_rank": 0,
            "timestamp": time.time(),
            "num_running_reqs": instance.n_running,
            "num_waiting_reqs": instance.n_waiting,
            "num_used_tokens": instance.kv_used_tokens,
            "num_total_tokens": instance.kv_used_tokens + waiting_tokens,
            "max_total_num_tokens": limits.max_total_tokens,
            "token_usage": instance.kv_usage,
            "gen_throughput": 0.0,
            "cache_hit_rate": instance.cached_tokens_total / prompt if prompt else 0.0,
            "utilization": 1.0 if instance.engine.busy else 0.0,
            "max_running_requests": limits.max_running_requests,
        }

    @app.get("/v1/loads")
    async def loads() -> dict:
        return {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
            "version": EMULATED_VERSIONS["sglang"],
            "accelerator": None,
            "num_accelerators": 1,
            "loads": [load()],
        }

    @app.get("/get_load")
    async def get_load() -> list:
        waiting_tokens = sum(r.prompt_tokens for r in instance.engine.waiting)
        return [
            {
                "dp_rank": 0,
                "num_reqs": instance.n_running + instance.n_waiting,
                "num_waiting_reqs": instance.n_waiting,
                "num_tokens": instance.kv_used_tokens + waiting_tokens,
            }
        ]

    async def flush() -> Response:
        if instance.flush_cache():
            return Response("Cache flushed.\nPlease check backend logs for more details. ", 200)
        return Response(
            "Cache not flushed. Please check backend logs for more details. "
            "(When there are running or waiting requests, the operation will not be performed.)\n",
            status_code=400,
        )

    app.post("/flush_cache")(flush)
    app.get("/flush_cache")(flush)


#: The emulator's ``system_fingerprint`` (vLLM sends one string per server).
_FINGERPRINT = "llmsched-emulator"
#: Top-level fields of vLLM's non-streamed responses: null when the feature is
#: unused (a client that reads them finds the key); PD fills ``kv_transfer_params``.
_VLLM_RESPONSE_NULLS: dict[str, Any] = {
    "kv_transfer_params": None,
    "ec_transfer_params": None,
    "metrics": None,
    "service_tier": None,
    "system_fingerprint": _FINGERPRINT,
}


def _param_of(errors: Any) -> str | None:
    """The request field a validation error is about, as the ``param`` of the error body."""
    for err in errors or ():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if loc:
            return loc[0]
    return None


def _describe(errors: Any) -> str:
    """Pydantic's errors as one line naming each field."""
    parts = []
    for e in errors:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request body"
