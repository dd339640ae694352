"""Prompt measurement for the router: how many tokens a request's prompt has, and its block hashes.

The policy needs a request's prompt length (``prompt_tokens``) and, for
prefix-aware routing, the chained hashes of its token blocks
(``prefix_hashes``, see :mod:`traces.hashing` and :mod:`scheduler.prefix`).
The router reads both from the request body before it picks a backend, with
:class:`PromptCounter` on the tokenizer the backends use:

* ``POST /v1/completions`` (``endpoint="completions"``): ``prompt`` is a text,
  a list of token ids, or a batch of exactly one of either;
* ``POST /v1/chat/completions`` (``"chat"``): ``messages``, each an object
  with a ``role`` and a ``content`` that is a text, a list of parts or null;
* SGLang's ``POST /generate`` (``"generate"``): ``text`` or ``input_ids``
  (exactly one), each possibly a batch of one.

A batch of several prompts is refused (:class:`BodyError`): one request is
one prompt to the policy. So is a body of the wrong types, naming the field.

How a prompt is counted, and when the count is exact (``PromptInfo.exact``):

* **Token ids** are the prompt: counted and hashed as given. Exact.
* **Text** is encoded with the tokenizer. With an HF tokenizer, the
  tokenizer's special tokens (a BOS, say) are added, as vLLM and SGLang do
  for text prompts (a body's ``add_special_tokens``, vLLM's extra
  parameter, overrides). Exact.
* **Chat, HF tokenizer with a chat template** (``chat_template`` in
  ``tokenizer_config.json`` or a ``chat_template.jinja`` beside it): the
  template is rendered with jinja2 as ``transformers`` renders it
  (sandboxed, ``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``,
  ``raise_exception``, ``strftime_now``, a ``tojson`` that does not escape
  HTML), with ``messages``, ``tools``, ``add_generation_prompt`` (the body's,
  else true), the config's ``bos_token``/``eos_token``/``unk_token``/
  ``pad_token`` and the body's ``chat_template_kwargs``; the text is encoded
  *without* adding special tokens, as vLLM does: a template that writes
  ``{{ bos_token }}`` gets exactly one BOS (the tokenizer reads the
  written token as its id). As in vLLM, a list ``content`` reaches the
  template as its text parts joined by newlines (SGLang's joining may
  differ), and tool-call arguments given as JSON strings as the objects
  they encode. Exact, except: the
  server's own template override (vLLM's ``--chat-template``), templates
  that need content as a list of parts, and ``continue_final_message`` are
  not followed. A template that refuses the conversation
  (``raise_exception``) makes a :class:`BodyError` on ``messages``, as the
  server would refuse it; one that fails otherwise falls back to the
  estimate below.
* **Chat, built-in tokenizer**: rendered with
  :func:`traces.tokenizer.render_chat` (a ``role: content`` line each), as
  the emulated backend renders it, so router and emulator agree token for
  token (neither renders ``tools``). Exact (for the emulator, which is what
  the built-in tokenizer fronts).
* **Chat, HF tokenizer without a template: an estimate** (``exact=False``):
  :func:`~traces.tokenizer.render_chat` encoded with the model's tokenizer.
  The content is counted right; what is missing is the template's framing,
  a few tokens per message (role headers and end-of-turn markers: about 4
  to 8 per message for ChatML and Llama 3 templates, plus the
  system-prompt preamble some templates add, and every token of ``tools``,
  which only a template renders). So the estimate is low by roughly
  ``5 * len(messages)`` tokens, more with tools; the router learns the true
  count from the backend's ``usage`` afterwards.
* **Non-text parts** (images, audio, files) count zero tokens and make the
  count an estimate (``exact=False``): the server expands them into
  placeholder tokens the router cannot know. Only ``text`` parts (and
  ``input_text``/``refusal``, which carry text) are counted.

Block hashes are :func:`traces.hashing.block_hashes` of the token ids the
count came from, blocks of ``block_tokens``: two prompts that share their
first ``k`` blocks of tokens share their first ``k`` hashes, so a chat that
resends its system prompt and earlier turns shares its leading hashes with
the previous request (the template renders a conversation's turns in
order; the generation prompt of the previous request is usually the start
of the next assistant turn, so at most the block around it differs). For an
estimate the hashes are of the estimated ids: consistent between the
router's own requests, which is all :class:`scheduler.prefix.PrefixRecord`
compares.

Cost and the event loop: encoding is cached in an LRU of ``cache_size``
texts (keyed by a 128-bit BLAKE2b digest of the text, so the cache holds no
prompt text; a hit costs the digest), which catches a repeated prompt, a
retried request and a replayed trace; the template is rendered on every
request (a chat that adds a turn is a new text). Token ids are not cached:
hashing them is the whole work either way. Texts longer than
``offload_chars`` (and id lists longer than a quarter of it) are encoded and
hashed in a worker thread, so the event loop never waits on a long prompt;
an HF tokenizer then encodes through ``encode_batch``, which releases the
GIL (its plain ``encode`` holds it). Two identical long prompts arriving
together are both encoded (the later result replaces the same entry): rare,
and cheaper than tracking encodes in flight.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import json
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from hashlib import blake2b
from pathlib import Path
from typing import Any

from traces.errors import ConfigError
from traces.hashing import DEFAULT_BLOCK_TOKENS, block_hashes
from traces.tokenizer import load_tokenizer, open_hf_tokenizer, render_chat

__all__ = ["ENDPOINTS", "BodyError", "PromptCounter", "PromptInfo"]

#: The request bodies :meth:`PromptCounter.measure` reads.
ENDPOINTS = ("completions", "chat", "generate")

#: Part types whose ``text`` counts (OpenAI's chat parts; ``input_text`` from the Responses API).
_TEXT_PARTS = frozenset({"text", "input_text"})
_ID_LIMIT = 1 << 63

_executor_lock = threading.Lock()
_shared_executor: concurrent.futures.ThreadPoolExecutor | None = None


@dataclass(frozen=True, slots=True)
class PromptInfo:
    """A request's prompt as the policy sees it.

    ``tokens``: prompt tokens; ``exact``: counted as the server counts them
    (from token ids, or with the served model's tokenizer and template), not
    estimated (see the module doc); ``prefix_hashes``: the chained hash of
    each block of ``block_tokens`` tokens, None when the counter does not
    hash.
    """

    tokens: int
    exact: bool
    prefix_hashes: tuple[int, ...] | None
    block_tokens: int


class BodyError(ValueError):
    """A request body whose prompt cannot be measured: ``param`` is the field, ``message`` why.

    The router answers it with a 400 naming ``param``, as the servers do.
    """

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


class _TemplateRefused(Exception):
    """A chat template's ``raise_exception``."""


@dataclass(frozen=True, slots=True)
class _Prompt:
    """What a body asks to have counted: ids, or a text and how to encode it."""

    ids: Sequence[int] | None
    text: str
    special: bool  # add the tokenizer's special tokens
    exact: bool
    param: str


class PromptCounter:
    """Counts and hashes request prompts for the router (see the module doc).

    Args:
        tokenizer: the served model's HF tokenizer, as a ``tokenizer.json``
            or its folder (``tokenizer_config.json`` and
            ``chat_template.jinja`` are read from the same folder when
            there); None: the built-in tokenizer, which the emulated
            backend counts with.
        block_tokens: tokens per hashed block (the backends' page size).
        hashes: compute ``prefix_hashes`` (False: None, for policies that
            keep no prefix record).
        cache_size: texts whose counts are kept (0: no cache).
        offload_chars: texts longer than this are encoded in a thread.
        executor: where long texts are encoded; None: a small shared pool.

    Raises:
        ConfigError: the tokenizer is missing or unreadable, or its chat
            template does not parse.
        ValueError: ``block_tokens`` below 1, ``cache_size`` or
            ``offload_chars`` below 0.

    Thread-safe: the cache is locked, so :meth:`measure_now` may be called
    from any thread.
    """

    def __init__(
        self,
        tokenizer: str | Path | None = None,
        *,
        block_tokens: int = DEFAULT_BLOCK_TOKENS,
        hashes: bool = True,
        cache_size: int = 4096,
        offload_chars: int = 4096,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        if block_tokens < 1:
            raise ValueError(f"block_tokens: expected an integer >= 1; got {block_tokens!r}")
        if cache_size < 0:
            raise ValueError(f"cache_size: expected an integer >= 0; got {cache_size!r}")
        if offload_chars < 0:
            raise ValueError(f"offload_chars: expected an integer >= 0; got {offload_chars!r}")
        self.block_tokens = block_tokens
        self._hashes = hashes
        self._cache_size = cache_size
        self._offload_chars = offload_chars
        self._executor = executor
        self._cache: OrderedDict[bytes, tuple[int, tuple[int, ...] | None]] = OrderedDict()
        self._lock = threading.Lock()
        #: Texts found in the cache, and texts encoded (the cache's misses).
        self.hits = 0
        self.misses = 0
        self._template: Any = None
        self._template_vars: dict[str, str] = {}
        self._named_templates: dict[str, Any] = {}
        if tokenizer is None:
            word = load_tokenizer(None)
            self.tokenizer_name = word.name
            self._hf: Any = None
            self._encode_short: Callable[[str, bool], list[int]] = lambda t, s: word.encode(t)
            self._encode_long = self._encode_short
        else:
            self._hf, folder, self.tokenizer_name = _load_hf(tokenizer)
            hf = self._hf
            self._encode_short = lambda t, s: hf.encode(t, add_special_tokens=s).ids
            # encode_batch releases the GIL while it works; encode does not.
            self._encode_long = lambda t, s: hf.encode_batch([t], add_special_tokens=s)[0].ids
            self._load_template(folder)

    @property
    def has_chat_template(self) -> bool:
        """Chats are rendered with the model's template (else: see the module doc)."""
        return self._template is not None

    async def measure(self, endpoint: str, body: Mapping[str, Any]) -> PromptInfo:
        """The prompt of ``body``, a request to ``endpoint`` (one of :data:`ENDPOINTS`).

        A long prompt is encoded in a worker thread; the rest of the work is
        done on the calling loop.

        Raises:
            BodyError: the body's prompt fields have the wrong types, or hold
                a batch of several prompts.
            ValueError: an unknown endpoint.
        """
        prompt = self._prompt(endpoint, body)
        if prompt.ids is not None:
            if len(prompt.ids) * 4 <= self._offload_chars:
                return self._of_ids(prompt)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool(), self._of_ids, prompt)
        key, found = self._lookup(prompt)
        if found is not None:
            return self._info(found, prompt)
        if len(prompt.text) <= self._offload_chars:
            counted = self._count(prompt, self._encode_short)
        else:
            loop = asyncio.get_running_loop()
            counted = await loop.run_in_executor(
                self._pool(), self._count, prompt, self._encode_long
            )
        self._store(key, counted)
        return self._info(counted, prompt)

    def measure_now(self, endpoint: str, body: Mapping[str, Any]) -> PromptInfo:
        """:meth:`measure` in the calling thread, however long the prompt (tests, small prompts).

        Raises:
            BodyError: as :meth:`measure`.
            ValueError: an unknown endpoint.
        """
        prompt = self._prompt(endpoint, body)
        if prompt.ids is not None:
            return self._of_ids(prompt)
        key, found = self._lookup(prompt)
        if found is None:
            found = self._count(prompt, self._encode_short)
            self._store(key, found)
        return self._info(found, prompt)

    def clear_cache(self) -> None:
        """Forget every cached count (hit and miss counters stay)."""
        with self._lock:
            self._cache.clear()

    # -- counting -------------------------------------------------------------

    def _of_ids(self, prompt: _Prompt) -> PromptInfo:
        ids = prompt.ids
        assert ids is not None
        _check_ids(ids, prompt.param)
        hashes = tuple(block_hashes(ids, self.block_tokens)) if self._hashes else None
        return PromptInfo(len(ids), True, hashes, self.block_tokens)

    def _count(
        self, prompt: _Prompt, encode: Callable[[str, bool], list[int]]
    ) -> tuple[int, tuple[int, ...] | None]:
        try:
            ids = encode(prompt.text, prompt.special)
        except (UnicodeEncodeError, TypeError):  # TypeError: HF tokenizers refuse them so
            raise BodyError(prompt.param, "not valid Unicode text (a lone surrogate)") from None
        hashes = tuple(block_hashes(ids, self.block_tokens)) if self._hashes else None
        return len(ids), hashes

    def _info(self, counted: tuple[int, tuple[int, ...] | None], prompt: _Prompt) -> PromptInfo:
        return PromptInfo(counted[0], prompt.exact, counted[1], self.block_tokens)

    def _lookup(self, prompt: _Prompt) -> tuple[bytes, tuple[int, tuple[int, ...] | None] | None]:
        if not self._cache_size:
            return b"", None
        data = prompt.text.encode("utf-8", "surrogatepass")
        key = blake2b(data, digest_size=16, person=b"sp" if prompt.special else b"").digest()
        with self._lock:
            found = self._cache.get(key)
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
                self._cache.move_to_end(key)
        return key, found

    def _store(self, key: bytes, counted: tuple[int, tuple[int, ...] | None]) -> None:
        if not self._cache_size:
            return
        with self._lock:
            self._cache[key] = counted
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _pool(self) -> concurrent.futures.Executor:
        return self._executor if self._executor is not None else _default_executor()

    # -- reading bodies -------------------------------------------------------

    def _prompt(self, endpoint: str, body: Mapping[str, Any]) -> _Prompt:
        if not isinstance(body, Mapping):
            raise BodyError("body", f"expected a JSON object; got {_kind(body)}")
        if endpoint == "completions":
            special = _flag(body, "add_special_tokens", True)
            return _one_prompt(body.get("prompt"), "prompt", special)
        if endpoint == "generate":
            text, ids = body.get("text"), body.get("input_ids")
            if text is not None and ids is not None:
                raise BodyError("input_ids", "give either text or input_ids, not both")
            if ids is not None:
                return _one_prompt(ids, "input_ids", True, texts=False)
            if text is None:
                raise BodyError("text", "expected text or input_ids")
            return _one_prompt(text, "text", True, ids=False)
        if endpoint == "chat":
            return self._chat(body)
        raise ValueError(f"endpoint: expected one of {', '.join(ENDPOINTS)}; got {endpoint!r}")

    def _chat(self, body: Mapping[str, Any]) -> _Prompt:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BodyError(
                "messages", f"expected a non-empty list of messages; got {_kind(messages)}"
            )
        complete = True  # every part is text
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping):
                raise BodyError(f"messages[{i}]", f"expected an object; got {_kind(m)}")
            if not isinstance(m.get("role"), str):
                raise BodyError(
                    f"messages[{i}].role", f"expected a string; got {_kind(m.get('role'))}"
                )
            complete &= _check_content(m.get("content"), f"messages[{i}].content")
        special = _flag(body, "add_special_tokens", False)
        tools, kwargs = body.get("tools"), body.get("chat_template_kwargs")
        if tools is not None and not isinstance(tools, list):
            raise BodyError("tools", f"expected a list of tools; got {_kind(tools)}")
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise BodyError("chat_template_kwargs", f"expected an object; got {_kind(kwargs)}")
        if self._template is not None:
            try:
                text = self._render(body, messages)
            except _TemplateRefused as exc:
                raise BodyError("messages", f"the chat template refuses them: {exc}") from None
            except Exception:  # the server decides; estimate meanwhile
                pass
            else:
                return _Prompt(None, text, special, complete, "messages")
        exact = complete and self._hf is None
        return _Prompt(None, render_chat(messages), special, exact, "messages")

    def _render(self, body: Mapping[str, Any], messages: list[Any]) -> str:
        tools, kwargs = body.get("tools"), body.get("chat_template_kwargs")
        template = self._template
        if tools and "tool_use" in self._named_templates:
            template = self._named_templates["tool_use"]
        context: dict[str, Any] = dict(self._template_vars)
        context.update(kwargs or {})
        context.update(
            messages=[_for_template(m) for m in messages],
            tools=tools,
            documents=body.get("documents"),
            add_generation_prompt=_flag(body, "add_generation_prompt", True),
        )
        return template.render(**context)

    # -- the model's files ----------------------------------------------------

    def _load_template(self, folder: Path) -> None:
        config: dict[str, Any] = {}
        config_path = folder / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"--tokenizer: {config_path}: not readable JSON ({exc})"
                ) from None
            if not isinstance(config, dict):
                raise ConfigError(f"--tokenizer: {config_path}: expected a JSON object")
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = config.get(name)
            if isinstance(value, Mapping):  # a serialized AddedToken
                value = value.get("content")
            if isinstance(value, str):
                self._template_vars[name] = value
        source: Any = config.get("chat_template")
        where = config_path
        jinja_path = folder / "chat_template.jinja"
        if jinja_path.is_file():  # newer HF repos keep it here, and it wins
            source, where = jinja_path.read_text(encoding="utf-8"), jinja_path
        if source is None:
            return
        named: dict[str, str] = {}
        if isinstance(source, list):  # [{"name": ..., "template": ...}, ...]
            for entry in source:
                if isinstance(entry, Mapping) and isinstance(entry.get("template"), str):
                    named[str(entry.get("name"))] = entry["template"]
            source = named.get("default")
            if source is None:
                raise ConfigError(
                    f"--tokenizer: {where}: chat_template: no template named 'default'"
                )
        if not isinstance(source, str):
            raise ConfigError(f"--tokenizer: {where}: chat_template: expected a string")
        env = _jinja_env()
        try:
            self._template = env.from_string(source)
            self._named_templates = {k: env.from_string(v) for k, v in named.items()}
        except Exception as exc:  # jinja2.TemplateSyntaxError and friends
            raise ConfigError(
                f"--tokenizer: {where}: chat_template does not parse ({exc})"
            ) from None


def _load_hf(path: str | Path) -> tuple[Any, Path, str]:
    """The ``tokenizers.Tokenizer`` at ``path`` (a file or its folder), its folder and its name."""
    tok, p = open_hf_tokenizer(path)
    return tok, p.parent, str(p)


def _jinja_env() -> Any:
    """A jinja2 environment that renders chat templates as ``transformers`` does."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise _TemplateRefused(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        # Jinja's own tojson escapes <, >, & and ' for HTML; templates want plain JSON.
        return json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def _default_executor() -> concurrent.futures.ThreadPoolExecutor:
    global _shared_executor
    with _executor_lock:
        if _shared_executor is None:
            _shared_executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=4, thread_name_prefix="llmsched-prompts"
            )
        return _shared_executor


# -- body fields --------------------------------------------------------------


def _one_prompt(
    value: Any, param: str, special: bool, *, texts: bool = True, ids: bool = True
) -> _Prompt:
    """A text or a list of ids, or a batch holding exactly one of them."""
    if isinstance(value, str) and texts:
        return _Prompt(None, value, special, True, param)
    if isinstance(value, list):
        if value and isinstance(value[0], (str, list)):
            if len(value) != 1:
                raise BodyError(
                    param,
                    f"expected one prompt; got a batch of {len(value)} (send one request per prompt)",
                )
            inner = value[0]
            if isinstance(inner, str) and texts:
                return _Prompt(None, inner, special, True, f"{param}[0]")
            if isinstance(inner, list) and ids:
                return _Prompt(inner, "", special, True, f"{param}[0]")
        elif ids:
            return _Prompt(value, "", special, True, param)
    what = {(True, True): "a string or a list of token ids", (True, False): "a string"}.get(
        (texts, ids), "a list of token ids"
    )
    raise BodyError(param, f"expected {what}; got {_kind(value)}")


def _check_ids(ids: Sequence[Any], param: str) -> None:
    """Refuse a list holding anything but token ids (integers in 0 .. 2**63 - 1)."""
    try:
        if not ids or min(array("q", ids)) >= 0:  # C loops; the slow one only names the culprit
            return
    except (TypeError, OverflowError):
        pass
    for i, x in enumerate(ids):
        if not isinstance(x, int) or not 0 <= x < _ID_LIMIT:
            raise BodyError(
                f"{param}[{i}]", f"expected a token id (an integer >= 0); got {x!r:.40}"
            )


def _check_content(content: Any, param: str) -> bool:
    """Refuse a content that is not a text, null or a list of parts; True if every part is text."""
    if content is None or isinstance(content, str):
        return True
    if not isinstance(content, list):
        raise BodyError(param, f"expected a string or a list of parts; got {_kind(content)}")
    complete = True
    for j, part in enumerate(content):
        if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
            raise BodyError(f"{param}[{j}]", "expected a part: an object with a 'type' string")
        kind = part["type"]
        if kind in _TEXT_PARTS or kind == "refusal":
            field = "refusal" if kind == "refusal" else "text"
            if not isinstance(part.get(field), str):
                raise BodyError(
                    f"{param}[{j}].{field}", f"expected a string; got {_kind(part.get(field))}"
                )
        else:
            complete = False
    return complete


def _for_template(message: Mapping[str, Any]) -> dict[str, Any]:
    """A message as vLLM hands it to a template: content as text, tool-call arguments decoded."""
    out = dict(message)
    content = out.get("content")
    if content is None:
        out["content"] = ""
    elif isinstance(content, list):
        out["content"] = "\n".join(_part_text(p) for p in content if _part_text(p) is not None)
    calls = out.get("tool_calls")
    if isinstance(calls, list):
        if not calls:
            del out["tool_calls"]
        else:
            out["tool_calls"] = calls = copy.deepcopy(calls)
            for call in calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    args = fn.get("arguments")
                    if isinstance(args, str):
                        try:
                            fn["arguments"] = json.loads(args)
                        except ValueError:
                            fn["arguments"] = {}
                    elif not isinstance(args, (dict, list)):
                        fn["arguments"] = {}
    return out


def _part_text(part: Mapping[str, Any]) -> str | None:
    kind = part.get("type")
    if kind in _TEXT_PARTS:
        return part.get("text")
    if kind == "refusal":
        return part.get("refusal")
    return None


def _flag(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BodyError(name, f"expected true or false; got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    """A JSON value's type, as a client would name it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an empty list" if not value else "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__
