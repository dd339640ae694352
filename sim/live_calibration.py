"""Measuring a running server from the client side, for ``llmsched calibrate --target``.

What a client can time, and the rows of :mod:`scheduler.calibration` each
measurement becomes:

``ttft``
    One request at a time on an idle server, ``max_tokens`` 1: the time to
    its first token against its prompt length (prompts of random token ids,
    so no prefix is cached; the least of a few, as a busy client only ever
    adds delay), and against a cached prefix (a prefix sent
    alone first, then the prefix with fresh suffixes; the server's
    ``cached_tokens`` says how much it found; a server that says nothing
    but answers the longer prompt faster than the prefix alone has cached
    it unseen, and the pair is dropped). This is the server's per-request
    overhead plus one prefill step.
``decode``
    ``n`` streams started together (streamed, ``ignore_eos``, a fixed
    ``max_tokens``): once all of them are decoding, the median gap between
    tokens is one decode step of ``n`` sequences at their context.
``mixed`` (vLLM) or ``prefill`` (SGLang)
    While streams decode, one more request arrives; the gap in a stream
    around its first token is the step that prefilled it. vLLM's scheduler
    runs that prefill with the decodes in one step (a ``mixed`` row);
    SGLang's alternates, so the gap is the prefill step plus a decode step,
    and the stream's median gap is taken off (a ``prefill`` row). These rows
    time a step without the per-request overhead, which is what tells the
    overhead apart from the step's constant.

Checks that stop the measurement with a :class:`~traces.errors.ConfigError`:
a server that cannot be reached or answers with an error (its message
quoted), a fresh prompt of random ids that the server reports as cached (a
prefix cache the measurement cannot defeat), and a stream that ends short
of its ``max_tokens`` (a server ignoring ``ignore_eos``).

Times are wall seconds times ``time_scale`` (an emulator running slower or
faster than the engine it emulates reports the engine's seconds with it).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from traces.errors import ConfigError
from traces.replay.http import HttpPool, StreamCut
from traces.replay.protocol import StreamState, error_message, request_body
from traces.tokenizer import Tokenizer, WordTokenizer

__all__ = ["MeasurePlan", "Measurement", "measure", "served_model"]

Protocol = Literal["openai", "sglang"]
Engine = Literal["sglang", "vllm"]


@dataclass(frozen=True)
class MeasurePlan:
    """What to measure. The defaults take about 20 s against a small model on a CPU.

    Attributes:
        prompt_tokens: prompt lengths of the lone-request TTFTs.
        repeats: TTFTs per prompt length (fresh random prompts each); the least is kept.
        prefix_tokens: cached-prefix lengths (each with a ``suffix_tokens`` suffix).
        suffix_tokens: new tokens after a cached prefix.
        streams: concurrent decoding streams to time.
        stream_prompt_tokens: prompt length of each decoding stream (its context).
        decode_tokens: ``max_tokens`` of each decoding stream.
        mixed_prompt_tokens: prompt lengths that arrive while streams decode.
        mixed_streams: streams decoding while they arrive.
        warmup: requests sent first and not measured (compilation, caches).
    """

    prompt_tokens: tuple[int, ...] = (16, 128, 256, 512, 1024)
    repeats: int = 3
    prefix_tokens: tuple[int, ...] = (256, 768)
    suffix_tokens: int = 32
    streams: tuple[int, ...] = (1, 2, 4, 8)
    stream_prompt_tokens: tuple[int, ...] = (64, 512)
    decode_tokens: int = 24
    mixed_prompt_tokens: tuple[int, ...] = (64, 256, 512)
    mixed_streams: tuple[int, ...] = (1, 4)
    warmup: int = 2

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "streams", "stream_prompt_tokens"):
            values = getattr(self, name)
            if not values or min(values) < 1:
                raise ConfigError(f"{name}: expected one or more integers >= 1; got {values!r}")
        for name in ("prefix_tokens", "mixed_prompt_tokens", "mixed_streams"):
            if any(v < 1 for v in getattr(self, name)):
                raise ConfigError(f"{name}: expected integers >= 1; got {getattr(self, name)!r}")
        if self.repeats < 1 or self.suffix_tokens < 1 or self.warmup < 0:
            raise ConfigError("repeats and suffix_tokens must be >= 1, warmup >= 0")
        if self.decode_tokens < 8:
            raise ConfigError(
                f"decode_tokens: expected >= 8 (gaps to take a median of); got {self.decode_tokens}"
            )


@dataclass
class Measurement:
    """The rows measured (columns of :mod:`scheduler.calibration`) and what was noticed."""

    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: Wall seconds the measurement took.
    wall_s: float = 0.0


@dataclass
class _Answer:
    """One request's stream: when it was sent, when each chunk came, the usage it reported."""

    sent_s: float
    times_s: list[float]
    tokens: list[int]
    state: StreamState

    @property
    def ttft_s(self) -> float:
        return self.times_s[0] - self.sent_s


class _Client:
    """Streams requests to one server and times them (``loop.time``, seconds)."""

    def __init__(
        self,
        url: str,
        protocol: Protocol,
        model_name: str | None,
        tokenizer: Tokenizer,
        timeout_s: float,
    ) -> None:
        try:
            self.pool = HttpPool(url)
        except ValueError as exc:
            raise ConfigError(f"--target: {exc}") from None
        self.url = url
        self.endpoint = "generate" if protocol == "sglang" else "completions"
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.timeout_s = timeout_s
        self._seed = random.Random(20260)

    def fresh_ids(self, n: int) -> list[int]:
        """``n`` random token ids never sent before (so no prefix of them is cached)."""
        return self.tokenizer.ids_of_length(n, seed=self._seed.randrange(1 << 62))

    async def send(self, ids: list[int], max_tokens: int, on_token: Callable | None = None):
        """Stream one request; its :class:`_Answer`.

        Raises:
            ConfigError: unreachable server, an error status or an in-stream
                error, a stream cut, or fewer tokens than ``max_tokens``.
        """
        loop = asyncio.get_running_loop()
        body = request_body(self.endpoint, ids, max_tokens, self.model_name)
        headers = {"content-type": "application/json"}
        state = StreamState(self.endpoint, self.tokenizer)
        times: list[float] = []
        tokens: list[int] = []
        sent = loop.time()
        try:
            async with asyncio.timeout(self.timeout_s):
                resp = await self.pool.post(f"/{_path(self.endpoint)}", body, headers)
                try:
                    if resp.status != 200:
                        text = error_message(await resp.read())
                        raise ConfigError(
                            f"{self.url}: the server answered {resp.status} to a request of "
                            f"{len(ids)} prompt tokens: {text}"
                        )
                    rest = b""
                    async for piece in resp.pieces():
                        now = loop.time()
                        lines = (rest + piece).split(b"\n")
                        rest = lines.pop()
                        for line in lines:
                            if not line.startswith(b"data:"):
                                continue
                            payload = line[5:].strip()
                            if payload == b"[DONE]":
                                continue
                            n = state.feed(payload)
                            if state.error is not None:
                                raise ConfigError(f"{self.url}: error in the stream: {state.error}")
                            if n > 0:
                                times.append(now)
                                tokens.append(n)
                                if on_token is not None:
                                    on_token()
                finally:
                    resp.close()
        except TimeoutError:
            raise ConfigError(
                f"{self.url}: no complete answer within {self.timeout_s:g} s "
                f"({len(ids)} prompt tokens, {max_tokens} output tokens); raise --timeout-s"
            ) from None
        except StreamCut as exc:
            raise ConfigError(f"{self.url}: the server closed the stream: {exc}") from None
        except OSError as exc:
            raise ConfigError(
                f"{self.url}: cannot reach the server: {exc.strerror or exc}"
            ) from None
        if sum(tokens) < max_tokens:
            raise ConfigError(
                f"{self.url}: a stream ended after {sum(tokens)} of {max_tokens} tokens; the "
                "measurement needs a server that honours ignore_eos (vLLM, SGLang, the emulator)"
            )
        return _Answer(sent, times, tokens, state)


def _path(endpoint: str) -> str:
    return "generate" if endpoint == "generate" else "v1/completions"


async def _ttft_rows(c: _Client, plan: MeasurePlan, scale: float, out: Measurement) -> None:
    for n in plan.prompt_tokens:
        best = math.inf
        for _ in range(plan.repeats):
            ans = await c.send(c.fresh_ids(n), 1)
            _check_uncached(c, ans, n)
            best = min(best, ans.ttft_s)
        # A busy client or network only ever adds delay: the least is the server's time.
        out.rows.append(_ttft_row(n, 0, best * scale))
    hits = unreported = 0
    for p in plan.prefix_tokens:
        prefix = c.fresh_ids(p)
        first = await c.send(prefix, 1)
        _check_uncached(c, first, p)
        # The prefix with fresh suffixes: each finds the prefix cached (the least time kept).
        answers = [
            await c.send(prefix + c.fresh_ids(plan.suffix_tokens), 1) for _ in range(plan.repeats)
        ]
        ans = min(answers, key=lambda a: a.ttft_s)
        cached = ans.state.cached_tokens
        if cached == 0 and ans.ttft_s < 0.8 * first.ttft_s:
            # A longer prompt answered faster than its own prefix alone: the
            # server cached the prefix and did not say how much.
            unreported += 1
            continue
        out.rows.append(_ttft_row(p + plan.suffix_tokens - cached, cached, ans.ttft_s * scale))
        hits += cached > 0
    if unreported:
        out.notes.append(
            "the server answered a prompt faster than its own prefix alone but reported no "
            "cached tokens (vLLM reports them with --enable-prompt-tokens-details): those "
            "prefix measurements were dropped; the prefix-read cost is not measured"
        )
    elif plan.prefix_tokens and not hits:
        out.notes.append(
            "the server cached no repeated prefix (prefix caching off?): the prefix-read cost "
            "is not measured"
        )


def _check_uncached(c: _Client, ans: _Answer, n: int) -> None:
    if ans.state.cached_tokens > 0:
        raise ConfigError(
            f"{c.url}: the server reported {ans.state.cached_tokens} cached tokens for a prompt "
            f"of {n} random token ids never sent before: its prefix cache cannot be defeated "
            "(does it ignore token-id prompts?); restart it with prefix caching off"
        )


def _ttft_row(new: int, cached: int, latency_s: float) -> dict:
    return {
        "kind": "ttft",
        "batch_size": 1,
        "new_tokens": new,
        "cached_tokens": cached,
        "latency_s": latency_s,
    }


def _steady_gaps(answers: Sequence[_Answer]) -> tuple[list[float], list[int]]:
    """Per-token gaps of every stream while all of them were decoding, and the token index."""
    start = max(a.times_s[0] for a in answers)
    end = min(a.times_s[-1] for a in answers)
    gaps, index = [], []
    for a in answers:
        done = a.tokens[0]
        for t0, t1, k in zip(a.times_s, a.times_s[1:], a.tokens[1:], strict=False):
            if t0 >= start and t1 <= end:
                gaps.append((t1 - t0) / k)
                index.append(done)
            done += k
    return gaps, index


async def _decode_rows(c: _Client, plan: MeasurePlan, scale: float, out: Measurement) -> None:
    for prompt in plan.stream_prompt_tokens:
        for n in plan.streams:
            answers = await asyncio.gather(
                *(c.send(c.fresh_ids(prompt), plan.decode_tokens) for _ in range(n))
            )
            gaps, index = _steady_gaps(answers)
            if len(gaps) < 3:
                out.notes.append(f"{n} streams of {prompt} tokens never decoded together; skipped")
                continue
            generated = statistics.median(index)
            out.rows.append(
                {
                    "kind": "decode",
                    "batch_size": n,
                    "context_tokens": round(n * (prompt + generated)),
                    "latency_s": statistics.median(gaps) * scale,
                }
            )


async def _mixed_rows(
    c: _Client, plan: MeasurePlan, engine: Engine, scale: float, out: Measurement
) -> None:
    prompt = min(plan.stream_prompt_tokens)
    # Two probes a stream set, each with decode gaps before and after it to spare.
    length = max(plan.decode_tokens, 32)
    for n in plan.mixed_streams:
        for probe_tokens in plan.mixed_prompt_tokens:
            progress = _Progress(n)
            streams = [
                asyncio.ensure_future(c.send(c.fresh_ids(prompt), length, progress.ticker(i)))
                for i in range(n)
            ]
            probes = []
            for tokens in (6, 18):
                if not await progress.wait_for(tokens, streams):
                    break
                probes.append(await c.send(c.fresh_ids(probe_tokens), 1))
            answers = await asyncio.gather(*streams)
            rows = [_probe_row(answers, p, probe_tokens, prompt, engine, scale) for p in probes]
            rows = [r for r in rows if r is not None]
            if not rows:
                out.notes.append(
                    f"a {probe_tokens}-token prefill arriving during {n} streams showed no gap; "
                    "skipped"
                )
                continue
            # As with TTFTs: a busy client only ever adds delay, so the least is kept.
            out.rows.append(min(rows, key=lambda r: r["latency_s"]))


class _Progress:
    """Tokens each of ``n`` streams has had so far, and waiting until all have ``k``."""

    def __init__(self, n: int) -> None:
        self._counts = [0] * n
        self._changed = asyncio.Event()

    def ticker(self, i: int) -> Callable[[], None]:
        """The token callback of stream ``i``."""

        def tick() -> None:
            self._counts[i] += 1
            self._changed.set()

        return tick

    async def wait_for(self, k: int, streams: Sequence[asyncio.Future]) -> bool:
        """True once every stream has ``k`` tokens; False if one ended first."""
        while min(self._counts) < k:
            if any(s.done() for s in streams):
                return False
            self._changed.clear()
            waiter = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait([waiter, *streams], return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
        return True


def _probe_row(
    answers: Sequence[_Answer],
    probe: _Answer,
    probe_tokens: int,
    prompt: int,
    engine: Engine,
    scale: float,
) -> dict | None:
    """The row of the step that prefilled ``probe`` while ``answers`` decoded (None: not seen).

    The widest gap of each stream around the probe's first token is taken
    with the gap before it: a token delivered late (the server busy taking
    the probe in) shortens one and lengthens the other, and their sum keeps
    the steps' time. Of the sum, one ordinary gap (vLLM: the mixed step is
    the other) or two (SGLang: a prefill step and a decode step are the
    other) are the stream's usual decode steps.
    """
    first = probe.times_s[0]
    seen = []
    for a in answers:
        t = a.times_s
        gaps = [t1 - t0 for t0, t1 in itertools.pairwise(t)]
        if len(gaps) < 4:
            return None
        # The step that prefilled the probe ends about when its first token came.
        around = [i for i in range(len(gaps)) if t[i + 1] >= probe.sent_s and t[i] <= first]
        if not around:
            return None
        i = max(around, key=gaps.__getitem__)
        pair = gaps[i - 1] + gaps[i] if i > 0 else gaps[i] + gaps[i + 1]
        usual = statistics.median(gaps)
        seen.append((pair, usual, sum(a.tokens[: i + 1])))
    pair = statistics.median(w[0] for w in seen)
    usual = statistics.median(w[1] for w in seen)
    generated = statistics.median(w[2] for w in seen)
    gap = pair - usual
    n = len(answers)
    if engine == "vllm":
        return {
            "kind": "mixed",
            "batch_size": 1,
            "new_tokens": probe_tokens,
            "decode_seqs": n,
            "context_tokens": round(n * (prompt + generated)),
            "latency_s": gap * scale,
        }
    if gap <= usual * 1.05:
        return None
    return {
        "kind": "prefill",
        "batch_size": 1,
        "new_tokens": probe_tokens,
        "latency_s": (gap - usual) * scale,
    }


async def _measure(
    c: _Client, plan: MeasurePlan, engine: Engine, scale: float, progress: Callable[[str], None]
) -> Measurement:
    out = Measurement()
    try:
        for _ in range(plan.warmup):
            await c.send(c.fresh_ids(min(plan.prompt_tokens)), 2)
        progress("TTFT against prompt length and cached prefix, one request at a time")
        await _ttft_rows(c, plan, scale, out)
        progress("decode steps against concurrent streams and their context")
        await _decode_rows(c, plan, scale, out)
        if plan.mixed_prompt_tokens and plan.mixed_streams:
            progress("prefill steps arriving while streams decode")
            await _mixed_rows(c, plan, engine, scale, out)
    finally:
        c.pool.close()
    return out


def measure(
    url: str,
    *,
    protocol: Protocol = "openai",
    engine: Engine = "vllm",
    model_name: str | None = None,
    tokenizer: Tokenizer | None = None,
    plan: MeasurePlan | None = None,
    time_scale: float = 1.0,
    timeout_s: float = 120.0,
    progress: Callable[[str], None] = lambda _line: None,
) -> Measurement:
    """Measure the server at ``url`` (see the module notes); the rows to fit.

    Args:
        url: the server's base URL (``http://host:port``).
        protocol: ``openai`` (``/v1/completions``) or ``sglang`` (``/generate``).
        engine: whose scheduler the server runs, which says what a stream's
            gap around an arriving prefill is (see the module notes).
        model_name: the OpenAI ``model`` field; None asks ``/v1/models``.
        tokenizer: draws the prompts' token ids (default: the built-in
            vocabulary); give the served model's to keep ids in its vocabulary.
        time_scale: engine seconds per wall second of the server.
        timeout_s: longest any one request may take.
        progress: told a line as each phase starts.

    Raises:
        ConfigError: see the module notes.
    """
    if not time_scale > 0:
        raise ConfigError(f"--time-scale: expected a number > 0; got {time_scale!r}")
    if protocol == "openai" and model_name is None:
        model_name = served_model(url)
    client = _Client(url, protocol, model_name, tokenizer or WordTokenizer(), timeout_s)
    t0 = time.perf_counter()
    out = asyncio.run(_measure(client, plan or MeasurePlan(), engine, time_scale, progress))
    out.wall_s = time.perf_counter() - t0
    return out


def served_model(url: str) -> str | None:
    """The first model id ``GET /v1/models`` lists (None when the server has no such route).

    Raises:
        ConfigError: the server cannot be reached.
    """
    import httpx

    try:
        r = httpx.get(url.rstrip("/") + "/v1/models", timeout=10.0)
    except httpx.HTTPError as exc:
        raise ConfigError(f"{url}: cannot reach the server: {exc}") from None
    if r.status_code != 200:
        return None
    try:
        data = r.json().get("data") or []
        return str(data[0]["id"]) if data else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
