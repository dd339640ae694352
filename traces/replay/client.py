"""The open-loop replay: every request leaves at its trace time, answered or not.

The model. Request ``i`` of the trace is due at ``arrival_s[i] / load``
seconds of *trace time* after the first (``--load`` multiplies the arrival
rate, as in ``llmsched simulate``). ``time_scale`` is trace seconds per wall
second: at 10 the whole replay runs ten times faster than the trace, and
every time measured on the wall clock is multiplied by 10 before it is
recorded, so the records stay on the trace's clock (pair it with an emulator
running at the same time scale). Sending is scheduled on the event loop's
monotonic clock against one start instant, so lateness never accumulates,
and no send ever waits for a response: there is no coordinated omission.
The actual send instant is recorded (``send_s``) beside the scheduled one
(``arrival_s``); TTFT counts from the scheduled arrival, so a client that
falls behind is charged its lag, and says so in a warning.

Every request streams. TTFT is the first chunk that carries a token; each
such chunk's arrival time and token count give the request's inter-token
figures (:func:`traces.records.inter_token_figures`) and the run's pooled ITL
histogram. Usage (prompt, cached, completion tokens) comes back from the
server (:mod:`traces.replay.protocol`).

Bounded: at most ``max_requests`` requests, none due after ``duration_s``,
each given up after ``timeout_s`` (outcome ``timeout``); no request is ever
retried. After ``max_connect_errors`` connection failures in a row with no
success between them the target is taken for dead and nothing more is sent.
:meth:`Replay.stop` (Ctrl-C, SIGTERM) stops sending and cancels what is in
flight (outcome ``cancelled``); the records of everything sent are kept.
Requests the trace marks failed are not sent and are recorded ``failed``, as
the simulator counts them; requests never sent because the run stopped are
left out of the records.

Simplifications: one HTTP/1.1 connection per request in flight (a
keep-alive pool without a bound, :mod:`traces.replay.http`), so a server
sees as many connections as requests in flight; chunk times are when the client's read returned, so events that
arrive in one read share a time.
"""

from __future__ import annotations

import asyncio
import math
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from traces.histogram import LogHistogram
from traces.records import (
    OUTCOME_CANCELLED,
    OUTCOME_ERROR,
    OUTCOME_FAILED,
    OUTCOME_OK,
    OUTCOME_PENDING,
    OUTCOME_TIMEOUT,
    inter_token_figures,
    inter_token_samples,
)
from traces.replay.http import HttpPool, Response, StreamCut
from traces.replay.prompts import PromptBuilder
from traces.replay.protocol import (
    ENDPOINTS,
    PROTOCOL_ENDPOINTS,
    StreamState,
    chat_overhead,
    error_message,
    request_body,
)
from traces.tokenizer import Tokenizer, WordTokenizer
from traces.trace import Trace

__all__ = ["LATE_S", "Progress", "Replay", "ReplayConfig", "run_replay"]

#: A request that left more than this late (wall seconds) counts as "fell behind".
LATE_S = 0.010

#: Wall seconds between the start call and the first scheduled send (room to set up).
_LEAD_S = 0.05


@dataclass
class ReplayConfig:
    """How to replay a trace against a server.

    Attributes:
        target_url: the server's base URL (``http://127.0.0.1:8000``).
        protocol: ``openai`` (vLLM, SGLang's OpenAI API) or ``sglang``.
        endpoint: ``completions``, ``chat`` or ``generate`` (SGLang only);
            default: ``completions`` for openai, ``generate`` for sglang.
        load: multiplies the trace's arrival rate (arrival times divided by it).
        time_scale: trace seconds per wall second (records stay in trace seconds).
        max_requests: replay at most this many (the trace's first ones).
        duration_s: replay only requests due in the first this many trace seconds.
        timeout_s: wall seconds a request may take in all before it is given up.
        model: the ``model`` field of OpenAI requests (omitted when None).
        prompt_format: ``ids`` (token ids), ``text``, or ``auto``: ids where the
            endpoint takes them (completions, generate), text for chat.
        seed: seeds every prompt's tokens.
        slo_ttft_s, slo_tpot_s: SLOs for requests without their own (the
            ``x-slo-*`` headers and the records' SLO columns).
        max_connect_errors: connection failures in a row that end the run.
        label: the records' ``policy`` column (the report's label).
    """

    target_url: str
    protocol: Literal["openai", "sglang"] = "openai"
    endpoint: str | None = None
    load: float = 1.0
    time_scale: float = 1.0
    max_requests: int | None = None
    duration_s: float | None = None
    timeout_s: float = 600.0
    model: str | None = None
    prompt_format: Literal["auto", "ids", "text"] = "auto"
    seed: int = 0
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    max_connect_errors: int = 50
    label: str = "replay"

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOL_ENDPOINTS:
            raise ValueError(f"protocol: expected openai or sglang; got {self.protocol!r}")
        offered = PROTOCOL_ENDPOINTS[self.protocol]
        if self.endpoint is None:
            self.endpoint = offered[0]
        if self.endpoint not in offered:
            raise ValueError(
                f"endpoint: {self.protocol} offers {', '.join(offered)}; got {self.endpoint!r}"
            )
        for name in ("load", "time_scale", "timeout_s"):
            value = getattr(self, name)
            if not value > 0 or not math.isfinite(value):
                raise ValueError(f"{name}: expected a positive number; got {value}")
        if self.prompt_format == "ids" and self.endpoint == "chat":
            raise ValueError("prompt_format: the chat endpoint takes text, not token ids")

    @property
    def sends_ids(self) -> bool:
        """Prompts go as token ids (else as text)."""
        if self.prompt_format == "auto":
            return self.endpoint != "chat"
        return self.prompt_format == "ids"

    @property
    def url(self) -> str:
        """The endpoint's full URL."""
        return self.target_url.rstrip("/") + ENDPOINTS[str(self.endpoint)]


@dataclass(frozen=True)
class Progress:
    """A snapshot for the live progress line."""

    total: int
    sent: int
    in_flight: int
    done: int
    errors: int
    ttft_p50_s: float
    elapsed_s: float


@dataclass
class _Plan:
    """The requests to replay, as arrays (trace clock, after load)."""

    request_id: np.ndarray
    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    session_id: list[str | None]
    prefix_hashes: list[object]
    block_tokens: list[int | None]
    slo_ttft_s: np.ndarray
    slo_tpot_s: np.ndarray
    failed: np.ndarray


def _plan(trace: Trace, cfg: ReplayConfig) -> _Plan:
    f = trace.frame
    if cfg.max_requests is not None:
        f = f.iloc[: max(cfg.max_requests, 0)]
    arrival = f["arrival_s"].to_numpy(dtype=np.float64) / cfg.load
    if len(arrival):
        arrival = arrival - arrival[0]
    if cfg.duration_s is not None:
        keep = arrival <= cfg.duration_s
        f, arrival = f[keep], arrival[keep]
    slo_t = f["slo_ttft_s"].to_numpy(dtype=np.float64).copy()
    slo_p = f["slo_tpot_s"].to_numpy(dtype=np.float64).copy()
    if cfg.slo_ttft_s is not None:
        slo_t[np.isnan(slo_t)] = cfg.slo_ttft_s
    if cfg.slo_tpot_s is not None:
        slo_p[np.isnan(slo_p)] = cfg.slo_tpot_s
    blocks = f["block_tokens"].astype("Int64").to_numpy(dtype=np.int64, na_value=0)
    return _Plan(
        request_id=f["request_id"].to_numpy(dtype=np.int64),
        arrival_s=arrival,
        prompt_tokens=f["prompt_tokens"].to_numpy(dtype=np.int64),
        output_tokens=f["output_tokens"].to_numpy(dtype=np.int64),
        session_id=[None if s is None else str(s) for s in f["session_id"]],
        prefix_hashes=list(f["prefix_hashes"]),
        block_tokens=[int(b) or None for b in blocks],
        slo_ttft_s=slo_t,
        slo_tpot_s=slo_p,
        failed=f["failed"].to_numpy(dtype=bool),
    )


@dataclass
class _Measured:
    """Per-request measurements, wall times relative to the start instant (NaN: never)."""

    n: int
    send: np.ndarray = field(init=False)
    first: np.ndarray = field(init=False)
    finish: np.ndarray = field(init=False)
    prompt_tokens: np.ndarray = field(init=False)
    cached_tokens: np.ndarray = field(init=False)
    output_tokens: np.ndarray = field(init=False)
    outcome: np.ndarray = field(init=False)
    http_status: np.ndarray = field(init=False)
    n_chunks: np.ndarray = field(init=False)
    itl: np.ndarray = field(init=False)
    error_message: list[str | None] = field(init=False)

    def __post_init__(self) -> None:
        n = self.n
        self.send = np.full(n, np.nan)
        self.first = np.full(n, np.nan)
        self.finish = np.full(n, np.nan)
        self.prompt_tokens = np.full(n, -1, dtype=np.int64)
        self.cached_tokens = np.zeros(n, dtype=np.int64)
        self.output_tokens = np.zeros(n, dtype=np.int64)
        self.outcome = np.full(n, OUTCOME_PENDING, dtype=np.int8)
        self.http_status = np.full(n, -1, dtype=np.int32)
        self.n_chunks = np.zeros(n, dtype=np.int64)
        self.itl = np.full((n, 4), np.nan)  # p50, p90, p99, max (trace seconds)
        self.error_message = [None] * n


class Replay:
    """One open-loop replay of a trace against a server (see the module docstring).

    Args:
        trace: the workload (at load 1; ``config.load`` scales it).
        config: where and how to send.
        tokenizer: counts and draws prompt tokens (default: the built-in one).

    Use :meth:`run` inside an event loop; :meth:`stop` from a signal handler.
    After the run, :meth:`frame` and :attr:`itl` hold the records.
    """

    def __init__(
        self, trace: Trace, config: ReplayConfig, tokenizer: Tokenizer | None = None
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer or WordTokenizer()
        self.plan = _plan(trace, config)
        self.m = _Measured(len(self.plan.arrival_s))
        self.prompts = PromptBuilder(self.tokenizer, config.seed)
        #: Pooled inter-token latencies, trace seconds.
        self.itl = LogHistogram()
        #: Error kinds and how many requests each ended.
        self.errors: Counter[str] = Counter()
        #: Why sending stopped early, if it did.
        self.stopped_reason: str | None = None
        self.n_sent = 0
        self.n_done = 0
        self.wall_s = 0.0
        self._ttfts: list[float] = []
        self._path = ENDPOINTS[str(config.endpoint)]
        self._chat_overhead = chat_overhead(self.tokenizer) if config.endpoint == "chat" else 0
        self._stop = asyncio.Event()
        self._connect_failures = 0
        self._t0 = 0.0
        self._started = 0.0

    # -- control ------------------------------------------------------------------------

    def stop(self, reason: str = "stopped") -> None:
        """Stop sending and cancel what is in flight (safe to call from a signal handler)."""
        if self.stopped_reason is None:
            self.stopped_reason = reason
        self._stop.set()

    def progress(self) -> Progress:
        """Where the run stands."""
        return Progress(
            total=len(self.m.send),
            sent=self.n_sent,
            in_flight=self.n_sent - self.n_done,
            done=self.n_done,
            errors=sum(self.errors.values()),
            ttft_p50_s=float(np.median(self._ttfts)) if self._ttfts else math.nan,
            elapsed_s=time.monotonic() - self._started if self._started else 0.0,
        )

    # -- the run ------------------------------------------------------------------------

    async def run(
        self,
        progress: Callable[[Progress], None] | None = None,
        progress_every_s: float = 0.5,
    ) -> None:
        """Send every planned request at its time; return when all have ended.

        ``progress`` is called every ``progress_every_s`` wall seconds with a
        :class:`Progress`, and once at the end.
        """
        loop = asyncio.get_running_loop()
        cfg, plan, m = self.config, self.plan, self.m
        self._started = time.monotonic()
        ticker = None
        client = HttpPool(cfg.target_url, connect_timeout_s=min(cfg.timeout_s, 30.0))
        try:
            if progress is not None:
                ticker = asyncio.create_task(self._tick(progress, progress_every_s))
            tasks: set[asyncio.Task[None]] = set()
            self._t0 = loop.time() + _LEAD_S
            due = plan.arrival_s / cfg.time_scale
            stopper = asyncio.create_task(self._stop.wait())
            for i in range(len(due)):
                if self._stop.is_set():
                    break
                if plan.failed[i]:
                    m.outcome[i] = OUTCOME_FAILED
                    continue
                # Build what can be built while waiting, so it does not delay the send.
                prepared = self._prepare(i) if self._ahead(i) else None
                delay = self._t0 + due[i] - loop.time()
                if delay > 0:
                    await asyncio.wait((stopper,), timeout=delay)
                    if self._stop.is_set():
                        break
                task = loop.create_task(self._one(client, i, prepared))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                self.n_sent += 1
                # Let it send before the next request is built: building a 512-token prompt
                # first held every send back by that long (a median of 6 ms, vLLM on a CPU).
                await asyncio.sleep(0)
            if tasks and not self._stop.is_set():
                await asyncio.wait((stopper, *tasks), return_when=asyncio.FIRST_COMPLETED)
                while tasks and not self._stop.is_set():
                    await asyncio.wait((stopper, *tasks), return_when=asyncio.FIRST_COMPLETED)
            for task in list(tasks):
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            stopper.cancel()
        finally:
            client.close()
        self.wall_s = time.monotonic() - self._started
        if ticker is not None:
            ticker.cancel()
        if progress is not None:
            progress(self.progress())

    async def _tick(self, progress: Callable[[Progress], None], every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            progress(self.progress())

    def _prepare(self, i: int) -> tuple[list[int], bytes, dict[str, str]]:
        """Request ``i``'s prompt ids, JSON body and headers."""
        cfg, plan = self.config, self.plan
        rid = int(plan.request_id[i])
        session = plan.session_id[i]
        out_tokens = int(plan.output_tokens[i])
        prompt_ids = self.prompts.build(
            rid,
            int(plan.prompt_tokens[i]),
            out_tokens,
            session_id=session,
            prefix_hashes=plan.prefix_hashes[i],  # type: ignore[arg-type]
            block_tokens=plan.block_tokens[i],
        )
        if cfg.sends_ids:
            prompt: list[int] | str = prompt_ids
        else:
            # The chat rendering adds its role tokens; the rendered prompt has the trace's length.
            cut = prompt_ids[: max(len(prompt_ids) - self._chat_overhead, 0)]
            prompt = self.tokenizer.decode(cut)
        body = request_body(str(cfg.endpoint), prompt, max(out_tokens, 1), cfg.model)
        headers = {
            "content-type": "application/json",
            "accept": "text/event-stream",
            "x-request-id": str(rid),
        }
        if session is not None:
            headers["x-session-id"] = session
        if plan.slo_ttft_s[i] == plan.slo_ttft_s[i]:
            headers["x-slo-ttft-ms"] = f"{plan.slo_ttft_s[i] * 1000:g}"
        if plan.slo_tpot_s[i] == plan.slo_tpot_s[i]:
            headers["x-slo-tpot-ms"] = f"{plan.slo_tpot_s[i] * 1000:g}"
        return prompt_ids, body, headers

    def _ahead(self, i: int) -> bool:
        """Request ``i`` can be built before it is due: its prompt owes nothing to an answer."""
        session = self.plan.session_id[i]
        return session is None or not self.prompts.has_history(session)

    async def _one(
        self,
        client: HttpPool,
        i: int,
        prepared: tuple[list[int], bytes, dict[str, str]] | None = None,
    ) -> None:
        cfg, m = self.config, self.m
        loop = asyncio.get_running_loop()
        session = self.plan.session_id[i]
        # A later turn is built now, when it is due, from the answers so far.
        prompt_ids, body, headers = prepared if prepared is not None else self._prepare(i)
        state = StreamState(str(cfg.endpoint), self.tokenizer)
        times: list[float] = []
        tokens: list[int] = []
        t0 = self._t0
        m.send[i] = loop.time() - t0
        outcome, kind = OUTCOME_ERROR, None
        try:
            async with asyncio.timeout(cfg.timeout_s):
                resp = await client.post(self._path, body, headers)
                try:
                    m.http_status[i] = resp.status
                    if resp.status != 200:
                        kind = f"HTTP {resp.status}"
                        m.error_message[i] = error_message(await resp.read())
                    else:
                        self._connect_failures = 0
                        done = await self._read_stream(resp, state, times, tokens)
                        if state.error is not None:
                            kind = "error in stream"
                            m.error_message[i] = state.error
                            if state.error_status is not None:
                                m.http_status[i] = state.error_status
                        elif not done and not times:
                            kind = "stream ended without output"
                            m.error_message[i] = kind
                        else:
                            outcome = OUTCOME_OK
                finally:
                    resp.close()
        except TimeoutError:
            outcome, kind = OUTCOME_TIMEOUT, "timeout"
            m.error_message[i] = f"no complete answer within {cfg.timeout_s:g} s"
        except asyncio.CancelledError:
            outcome, kind = OUTCOME_CANCELLED, None
            m.error_message[i] = f"run {self.stopped_reason or 'stopped'} before it finished"
        except StreamCut as exc:
            kind = "stream cut" if times else "connection lost"
            m.error_message[i] = f"{kind}: {exc}"
        except OSError as exc:
            kind, text = _connect_kind(exc)
            m.error_message[i] = f"{kind}: {text}"
            self._connect_failed()
        now = loop.time() - t0
        m.outcome[i] = outcome
        if kind is not None:
            self.errors[kind] += 1
        self._record(i, now, state, times, tokens)
        if outcome == OUTCOME_OK:
            self.prompts.add_response(session, prompt_ids, state.response_ids())
        self.n_done += 1

    async def _read_stream(
        self,
        resp: Response,
        state: StreamState,
        times: list[float],
        tokens: list[int],
    ) -> bool:
        """Read server-sent events until the end; True when ``[DONE]`` came.

        The body is read to its end even after ``[DONE]``, so the connection
        goes back to the pool instead of being closed (a new connection per
        request would cost the client more than the request itself).
        """
        loop_time = asyncio.get_running_loop().time
        t0 = self._t0
        rest = b""
        done = False
        async for raw in resp.pieces():
            if done or state.error is not None:
                continue
            now = loop_time() - t0
            data = rest + raw if rest else raw
            lines = data.split(b"\n")
            rest = lines.pop()
            for line in lines:
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                n = state.feed(payload)
                if state.error is not None:
                    break
                if n > 0:
                    times.append(now)
                    tokens.append(n)
        return done

    def _connect_failed(self) -> None:
        self._connect_failures += 1
        if self._connect_failures >= self.config.max_connect_errors and not self._stop.is_set():
            self.stop(f"stopped after {self._connect_failures} connection failures in a row")

    def _record(
        self, i: int, now: float, state: StreamState, times: list[float], tokens: list[int]
    ) -> None:
        m, scale = self.m, self.config.time_scale
        if m.outcome[i] != OUTCOME_CANCELLED:
            m.finish[i] = now
        if times:
            m.first[i] = times[0]
            if m.outcome[i] == OUTCOME_OK:
                self._ttfts.append((times[0] - self.plan.arrival_s[i] / scale) * scale)
        m.prompt_tokens[i] = state.prompt_tokens
        m.cached_tokens[i] = state.cached_tokens
        m.output_tokens[i] = state.completion_tokens
        m.n_chunks[i] = len(times)
        if times:
            scaled = [t * scale for t in times]
            fig = inter_token_figures(scaled, tokens)
            m.itl[i] = (fig.itl_p50_s, fig.itl_p90_s, fig.itl_p99_s, fig.itl_max_s)
            if m.outcome[i] == OUTCOME_OK and len(times) > 1:
                values, weights = inter_token_samples(scaled, tokens)
                for v, w in zip(values.tolist(), weights.tolist(), strict=True):
                    self.itl.add(v, w)


def _connect_kind(exc: BaseException) -> tuple[str, str]:
    """The kind of a failed connect (refused, unreachable, name not found) and the OS's words."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for e in chain:
        if isinstance(e, ConnectionRefusedError):
            return "connection refused", str(e)
    # The deepest OS error says most (the outer ones are "all attempts failed").
    for e in reversed(chain):
        if isinstance(e, OSError):
            return "connect failed", str(e)
    text = str(exc) or type(exc).__name__
    return ("connection refused" if "refused" in text.lower() else "connect failed"), text


def run_replay(
    replay: Replay,
    progress: Callable[[Progress], None] | None = None,
    progress_every_s: float = 0.5,
) -> Replay:
    """Run ``replay`` in a fresh event loop; SIGINT and SIGTERM stop it cleanly.

    A stopped run still returns normally, with what it measured (cancelled
    requests recorded as such); a second Ctrl-C is not caught.
    """

    async def main() -> None:
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, _on_signal, sig)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread, or no signals on this platform
        try:
            await replay.run(progress, progress_every_s)
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    def _on_signal(sig: signal.Signals) -> None:
        replay.stop(f"interrupted ({sig.name})")

    asyncio.run(main())
    return replay
