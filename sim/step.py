"""What one engine step is: its kind and the record it leaves.

Shared by the engine's planning and applying halves (:mod:`sim.engine`).
"""

from __future__ import annotations

from sim.inflight import SimRequest

__all__ = ["STEP_DECODE", "STEP_IDLE", "STEP_MIXED", "STEP_PREFILL", "StepRecord", "stretch_s"]

#: Kinds of the step in progress.
STEP_IDLE, STEP_PREFILL, STEP_DECODE, STEP_MIXED = 0, 1, 2, 3


class StepRecord:
    """What one step (or stretch of decode steps) did.

    The engine reuses one record: it is valid until the next :meth:`Engine.begin`.
    ``kind`` is ``prefill``, ``decode`` or ``mixed``; ``n_steps`` is the
    number of engine iterations (above 1 only for a decode stretch); the
    lists hold the requests that produced their first token, finished,
    were handed off to a decode instance, or were preempted.
    """

    __slots__ = (
        "batch_size",
        "end_s",
        "finished",
        "first_tokens",
        "handoffs",
        "kind",
        "n_steps",
        "preempted",
        "prefill_tokens",
        "start_s",
    )

    def __init__(self, start_s: float = 0.0) -> None:
        self.first_tokens: list[SimRequest] = []
        self.finished: list[SimRequest] = []
        self.handoffs: list[SimRequest] = []
        self.preempted: list[SimRequest] = []
        self.reset(start_s)

    def reset(self, start_s: float) -> None:
        """Empty the record for a step starting at ``start_s``."""
        self.kind = "idle"
        self.start_s = self.end_s = start_s
        self.n_steps = self.batch_size = self.prefill_tokens = 0
        if self.first_tokens:
            self.first_tokens.clear()
        if self.finished:
            self.finished.clear()
        if self.handoffs:
            self.handoffs.clear()
        if self.preempted:
            self.preempted.clear()

    @property
    def changed(self) -> bool:
        """Whether the instance's set of requests changed (what policies are told)."""
        return bool(self.first_tokens or self.finished or self.handoffs or self.preempted)


def stretch_s(a: float, b: float, c1: int, batch: int, k: int) -> float:
    """Duration of ``k`` decode steps: step ``i`` takes ``a + b * (c1 + batch * i)``."""
    return k * a + b * (k * c1 + batch * (k * (k - 1) // 2))
