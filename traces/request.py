"""The Request record: one inference request as a trace describes it."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Request"]


@dataclass(frozen=True, slots=True)
class Request:
    """One request of a workload.

    Traces hold many of these as columns (:class:`traces.Trace`); a Request
    is what a driver or a policy sees of one row.
    """

    request_id: int
    #: Seconds from the start of the trace (the first arrival of a loaded
    #: file is 0).
    arrival_s: float
    prompt_tokens: int
    #: Tokens the response has (what an engine will produce; a policy reads
    #: :attr:`max_tokens`, the budget a router knows, instead).
    output_tokens: int
    #: Conversation the request belongs to, when the trace knows it.
    session_id: str | None = None
    #: Hashes of the prompt's consecutive blocks of ``block_tokens`` tokens,
    #: chained so that two requests sharing their first k hashes share a
    #: ``k * block_tokens``-token prefix. ``None`` when the trace has none.
    prefix_hashes: tuple[int, ...] | None = None
    block_tokens: int | None = None
    #: Served model as the trace names it (BurstGPT: ``ChatGPT``, ``GPT-4``).
    model: str | None = None
    #: BurstGPT's ``Conversation log`` / ``API log``.
    log_type: str | None = None
    #: The service failed it (BurstGPT: zero response tokens).
    failed: bool = False
    #: Per-request SLOs, when the workload sets them.
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None

    @property
    def max_tokens(self) -> int:
        """The output budget a client asks for: a replayed trace asks for its output length."""
        return self.output_tokens
