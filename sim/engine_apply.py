"""The engine's applying half: what a finished step changed.

A mixin of :class:`sim.engine.Engine` (its state is set up there): decoding
requests advance by a stretch's steps, prefills complete (first tokens,
cached blocks, hand-offs), requests join the decode batch, finish, or are
preempted, and inter-token gaps go to the ITL histogram.
"""

from __future__ import annotations

from heapq import heappop, heappush

from sim.inflight import DECODING, DONE, WAITING, SimRequest
from sim.step import STEP_MIXED, StepRecord

__all__ = ["Applying"]


class Applying:
    """Step application (mixin over the engine's state)."""

    def _advance(self, k: int, t_end: float, rec: StepRecord) -> None:
        """Every decoding request produced ``k`` tokens, the last at ``t_end``."""
        batch, t0 = self._batch, self._t0
        if self._kind == STEP_MIXED:
            d0 = t_end - t0
        else:
            a, b, c1 = self._a, self._b, self._c1
            d0 = a + b * c1
            if k > 1:
                self.itl.add_arith(a + b * (c1 + batch), b * batch, k - 1, batch)
        itl = self.itl
        if self._n_old:
            last = self._last_decode_end_s
            itl.add(d0 if t0 == last else (t0 - last) + d0, self._n_old)
        if self._fresh:
            first_end = t0 + d0
            for req in self._fresh:
                itl.add((t0 - req.last_token_s) + d0)
                req.fresh = False
                if req.kv_arrival_s is not None:
                    req.first_decode_s = first_end - req.kv_arrival_s
                    rec.first_decodes.append(req)
            self._fresh = []
        n = self._n_steps = self._n_steps + k
        self._ctx_sum += batch * k
        self.tokens_out += batch * k
        self._last_decode_end_s = t_end
        rec.n_steps = k
        heap = self._finish_heap
        while heap and heap[0][0] <= n:
            _, join_no, req = heappop(heap)
            if req.join_no == join_no and req.state == DECODING:
                del self.running[req.key]
                self._finish(req, t_end, rec)
        self._n_old = self.n_decoding

    def _complete_prefills(self, t_end: float, rec: StepRecord) -> None:
        kv = self.kv
        tokens = rec.prefilled if self.track_tokens else None
        for req, n in zip(self._reqs, self._news, strict=True):
            req.computed += n
            if req.computed < req.target:
                continue
            if self._partials and req in self._partials:
                self._partials.remove(req)
            keys = req.keys
            if keys and req.n_pinned < len(keys):
                rest = keys[req.n_pinned :] if req.n_pinned else keys
                req.node, moved = kv.insert(req.node, rest)
                req.private -= moved
                req.n_pinned = len(keys)
            if req.generated == 0:
                rec.first_tokens.append(req)
            else:
                self.itl.add(t_end - req.last_token_s)
            if req.output_tokens > 0:
                req.generated += 1
                self.tokens_out += 1
                if tokens is not None:
                    tokens.append(req)
            if req.generated >= req.output_tokens:
                del self.running[req.key]
                self._finish(req, t_end, rec)
            elif self._hands_off:
                del self.running[req.key]
                self._release(req)
                req.last_token_s = t_end
                rec.handoffs.append(req)
            else:
                self._join_decode(req, t_end)

    def _join_decode(self, req: SimRequest, last_token_s: float) -> None:
        req.state = DECODING
        req.ctx0 = req.target
        req.step0 = self._n_steps
        if self._block > 1:
            # It takes a new block at each step j with j % block == phase.
            phase = (self._slack[req.row] + req.step0) % self._block
            self._phase[req.row] = phase
            self._phases[phase] += 1
        self._n_joins += 1
        req.join_no = self._n_joins
        heappush(
            self._finish_heap,
            (self._n_steps + req.output_tokens - req.generated, req.join_no, req),
        )
        self.n_decoding += 1
        self._ctx_sum += req.ctx0
        req.fresh = True
        req.last_token_s = last_token_s
        self._fresh.append(req)

    def _release(self, req: SimRequest) -> None:
        """Free a request's KV slots and unpin its blocks (it left ``running`` already)."""
        if req.state == DECODING:
            steps = self._n_steps - req.step0
            req.generated += steps
            req.private += self._grown_slots(req, self._n_steps)
            if self._block > 1:
                self._phases[self._phase.pop(req.row)] -= 1
            self.n_decoding -= 1
            self._ctx_sum -= req.ctx0 + steps
            if req.fresh:
                self._fresh.remove(req)
                req.fresh = False
            else:
                self._n_old -= 1
                req.last_token_s = self._last_decode_end_s
        elif self._partials and req in self._partials:
            self._partials.remove(req)
        self.kv.release(req.private)
        req.private = 0
        if self._block > 1:
            del self._slack[req.row]
        if req.node is not None:
            self.kv.release_path(req.node)
            req.node = None
        req.n_pinned = 0
        req.state = DONE
        self.version += 1
        self.inflight_tokens -= req.prompt_tokens + req.max_tokens

    def _finish(self, req: SimRequest, t_end: float, rec: StepRecord) -> None:
        self._release(req)
        rec.finished.append(req)

    def _preempt(self, req: SimRequest) -> None:
        """Preempt by recompute: free everything, requeue at the front (it left ``running``)."""
        self._release(req)
        self.inflight_tokens += req.prompt_tokens + req.max_tokens
        req.state = WAITING
        req.target = req.prompt_tokens + req.generated
        req.computed = 0
        req.n_preemptions += 1
        self.n_preemptions += 1
        self.waiting.appendleft(req)
        self.waiting_tokens += req.target
        self.current_record.preempted.append(req)
