"""The engine's planning half: which batch runs next, and for how long.

A mixin of :class:`sim.engine.Engine` (its state is set up there); see that
module's docstring for the model. :meth:`sim.engine.Engine.begin` takes these
steps: admit transferred requests, form a prefill batch, reserve (and preempt
for) the decode batch, plan a decode stretch; a stretch in progress can be
cut or synced.

Graph batches: requests enqueued with a :class:`sim.step.GraphBatch` (a
policy's :class:`scheduler.policy.BatchHint`) run as one prefill step of
their own once the first heads the queue with no chunked prompt in
progress: all of them and nothing else, unchunked, priced as a CUDA graph
of the padded shape (``cost.prefill_time_s(..., cuda_graph=True)`` over
``padded_batch`` sequences of ``padded_tokens`` new tokens, the real ones
over their cached prefixes, the padding over none). Plain requests stop
before a graph batch, as they stop at a chunk that does not fit. If the
batch cannot be admitted whole (KV cache, request limit), the admitted
members run eagerly and the rest become plain requests; so do all of them
when one now needs more new tokens than the shape holds (its cached prefix
was evicted). Padding takes no KV slots.
"""

from __future__ import annotations

import math
from heapq import heappop

from sim.inflight import DECODING, PREFILLING, SimRequest
from sim.kv import block_keys
from sim.step import STEP_DECODE, STEP_MIXED, STEP_PREFILL, GraphBatch, stretch_s

__all__ = ["Planning"]


class Planning:
    """Batch formation and stretch planning (mixin over the engine's state)."""

    def _admit(self, req: SimRequest) -> None:
        self.version += 1
        self._n_admitted += 1
        req.key = self._n_admitted
        self.running[req.key] = req

    def _admit_prefilled(self, now_s: float) -> None:
        """Admit transferred requests at the head of the queue (no compute needed)."""
        waiting, kv = self.waiting, self.kv
        cap = self.limits.max_running_requests
        while waiting and waiting[0].kv_ready:
            req = waiting[0]
            slots = self._slots_for(req, req.target)
            if len(self.running) >= cap or kv.available_tokens - self._watermark() < slots:
                return
            waiting.popleft()
            kv.allocate(slots)
            self._took(req, req.target, slots)
            req.kv_ready = False
            req.private = slots
            self._admit(req)
            self._join_decode(req, req.last_token_s)

    def _plan_prefill(
        self, now_s: float, budget: int, decode_batch: int, *, admit: bool = True
    ) -> bool:
        """Form a prefill batch under ``budget`` new tokens; False when none can be formed.

        ``admit``: waiting requests may join (else only the chunked prompt in
        progress continues).
        """
        kv = self.kv
        reqs: list[SimRequest] = []
        news: list[int] = []
        cacheds: list[int] = []
        # vLLM's decodes hold their slots already (reserved before this call).
        watermark = 0 if self._vllm else self._watermark()
        self._blocked_evictable = 0
        rem = budget
        cap = self._chunk_cap
        partials = self._partials
        # Chunked prompts in progress continue first, oldest first (one at a
        # time unless vLLM's long_prefill_token_threshold caps each chunk).
        for part in partials:
            left = part.target - part.computed
            n = left if not self._chunking or left < rem else rem
            if n > cap:
                n = cap
            slots = self._slots_for(part, n)
            if n <= 0 or kv.available_tokens - watermark < slots:
                if not reqs:
                    return False
                admit = False
                break
            kv.allocate(slots)
            self._took(part, n, slots)
            part.private += slots
            reqs.append(part)
            news.append(n)
            cacheds.append(part.computed)
            rem -= n
        waiting, running = self.waiting, self.running
        max_running = self.limits.max_running_requests if admit else 0
        block = self._block
        groups = self._groups
        group = None
        if groups and not partials and waiting:
            group = groups.get(waiting[0].row)
            if group is not None:
                rem = math.inf  # a graph batch runs whole, unchunked
        while waiting and rem > 0 and len(running) < max_running:
            req = waiting[0]
            if req.kv_ready:
                break
            if (groups or group is not None) and groups.get(req.row) is not group:
                break  # a graph batch runs alone
            keys = req.keys
            if keys is None and req.prefix_hashes is not None and req.block_tokens:
                keys = req.keys = block_keys(req.prefix_hashes, req.prompt_tokens, req.block_tokens)
            if keys:
                n_hit, hit, pinned_free = kv.match(keys)
                cached = hit if hit < req.target else req.target - 1
                if block > 1:
                    cached -= cached % block  # whole blocks of a hit only
            else:
                n_hit = cached = pinned_free = 0
            need = req.target - cached
            n = need
            if need > rem:
                if self._chunking:
                    n = rem
                elif reqs:
                    break
            if n > cap:
                n = cap
            slots = n if block == 1 else -(-n // block) * block
            if kv.available_tokens - pinned_free - watermark < slots:
                self._blocked_evictable = pinned_free
                break
            waiting.popleft()
            if group is not None:
                del groups[req.row]
            self.waiting_tokens -= req.target
            if n_hit:
                req.node = kv.acquire(keys, n_hit)
            kv.allocate(slots)
            if block > 1:
                self._slack[req.row] = slots - n
            req.n_pinned = n_hit
            req.private = slots
            req.computed = cached
            req.state = PREFILLING
            self._admit(req)
            if not req.prefill_started:
                req.prefill_started = True
                req.cached_tokens = cached
                self.current_record.started.append(req)
            reqs.append(req)
            news.append(n)
            cacheds.append(cached)
            rem -= n
            if n < need:
                partials.append(req)  # cut by the budget (rem is 0) or by vLLM's cap
        if group is not None and len(reqs) != group.size:
            self._break_group(group)
        if not reqs:
            return False
        self._reqs, self._news = reqs, news
        rec = self.current_record
        rec.prefill_tokens = rec.shape_tokens = sum(news)
        rec.n_prefill = len(reqs)
        rec.n_steps = 1
        if group is not None:
            pad, size = group.padded_tokens, group.padded_batch
            if not group.broken and len(reqs) <= size and max(news) <= pad:
                self._kind = STEP_PREFILL
                dur = self.cost.prefill_time_s(
                    [pad] * size, cacheds + [0] * (size - len(reqs)), cuda_graph=True
                )
                rec.kind = "prefill"
                rec.batch_size = len(reqs)
                rec.cuda_graph = True
                rec.graph_batch, rec.graph_tokens = size, pad
                rec.shape_tokens = pad * size
                assert dur > 0, f"step duration must be positive, got {dur}"
                self.step_end_s = now_s + dur
                return True
        if decode_batch:
            if self.track_tokens:
                self.current_record.decoded.extend(
                    r for r in running.values() if r.state == DECODING
                )
            self._kind = STEP_MIXED
            self._batch = decode_batch
            self._k = self._synced = 1
            self._c1 = self._ctx_sum + decode_batch
            dur = self.cost.mixed_time_s(news, cacheds, decode_batch, self._c1)
            rec.kind = "mixed"
            rec.batch_size = decode_batch + len(reqs)
        else:
            self._kind = STEP_PREFILL
            dur = self.cost.prefill_time_s(news, cacheds)
            rec.kind = "prefill"
            rec.batch_size = len(reqs)
        assert dur > 0, f"step duration must be positive, got {dur}"
        self.step_end_s = now_s + dur
        return True

    def _break_group(self, group: GraphBatch) -> None:
        """The graph batch cannot run whole: its members still waiting become plain requests."""
        group.broken = True
        groups = self._groups
        for req in self.waiting:
            if groups.get(req.row) is group:
                del groups[req.row]

    # -- KV blocks ------------------------------------------------------------------

    def _slots_for(self, req: SimRequest, n: int) -> int:
        """Slots to allocate for ``n`` more tokens of a running ``req``: its last block's
        free slots first, then whole blocks."""
        block = self._block
        if block == 1:
            return n
        extra = n - self._slack.get(req.row, 0)
        return -(-extra // block) * block if extra > 0 else 0

    def _took(self, req: SimRequest, n: int, slots: int) -> None:
        """``req`` used ``n`` more tokens' slots, ``slots`` of them newly allocated."""
        if self._block > 1:
            self._slack[req.row] = self._slack.get(req.row, 0) + slots - n

    def _decode_slots(self, a: int, b: int) -> int:
        """Slots the decode batch newly takes over decode steps ``a`` to ``b - 1``.

        One per request per step with blocks of one token; otherwise a whole
        block for each request whose last block is full at the step: a
        request of phase ``c`` takes one at every step ``j`` with
        ``j % block == c``.
        """
        block = self._block
        if block == 1:
            return self.n_decoding * (b - a)
        blocks = 0
        for c, count in enumerate(self._phases):
            if count:
                blocks += count * ((b - 1 - c) // block - (a - 1 - c) // block)
        return blocks * block

    def _decode_steps_within(self, slots: int, first: int) -> int:
        """How many decode steps from step ``first`` on the batch can take within ``slots``."""
        batch, block = self.n_decoding, self._block
        if block == 1:
            return slots // batch
        # A full cycle of ``block`` steps takes one block per request.
        blocks = slots // block
        cycles = blocks // batch
        blocks -= cycles * batch
        steps, phases = cycles * block, self._phases
        j = first + steps
        while blocks >= phases[j % block]:
            blocks -= phases[j % block]
            j += 1
            steps += 1
        return steps

    def _watermark(self) -> int:
        """Slots kept free for the next decode step of the running batch (SGLang's admission)."""
        if self._block == 1:
            return self.n_decoding
        n = self._n_steps
        return self._decode_slots(n, n + 1)

    def _grown_slots(self, req: SimRequest, n: int) -> int:
        """Slots a decoding ``req`` took since it joined the batch, by decode step ``n``."""
        if self._block == 1:
            return n - req.step0
        block, c = self._block, self._phase[req.row]
        return ((n - 1 - c) // block - (req.step0 - 1 - c) // block) * block

    def _reserve_decode(self) -> int:
        """Allocate one decode step's KV slots, preempting the youngest until they fit.

        Returns the decode batch size (0 when every decoding request was preempted).
        """
        n = self._n_steps
        while not self.kv.allocate(self._decode_slots(n, n + 1)):
            _, victim = self.running.popitem()
            self._preempt(victim)
        return self.n_decoding

    def _coeffs_for(self, batch: int) -> tuple[float, float]:
        c = self._coeffs.get(batch)
        if c is None:
            c = self.cost.decode_coeffs(batch, cuda_graph=batch <= self._graph_bs)
            self._coeffs[batch] = c
        return c

    def _plan_decode(self, now_s: float, batch: int) -> None:
        """Plan a stretch of decode steps (one step unless fast-forwarding)."""
        a, b = self._coeffs_for(batch)
        c1 = self._ctx_sum + batch
        k = 1
        # After a preemption the queue has a new head and free slots: the
        # next step plans again, as stepping one at a time would.
        if self.fast_forward and not self.current_record.preempted:
            heap = self._finish_heap
            while heap[0][2].join_no != heap[0][1] or heap[0][2].state != DECODING:
                heappop(heap)
            k = heap[0][0] - self._n_steps
            kv = self.kv
            first = self._n_steps + 1
            k_kv = 1 + self._decode_steps_within(kv.available_tokens, first)
            if self._blocked_evictable:
                # The queue head is blocked and would pin evictable cached
                # blocks. Evicting one of them lowers the pinning cost while
                # a budget-sized chunk stays the same size, so the head may
                # fit after an eviction: plan again at every step that evicts.
                k_kv = (
                    1 if self._evicted_now else 1 + self._decode_steps_within(kv.free_tokens, first)
                )
            if k_kv < k:
                k = k_kv
        self._kind = STEP_DECODE
        self._k, self._synced, self._batch = k, 1, batch
        self._a, self._b, self._c1 = a, b, c1
        self.step_end_s = now_s + stretch_s(a, b, c1, batch, k)
        assert self.step_end_s > now_s, "decode step duration must be positive"
        rec = self.current_record
        rec.kind = "decode"
        rec.batch_size = batch
        rec.decode_a, rec.decode_b, rec.decode_c1 = a, b, c1
        if self.track_tokens:
            rec.decoded.extend(r for r in self.running.values() if r.state == DECODING)

    # -- inside a stretch --------------------------------------------------------

    def _steps_started(self, now_s: float) -> int:
        """Steps of the stretch started by ``now_s`` (the one ending at ``now_s`` counts, not the next)."""
        t0, k, a, b, c1, batch = self._t0, self._k, self._a, self._b, self._c1, self._batch
        elapsed = now_s - t0
        if elapsed <= 0.0 or k == 1:
            return 1
        half = b * batch / 2.0
        lin = a + b * c1 - half
        if half > 0.0:
            m = math.ceil(2.0 * elapsed / (lin + math.sqrt(lin * lin + 4.0 * half * elapsed)))
        else:
            m = math.ceil(elapsed / lin)
        m = min(max(m, 1), k)
        # Guard the float rounding of the root: smallest m with t0 + T(m) >= now.
        while m > 1 and t0 + stretch_s(a, b, c1, batch, m - 1) >= now_s:
            m -= 1
        while m < k and t0 + stretch_s(a, b, c1, batch, m) < now_s:
            m += 1
        return m

    def sync(self, now_s: float) -> None:
        """Allocate the KV slots of the stretch's steps started by ``now_s``.

        Stepping one iteration at a time allocates (and evicts) at each
        step's start; this makes what a view reads mid-stretch the same.
        """
        if self._kind == STEP_DECODE and self._synced < self._k:
            m = self._steps_started(now_s)
            if m > self._synced:
                n = self._n_steps
                ok = self.kv.allocate(self._decode_slots(n + self._synced, n + m))
                assert ok, "stretch planned beyond the KV cache"
                self._synced = m

    def cut(self, now_s: float) -> float | None:
        """End the stretch in progress after the step running at ``now_s``.

        Returns the new end time, or None when the step in progress already
        is the last one (or no stretch runs).
        """
        if self._kind != STEP_DECODE or self._k == 1:
            return None
        m = self._steps_started(now_s)
        if m >= self._k:
            return None
        self._k = m
        self.step_end_s = self._t0 + stretch_s(self._a, self._b, self._c1, self._batch, m)
        return self.step_end_s
