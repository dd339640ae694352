"""One emulated serving instance: the simulator's engine on the wall clock, as token streams.

The model is the simulator's, unchanged: a :class:`sim.engine.Engine` built
from the same cost model and limits as ``llmsched simulate`` builds
(:func:`sim.runner.build_engine`), run by the same
:class:`sim.driver.InstanceDriver`, here on an :class:`sim.driver.AsyncioTimer`
(``time_scale`` emulated seconds per wall second). The engine steps one
iteration per event (``fast_forward=False``), so every token is handed to its
request's :class:`TokenStream` when the step that produced it ends, at the
step's planned time: a prefill step's end is its first token, each decode
step's end one more token for every request in the batch.

What is emulated and what is not, stated so results can be read right:

* prompts are token ids (from the tokenizer, or given as ids); their
  block hashes (:func:`traces.hashing.block_hashes`, blocks of
  ``block_tokens``) feed the engine's prefix cache, so a repeated prefix
  is a hit and ``cached_tokens`` says so;
* the emulated model never stops early: a request produces exactly its
  ``max_tokens`` tokens (``ignore_eos``, ``min_tokens`` and stop strings
  change nothing), and its finish reason is always ``length``;
* output tokens are a fixed cycle of ids drawn once for the seed
  (:meth:`EmulatedInstance.output_ids`); their text is the tokenizer's
  decoding of that cycle, piece by piece;
* a client that disconnects does not abort its request: the engine has no
  abort, so the request runs to its end and its tokens are dropped;
* times kept for metrics are emulated seconds (the engine's clock); with
  ``time_scale`` 1 they are wall seconds.

Event-loop lag (how late step ends fire, in wall seconds) is measured on
every timer callback (:attr:`EmulatedInstance.loop_lag_s`): steps are planned
at their times, so lag delays a token but does not accumulate.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from scheduler.cost_model import StepCost
from sim.driver import AsyncioTimer, InstanceDriver
from sim.engine import Engine
from sim.inflight import SimRequest
from sim.kv import KvPool
from sim.limits import EngineLimits
from sim.step import StepRecord
from traces.hashing import DEFAULT_BLOCK_TOKENS, block_hashes
from traces.tokenizer import Tokenizer

__all__ = ["OUTPUT_CYCLE_TOKENS", "EmulatedInstance", "LaggedTimer", "Rejected", "TokenStream"]

#: Length of the cycle of output token ids (drawn once per seed).
OUTPUT_CYCLE_TOKENS = 1024


class Rejected(Exception):
    """The instance cannot serve a request (it can never fit the KV cache)."""


class LaggedTimer(AsyncioTimer):
    """An :class:`sim.driver.AsyncioTimer` that records how late each callback runs.

    ``on_lag(lag_s)`` gets the wall seconds between a callback's planned
    time and when the loop ran it.
    """

    __slots__ = ("on_lag",)

    def __init__(self, loop: asyncio.AbstractEventLoop, speed: float, on_lag: Callable) -> None:
        super().__init__(loop, speed=speed)
        self.on_lag = on_lag

    def call_at(
        self, when_s: float, callback: Callable[[], None], *, before_steps: bool = False
    ) -> asyncio.TimerHandle:
        loop = self.loop
        due = self._t0 + when_s / self.speed
        on_lag = self.on_lag

        def run() -> None:
            on_lag(loop.time() - due)
            callback()

        return loop.call_at(due, run)


class TokenStream:
    """The tokens of one request as the engine produces them.

    ``n_tokens`` grows as steps end; ``done`` is set after the last one.
    Times are emulated seconds on the instance's clock.
    """

    __slots__ = (
        "_waiter",
        "arrival_s",
        "cached_tokens",
        "done",
        "error",
        "finish_s",
        "first_token_s",
        "last_token_s",
        "max_tokens",
        "n_tokens",
        "prompt_ids",
        "prompt_tokens",
        "request_id",
        "row",
    )

    def __init__(
        self, row: int, request_id: str, prompt_ids: Sequence[int], max_tokens: int, now_s: float
    ) -> None:
        self.row = row
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.prompt_tokens = len(prompt_ids)
        self.max_tokens = max_tokens
        self.arrival_s = now_s
        self.n_tokens = 0
        self.cached_tokens = 0
        self.done = False
        #: Why the stream ended short (a PD transfer that never came), else None.
        self.error: str | None = None
        self.first_token_s = float("nan")
        self.last_token_s = float("nan")
        self.finish_s = float("nan")
        self._waiter: asyncio.Future | None = None

    async def wait(self, seen: int) -> int:
        """Wait until more than ``seen`` tokens exist or the stream is done; the count then."""
        if self.n_tokens <= seen and not self.done:
            fut = self._waiter = asyncio.get_running_loop().create_future()
            await fut
        return self.n_tokens

    async def finished(self) -> None:
        """Wait for the last token."""
        while not self.done:
            await self.wait(self.n_tokens)

    def _wake(self) -> None:
        fut = self._waiter
        if fut is not None:
            self._waiter = None
            if not fut.done():
                fut.set_result(None)


class EmulatedInstance:
    """One instance: engine, driver, the streams of its requests, and what metrics read.

    Args:
        cost: step durations (the simulator's cost model).
        limits: batching limits.
        tokenizer: prompt counting and output text.
        instance_id: the engine's id.
        time_scale: emulated seconds per wall second.
        block_tokens: tokens per prefix-cache block.
        seed: the output token ids.
        role: the engine's role: ``mixed``, or ``prefill`` / ``decode`` under
            prefill/decode disaggregation (:mod:`sim.emulator.pd`).
        hooks: objects told of request events (see :meth:`add_hooks`).

    :meth:`start` must run on the event loop that will serve it.
    """

    def __init__(
        self,
        cost: StepCost,
        limits: EngineLimits,
        tokenizer: Tokenizer,
        *,
        instance_id: int = 0,
        time_scale: float = 1.0,
        block_tokens: int = DEFAULT_BLOCK_TOKENS,
        seed: int = 0,
        role: str = "mixed",
    ) -> None:
        self.cost = cost
        self.limits = limits
        self.tokenizer = tokenizer
        self.instance_id = instance_id
        self.time_scale = time_scale
        self.block_tokens = block_tokens
        self.seed = seed
        self.engine = Engine(
            cost,
            limits,
            instance_id=instance_id,
            role=role,
            track_tokens=True,
            fast_forward=False,
        )
        self.driver: InstanceDriver | None = None
        self.timer: AsyncioTimer | None = None
        self._rows = itertools.count()
        self._streams: dict[int, TokenStream] = {}
        self._hooks: list[Any] = []
        #: Last and worst event-loop lag seen, wall seconds.
        self.loop_lag_s = 0.0
        self.max_loop_lag_s = 0.0
        #: Totals since start: requests, prompt, cached and generated tokens.
        self.n_requests = 0
        self.prompt_tokens_total = 0
        self.cached_tokens_total = 0
        self.generation_tokens_total = 0
        self.started_wall_s = time.time()
        self._out_ids, self._pieces = _output_cycle(tokenizer, seed)

    # -- lifecycle -----------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Put the engine on ``loop``'s clock (default: the running loop)."""
        loop = loop if loop is not None else asyncio.get_running_loop()
        self.timer = LaggedTimer(loop, self.time_scale, self._lag)
        self.driver = InstanceDriver(self.engine, self.timer, self)

    def add_hooks(self, hooks: Any) -> None:
        """Tell ``hooks`` of events: ``on_start(stream)`` (prefill began, cached tokens known),
        ``on_token(stream, gap_s)`` (every token after the first), ``on_first_token(stream)``,
        ``on_finish(stream)`` (all four)."""
        self._hooks.append(hooks)

    @property
    def now_s(self) -> float:
        """The instance's clock (emulated seconds since start)."""
        assert self.timer is not None, "start() first"
        return self.timer.now

    # -- work in -------------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], max_tokens: int, request_id: str) -> TokenStream:
        """Queue a request of ``prompt_ids`` producing ``max_tokens`` tokens; its stream.

        Raises:
            Rejected: the prompt plus output can never fit the instance's KV cache.
        """
        driver = self.driver
        assert driver is not None, "start() first"
        row = next(self._rows)
        now = self.timer.now  # type: ignore[union-attr]
        stream = TokenStream(row, request_id, prompt_ids, max_tokens, now)
        req = SimRequest(
            row,
            row,
            now,
            len(prompt_ids),
            max_tokens,
            prefix_hashes=block_hashes(prompt_ids, self.block_tokens),
            block_tokens=self.block_tokens,
        )
        self._streams[row] = stream
        if not driver.submit(req):
            del self._streams[row]
            raise Rejected(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) "
                f"can never fit this instance's KV cache ({self.limits.max_total_tokens} tokens)"
            )
        self.n_requests += 1
        self.prompt_tokens_total += len(prompt_ids)
        return stream

    def expect(
        self, prompt_ids: Sequence[int], max_tokens: int, request_id: str
    ) -> tuple[TokenStream, SimRequest]:
        """Count a request whose KV cache is on its way here (decode role); its stream and request.

        It is in flight at once (:meth:`sim.engine.Engine.announce`) and
        joins the decode batch when :meth:`land` is called.

        Raises:
            Rejected: the prompt plus output can never fit the instance's KV cache.
        """
        assert self.driver is not None, "start() first"
        if not self.fits(len(prompt_ids), max_tokens):
            raise Rejected(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) "
                f"can never fit this instance's KV cache ({self.limits.max_total_tokens} tokens)"
            )
        row = next(self._rows)
        now = self.timer.now  # type: ignore[union-attr]
        stream = TokenStream(row, request_id, prompt_ids, max_tokens, now)
        req = SimRequest(row, row, now, len(prompt_ids), max_tokens)
        self._streams[row] = stream
        self.engine.announce(req)
        self.n_requests += 1
        self.prompt_tokens_total += len(prompt_ids)
        return stream, req

    def land(self, req: SimRequest, *, cached_tokens: int = 0) -> None:
        """The KV cache of an :meth:`expect`-ed request arrived: its first token now, then decode.

        ``cached_tokens``: what the prefill instance found in its cache (for usage).
        """
        driver = self.driver
        assert driver is not None, "start() first"
        s = self._streams.get(req.row)
        now = self.timer.now  # type: ignore[union-attr]
        if s is not None:
            s.cached_tokens = cached_tokens
            for h in self._hooks:
                h.on_start(s)
            self._token(s, now)
        req.generated = 1
        req.last_token_s = now
        if req.output_tokens <= 1:
            self.engine.unannounce(req)
            self._end(self._streams.pop(req.row, None))
        elif not driver.land(req):
            self._end(self._streams.pop(req.row, None))

    def abandon(self, req: SimRequest, reason: str) -> None:
        """An :meth:`expect`-ed request's KV cache will never come: end its stream, saying why."""
        s = self._streams.pop(req.row, None)
        if s is not None:
            self.engine.unannounce(req)
            s.error = reason
            self._end(s)

    def fits(self, prompt_tokens: int, max_tokens: int) -> bool:
        """Whether a request of this size could ever run here."""
        return prompt_tokens + max_tokens <= self.limits.max_total_tokens

    def flush_cache(self) -> bool:
        """Empty the prefix cache; refused (False) while requests are in flight, as SGLang does."""
        if self.engine.busy or self._streams:
            return False
        self.engine.kv = KvPool(self.limits.max_total_tokens)
        return True

    # -- what the endpoints read ---------------------------------------------------

    @property
    def n_running(self) -> int:
        """Requests admitted to the batch."""
        return self.engine.n_running

    @property
    def n_waiting(self) -> int:
        """Requests queued for admission."""
        return self.engine.n_waiting

    @property
    def kv_used_tokens(self) -> int:
        """KV slots in use."""
        return self.engine.kv.used_tokens

    @property
    def kv_usage(self) -> float:
        """Share of KV slots in use, 0 to 1."""
        return self.engine.kv.used_tokens / self.limits.max_total_tokens

    def output_ids(self, start: int, stop: int) -> list[int]:
        """Ids of output tokens ``start .. stop - 1`` (the seed's cycle)."""
        ids, n = self._out_ids, len(self._out_ids)
        return [ids[k % n] for k in range(start, stop)]

    def output_text(self, start: int, stop: int) -> str:
        """Text of output tokens ``start .. stop - 1``: the pieces joined, so deltas add up."""
        pieces, n = self._pieces, len(self._out_ids)
        return "".join(pieces[0] if k == 0 else pieces[(k - 1) % n + 1] for k in range(start, stop))

    # -- the driver's observer -----------------------------------------------------

    def step_done(self, driver: InstanceDriver, rec: StepRecord) -> None:
        streams = self._streams
        hooks = self._hooks
        for req in rec.started:
            s = streams.get(req.row)
            if s is not None:
                s.cached_tokens = req.cached_tokens
                self.cached_tokens_total += req.cached_tokens
                for h in hooks:
                    h.on_start(s)
        end_s = rec.end_s
        for req in rec.prefilled:
            s = streams.get(req.row)
            if s is not None:
                self._token(s, end_s)
        if rec.decoded:
            times = rec.token_times_s()
            for req in rec.decoded:
                s = streams.get(req.row)
                if s is not None:
                    for t in times:
                        self._token(s, t)
        for req in rec.finished:
            self._end(streams.pop(req.row, None))
        # A prefill instance's request ends here after its first token; its
        # KV cache goes to a decode instance (:mod:`sim.emulator.pd`).
        for req in rec.handoffs:
            self._end(streams.pop(req.row, None))

    def _end(self, s: TokenStream | None) -> None:
        if s is not None:
            s.done = True
            s.finish_s = s.last_token_s
            for h in self._hooks:
                h.on_finish(s)
            s._wake()

    def _token(self, s: TokenStream, t: float) -> None:
        s.n_tokens += 1
        self.generation_tokens_total += 1
        if s.n_tokens == 1:
            s.first_token_s = t
            for h in self._hooks:
                h.on_first_token(s)
        else:
            gap = t - s.last_token_s
            for h in self._hooks:
                h.on_token(s, gap)
        s.last_token_s = t
        s._wake()

    def rejected(self, driver: InstanceDriver, req: SimRequest) -> None:
        pass  # submit() sees the refusal and raises

    def changed(self, driver: InstanceDriver) -> None:
        pass  # gauges are read when scraped

    def _lag(self, lag_s: float) -> None:
        if lag_s < 0:
            lag_s = 0.0
        self.loop_lag_s = lag_s
        if lag_s > self.max_loop_lag_s:
            self.max_loop_lag_s = lag_s


def _output_cycle(tokenizer: Tokenizer, seed: int) -> tuple[list[int], list[str]]:
    """The cycle of output ids for ``seed`` and each one's text piece.

    Piece 0 is the first token's text; piece ``k`` (1 .. n) is what token
    ``k`` adds after token ``k - 1``, piece ``n`` being the cycle's first id
    again, after its last, so cycling pieces 1 .. n continues the text.
    """
    ids = tokenizer.ids_of_length(OUTPUT_CYCLE_TOKENS, seed=random.Random(seed).randrange(2**31))
    ring = [*ids, ids[0]]
    pieces: list[str] = []
    # Decode growing windows, so merges across token boundaries come out as a
    # real tokenizer would stream them; a window of a few tokens is enough.
    for k in range(len(ring)):
        lo = max(0, k - 4)
        before = tokenizer.decode(ring[lo:k]) if k > lo else ""
        text = tokenizer.decode(ring[lo : k + 1])
        pieces.append(text[len(before) :] if text.startswith(before) else text)
    return ids, pieces
