"""The simulator's in-flight request: the trace row's fields plus engine state.

One :class:`SimRequest` exists per request from its arrival until it
finishes; then it is dropped, and what it became lives on only in the
result columns (:mod:`sim.metrics`), indexed by ``row``. Policies receive it
as a :class:`scheduler.policy.RequestLike` and must read only those fields.
"""

from __future__ import annotations

__all__ = ["DECODING", "DONE", "NEW", "PREFILLING", "WAITING", "SimRequest"]

#: Arrived, not yet dispatched (possibly held by the policy).
NEW = 0
#: In an instance's waiting queue.
WAITING = 1
#: Admitted; some prompt (or recompute) tokens still to prefill.
PREFILLING = 2
#: In the decode batch.
DECODING = 3
#: Finished, handed off, or rejected on this instance.
DONE = 4


class SimRequest:
    """A request in flight.

    Request fields (as in :class:`traces.Request`): ``request_id``,
    ``arrival_s``, ``prompt_tokens``, ``output_tokens``, ``session_id``,
    ``prefix_hashes``, ``block_tokens``, ``slo_ttft_s``, ``slo_tpot_s``,
    and ``max_tokens``, the output budget the client asked for (what a
    router knows; the trace's output length unless the trace says
    otherwise). ``output_tokens`` is what the engine will produce: only the
    engine reads it, never a policy.

    Engine state, owned by the instance serving it (see :mod:`sim.engine`):
    ``target`` tokens must hold KV before the next token can be sampled
    (the prompt, or prompt plus generated tokens after a preemption);
    ``computed`` of them do; ``generated`` output tokens exist (as of
    ``step0`` while decoding); ``private`` KV slots are its own (as of
    ``step0`` while decoding); ``n_pinned`` leading ``keys`` are pinned
    in the instance's cache.
    """

    __slots__ = (
        "arrival_s",
        "block_tokens",
        "cached_tokens",
        "computed",
        "ctx0",
        "first_decode_s",
        "fresh",
        "generated",
        "join_no",
        "key",
        "keys",
        "kv_arrival_s",
        "kv_ready",
        "last_token_s",
        "max_tokens",
        "n_pinned",
        "n_preemptions",
        "node",
        "output_tokens",
        "pd_decode",
        "prefill_started",
        "prefix_hashes",
        "private",
        "prompt_tokens",
        "request_id",
        "row",
        "session_id",
        "slo_tpot_s",
        "slo_ttft_s",
        "state",
        "step0",
        "target",
    )

    def __init__(
        self,
        row: int,
        request_id: int,
        arrival_s: float,
        prompt_tokens: int,
        output_tokens: int,
        session_id: str | None = None,
        prefix_hashes: list[int] | None = None,
        block_tokens: int | None = None,
        slo_ttft_s: float | None = None,
        slo_tpot_s: float | None = None,
        max_tokens: int | None = None,
    ) -> None:
        self.row = row
        self.request_id = request_id
        self.arrival_s = arrival_s
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.session_id = session_id
        self.prefix_hashes = prefix_hashes
        self.block_tokens = block_tokens
        self.slo_ttft_s = slo_ttft_s
        self.slo_tpot_s = slo_tpot_s
        self.max_tokens = output_tokens if max_tokens is None else max_tokens
        self.state = NEW
        #: Prefix-cache keys of the prompt's blocks (:func:`sim.kv.block_keys`),
        #: filled on first admission when the request has hashes.
        self.keys: list[int] | None = None
        #: The deepest prefix-cache node it pins (:class:`sim.kv.Node`), if any.
        self.node = None
        self.target = prompt_tokens
        self.computed = 0
        self.generated = 0
        self.private = 0
        self.n_pinned = 0
        self.step0 = 0
        self.ctx0 = 0
        self.key = 0
        self.join_no = -1
        self.fresh = False
        self.last_token_s = 0.0
        #: Set when the request reaches a decode instance with its KV cache.
        self.kv_ready = False
        self.kv_arrival_s: float | None = None
        self.prefill_started = False
        #: Prompt tokens found in the prefix cache when its prefill first started.
        self.cached_tokens = 0
        #: PD: KV landed at the decode instance to the end of its first decode step (s).
        self.first_decode_s: float | None = None
        #: PD: the decode instance chosen at dispatch (SGLang style), or -1.
        self.pd_decode = -1
        self.n_preemptions = 0

    def __repr__(self) -> str:
        return (
            f"SimRequest(id={self.request_id}, prompt={self.prompt_tokens}, "
            f"output={self.output_tokens}, state={self.state}, generated={self.generated})"
        )
