"""Engine model: one SGLang/vLLM instance as a pure step function.

NOTE on the model. An instance holds a FCFS waiting queue and a running set
(requests admitted to the batch). Each step is planned by :meth:`Engine.begin`
from the state at its start and applied by :meth:`Engine.end`:

* *Prefill* (SGLang's extend batch): first the chunked request in progress
  continues, then waiting requests are admitted in order under one token
  budget (``min(max_prefill_tokens, chunked_prefill_size)``), while
  ``max_running_requests`` and the KV cache allow. A request longer than the
  budget left is cut into a chunk and finishes prefilling in later steps
  (one chunked request at a time). A request whose next chunk does not fit
  blocks the queue behind it (head-of-line, as both engines do). Admission
  leaves room for one decode step of the running batch.
* *Decode*: every running request that finished prefilling produces one
  token. If the KV cache cannot take them, the youngest admitted request is
  preempted (KV freed, requeued at the front, recomputed later from its
  prompt plus the tokens it already produced), as vLLM does.
* By default prefill and decode batches alternate, prefill first whenever a
  prefill batch can be formed (SGLang's scheduler). With ``mixed_chunk``,
  one step decodes the running batch and fills the rest of the budget with
  prefill chunks (SGLang's ``--enable-mixed-chunk``).
* The vLLM engine (``limits.engine == "vllm"``, vLLM V1's
  vllm/v1/core/sched/scheduler.py ``Scheduler.schedule``) always mixes:
  one budget of ``max_num_batched_tokens`` per step, spent first on the
  running requests in admission order (one token per decode, then the
  chunk of the prompt in progress) and then on waiting requests. Decodes
  take their KV slots before admission, which keeps no reserve for them;
  a step that preempted admits no waiting request; and
  ``long_prefill_token_threshold`` caps each request's chunk.
* KV blocks (``limits.block_tokens``: SGLang's ``page_size``, vLLM's
  ``block_size``): the capacity is whole blocks; a request takes whole
  blocks (its last one fills before it takes another, so a decode step
  needs new slots only for the requests whose last block is full, and
  preemption comes when those cannot be had); it fits only if its prompt
  and output fill whole blocks within the capacity; and a prefix hit is
  reused in whole blocks only (vLLM's ``get_computed_blocks``), so a hit
  ending inside a block recomputes that block.
* Prefix cache: a request whose leading ``prefix_hashes`` blocks are cached
  skips computing them (at least one token is always computed); its prompt
  blocks are cached when its prefill completes (:mod:`sim.kv`).
* Roles: ``prefill`` instances hand a request off after its first token;
  ``decode`` instances take requests whose KV cache arrived
  (:meth:`Engine.enqueue_prefilled`) and admit them without computing.

Fast path. Decode steps whose batch does not change form a *stretch*,
planned and applied as one: decode time is affine in the total context
(``a + b * ctx``, :class:`StepCost`), context grows by the batch size each
step, so ``k`` steps take ``k*a + b*(k*c1 + B*k*(k-1)/2)``. A stretch ends
at the first finish or when the KV cache runs out. Requests that cannot be
admitted at its start cannot be admitted during it (KV only shrinks, the
running count is fixed), so the only outside event that can change the
schedule is a new head of the waiting queue; :meth:`Engine.cut` then ends
the stretch after the step in progress, exactly where stepping one
iteration at a time would have looked at the queue again. Two cases break
that monotony and are planned one step at a time: the step after a
preemption (new head, freed slots), and steps that evict cached blocks
while the blocked head would pin evictable ones (an eviction can lower its
cost while a budget-sized chunk stays the same). Per-request state of a
decoding request is kept relative to the instance's decode step counter,
so a stretch costs O(1) plus the requests that finish.

Graph batches (a policy's :class:`scheduler.policy.BatchHint`): members
run as one CUDA-graph prefill step of their own, priced on the padded
shape (:mod:`sim.engine_plan`); with ``mixed_chunk`` the hints are ignored.

Simplifications, stated so results can be read right: the waiting queue is
FCFS (SGLang's ``lpm`` reordering is not modelled); a vLLM step serves every
decode before any chunk (vLLM serves running requests in admission order, so
with ``long_prefill_token_threshold`` an older chunked prompt may take budget
ahead of a younger decode); SGLang's admission keeps one decode step of
slots free instead of its ``new_token_ratio`` reserve; a
request whose prompt plus output cannot fit the KV cache at all is rejected
at dispatch; a fully cached prompt recomputes its last token into one extra
slot; a prefill instance frees a request's KV slots when it hands it off
(the transfer time is still charged before the decode instance admits it).

The engine is one class in three modules: state, queries and the step
protocol here; batch formation in :mod:`sim.engine_plan`; step application
in :mod:`sim.engine_apply`.
"""

from __future__ import annotations

import math
from collections import deque

from scheduler.cost_model import StepCost
from sim.engine_apply import Applying
from sim.engine_plan import Planning
from sim.inflight import DECODING, PREFILLING, WAITING, SimRequest
from sim.kv import KvPool, block_keys
from sim.limits import EngineLimits
from sim.records import LogHistogram
from sim.step import STEP_DECODE, STEP_IDLE, STEP_MIXED, GraphBatch, StepRecord

__all__ = ["QUEUED", "QUEUED_HEAD", "REJECTED", "Engine", "StepRecord"]

#: :meth:`Engine.enqueue` results.
REJECTED = 0
QUEUED = 1
#: Queued and now at the head of an empty queue: a running stretch must be cut.
QUEUED_HEAD = 2


class Engine(Planning, Applying):
    """One serving instance: waiting queue, running batch, KV cache.

    Args:
        cost: step durations.
        limits: batching limits.
        instance_id: this instance's id (for results).
        role: ``mixed``, ``prefill`` or ``decode``.
        itl: histogram receiving inter-token gaps (seconds between a
            request's consecutive tokens, stalls included).
        fast_forward: plan unchanged decode batches as one stretch.
        track_tokens: say in each :class:`StepRecord` which requests produced
            tokens (``decoded``, ``prefilled``), for drivers that stream them.
        debug: check every invariant after each step (slow; tests).

    The engine writes no results: each step's :class:`StepRecord` says what
    happened (prefills started, first tokens, finishes, hand-offs), and the
    driver (:mod:`sim.driver`) records it.
    """

    def __init__(
        self,
        cost: StepCost,
        limits: EngineLimits,
        *,
        instance_id: int = 0,
        role: str = "mixed",
        itl: LogHistogram | None = None,
        fast_forward: bool = True,
        track_tokens: bool = False,
        debug: bool = False,
    ) -> None:
        if role not in ("mixed", "prefill", "decode"):
            raise ValueError(f"role: expected mixed, prefill or decode; got {role!r}")
        self.cost = cost
        self.limits = limits
        self.instance_id = instance_id
        self.role = role
        self.fast_forward = fast_forward
        self.debug = debug
        self.kv = KvPool(limits.max_total_tokens)
        self.itl = itl if itl is not None else LogHistogram()
        self.track_tokens = track_tokens
        self._hands_off = role == "prefill"
        self._budget = limits.step_budget_tokens
        self._chunking = limits.chunking
        self._graph_bs = limits.cuda_graph_max_bs
        self._coeffs: dict[int, tuple[float, float]] = {}
        #: Graph-batch members still waiting, by result row.
        self._groups: dict[int, GraphBatch] = {}
        self._hints = not limits.mixed_chunk
        self._vllm = limits.engine == "vllm"
        self._block = limits.block_tokens
        self._chunk_cap = limits.long_prefill_token_threshold or math.inf
        # KV blocks above one token (sim.engine_plan's block accounting):
        # free slots in each running request's last block, by result row, and
        # decoding requests by the step phase at which they take a new block.
        self._slack: dict[int, int] = {}
        self._phase: dict[int, int] = {}
        self._phases = [0] * self._block if self._block > 1 else []
        self.waiting: deque[SimRequest] = deque()
        #: Admitted requests by admission number: insertion order is age,
        #: so the youngest (the one to preempt) is the last.
        self.running: dict[int, SimRequest] = {}
        #: Requests part way through their prompt, in admission order (at most
        #: one unless vLLM's long_prefill_token_threshold caps chunks).
        self._partials: list[SimRequest] = []
        self._n_admitted = 0
        self._n_joins = 0
        # Decode batch, relative to the decode step counter.
        self.n_decoding = 0
        self._n_steps = 0
        self._ctx_sum = 0
        self._finish_heap: list[tuple[int, int, SimRequest]] = []
        # Inter-token gaps: requests that decoded in the last decode step
        # (their last token is at _last_decode_end_s) and the ones that
        # joined since (each with its own last-token time).
        self._n_old = 0
        self._fresh: list[SimRequest] = []
        self._last_decode_end_s = -math.inf
        #: Prompt tokens still to prefill in the waiting queue.
        self.waiting_tokens = 0
        #: Prompt plus output tokens of unfinished requests on the instance
        #: (announced incoming ones included).
        self.inflight_tokens = 0
        #: Requests whose KV cache is on its way here (:meth:`announce`).
        self.incoming = 0
        #: Bumped whenever the waiting or running set changes (drivers sample on it).
        self.version = 0
        #: Seconds spent running steps.
        self.busy_s = 0.0
        #: Output tokens produced here.
        self.tokens_out = 0
        self.n_preemptions = 0
        # The step in progress.
        self._kind = STEP_IDLE
        self._record = StepRecord()
        #: The record of the step in progress (None when idle); valid until the next step.
        self.current_record: StepRecord | None = None
        self._t0 = 0.0
        #: When the step (or stretch) in progress ends.
        self.step_end_s = 0.0
        self._k = self._synced = self._batch = self._c1 = 0
        self._a = self._b = 0.0
        self._reqs: list[SimRequest] = []
        self._news: list[int] = []
        # Why the last prefill attempt stopped (see _plan_decode).
        self._blocked_evictable = 0
        self._evicted_now = False

    # -- queries ---------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Whether a step is in progress."""
        return self._kind != STEP_IDLE

    @property
    def n_running(self) -> int:
        return len(self.running)

    @property
    def n_waiting(self) -> int:
        return len(self.waiting)

    def kv_used_tokens(self, now_s: float) -> int:
        """KV slots in use at ``now_s`` (inside a stretch: after the step in progress started)."""
        self.sync(now_s)
        return self.kv.used_tokens

    def cached_prefix_blocks(self, request: object, now_s: float) -> int:
        """Leading prefix blocks of ``request`` held in the prefix cache at ``now_s``."""
        keys = getattr(request, "keys", None)
        if keys is None:
            hashes = getattr(request, "prefix_hashes", None)
            block = getattr(request, "block_tokens", None)
            if not hashes or not block:
                return 0
            keys = block_keys(hashes, request.prompt_tokens, block)  # type: ignore[attr-defined]
        self.sync(now_s)
        return self.kv.match(keys)[0]

    def fits(self, req: SimRequest) -> bool:
        """Whether the request could ever complete here (prompt and output fit the KV cache).

        With KV blocks of ``block_tokens``, the whole blocks they take must fit.
        """
        tokens = req.prompt_tokens + max(req.output_tokens, 1)
        block = self._block
        return -(-tokens // block) * block <= self.kv.capacity_tokens

    # -- arrivals --------------------------------------------------------------

    def enqueue(self, req: SimRequest, now_s: float, group: GraphBatch | None = None) -> int:
        """Queue a dispatched request for prefill, as a member of ``group`` if given.

        Members of one group must be enqueued one after another.
        Returns :data:`REJECTED` (it can never fit; nothing changed),
        :data:`QUEUED_HEAD` (it heads an empty queue: call :meth:`cut` if a
        step is in progress) or :data:`QUEUED`.
        """
        if not self.fits(req):
            return REJECTED
        if group is not None and self._hints:
            group.size += 1
            self._groups[req.row] = group
        req.state = WAITING
        req.target = req.prompt_tokens + req.generated
        req.computed = 0
        self.waiting.append(req)
        self.waiting_tokens += req.target
        self.inflight_tokens += req.prompt_tokens + req.max_tokens
        self.version += 1
        return QUEUED_HEAD if len(self.waiting) == 1 else QUEUED

    def announce(self, req: SimRequest) -> None:
        """A request's KV cache is being transferred here; it counts as in flight from now."""
        self.incoming += 1
        self.inflight_tokens += req.prompt_tokens + req.max_tokens

    def unannounce(self, req: SimRequest) -> None:
        """An announced request will not come after all (its prefill instance rejected it)."""
        self.incoming -= 1
        self.inflight_tokens -= req.prompt_tokens + req.max_tokens

    def enqueue_prefilled(self, req: SimRequest, now_s: float, *, announced: bool = False) -> int:
        """Queue a request whose KV cache was transferred here (decode role).

        Its first token exists (``req.last_token_s`` is when); admission
        allocates its KV slots and it joins the decode batch directly.
        ``announced``: :meth:`announce` was called for it.
        """
        if announced:
            self.incoming -= 1
            self.inflight_tokens -= req.prompt_tokens + req.max_tokens
        if not self.fits(req):
            return REJECTED
        req.state = WAITING
        req.kv_ready = True
        req.kv_arrival_s = now_s
        req.target = req.computed = req.prompt_tokens + req.generated - 1
        self.waiting.append(req)
        self.inflight_tokens += req.prompt_tokens + req.max_tokens
        self.version += 1
        return QUEUED_HEAD if len(self.waiting) == 1 else QUEUED

    # -- planning ----------------------------------------------------------------

    def begin(self, now_s: float) -> float | None:
        """Plan the step starting at ``now_s``; its duration in seconds, or None when idle."""
        assert self._kind == STEP_IDLE, "begin() called while a step is in progress"
        self._record.reset(now_s)
        self.current_record = self._record
        self._t0 = now_s
        mixed = self.limits.mixed_chunk
        while True:
            if self.waiting and self.waiting[0].kv_ready:
                self._admit_prefilled(now_s)
            prefill_work = self.waiting or self._partials
            if not self.n_decoding:
                if prefill_work and self._plan_prefill(now_s, self._budget, 0):
                    break
                if self.waiting or self.running:
                    raise RuntimeError(
                        f"instance {self.instance_id}: nothing can run but "
                        f"{len(self.waiting)} waiting, {len(self.running)} running"
                    )
                self.current_record = None
                return None
            self._blocked_evictable = 0
            if not mixed and prefill_work and self._plan_prefill(now_s, self._budget, 0):
                break
            evicted = self.kv.evicted_tokens
            batch = self._reserve_decode()
            self._evicted_now = self.kv.evicted_tokens != evicted
            if not batch:
                continue  # every decoding request was preempted: plan again
            # vLLM admits no waiting request in a step that preempted.
            admit = not (self._vllm and self.current_record.preempted)
            if (
                mixed
                and ((self.waiting and admit) or self._partials)
                and self._plan_prefill(now_s, self._budget - batch, batch, admit=admit)
            ):
                break
            self._plan_decode(now_s, batch)
            break
        return self.step_end_s - now_s

    # -- applying ------------------------------------------------------------------

    def end(self) -> StepRecord:
        """Apply the step in progress (at its planned end time) and return its record."""
        kind, rec, t_end = self._kind, self.current_record, self.step_end_s
        assert kind != STEP_IDLE and rec is not None, "end() called with no step in progress"
        if kind == STEP_DECODE:
            if self._k > self._synced:
                n = self._n_steps
                ok = self.kv.allocate(self._decode_slots(n + self._synced, n + self._k))
                assert ok, "stretch planned beyond the KV cache"
            self._advance(self._k, t_end, rec)
        elif kind == STEP_MIXED:
            self._advance(1, t_end, rec)
            self._complete_prefills(t_end, rec)
        else:
            self._complete_prefills(t_end, rec)
        self.busy_s += t_end - self._t0
        rec.end_s = t_end
        self._kind = STEP_IDLE
        self.current_record = None
        self._reqs = self._news = ()
        if self.debug:
            self.check()
        return rec

    # -- invariants ----------------------------------------------------------------

    def check(self) -> None:
        """Assert the engine's invariants (debug runs and tests)."""
        self.kv.check()
        assert self._kind == STEP_IDLE
        running = list(self.running.values())
        decoding = [r for r in running if r.state == DECODING]
        assert len(running) <= self.limits.max_running_requests
        assert len(decoding) == self.n_decoding
        assert all(r.state == PREFILLING for r in running if r.state != DECODING)
        n = self._n_steps
        assert self._ctx_sum == sum(r.ctx0 + n - r.step0 for r in decoding)
        private = sum(
            r.private + (self._grown_slots(r, n) if r.state == DECODING else 0) for r in running
        )
        assert self.kv.private_tokens == private, (self.kv.private_tokens, private)
        if self._block > 1:
            assert set(self._slack) == {r.row for r in running}
            assert all(0 <= v < self._block for v in self._slack.values())
            assert sum(self._phases) == self.n_decoding == len(self._phase)
        for r in decoding:
            assert r.generated + n - r.step0 < r.output_tokens
            assert r.ctx0 + n - r.step0 == r.prompt_tokens + r.generated + n - r.step0 - 1
        assert all(r.state == WAITING for r in self.waiting)
        assert self.waiting_tokens == sum(r.target for r in self.waiting if not r.kv_ready)
        assert self._n_old + len(self._fresh) == self.n_decoding
        assert all(r.state == PREFILLING for r in self._partials)
        assert len(self._partials) <= 1 or self.limits.long_prefill_token_threshold
        waiting_rows = {r.row for r in self.waiting}
        assert all(row in waiting_rows for row in self._groups)
