"""What one engine step is: its kind, the record it leaves, and the step log.

Shared by the engine's planning and applying halves (:mod:`sim.engine`).
:class:`GraphBatch` is the engine's side of a policy's
:class:`scheduler.policy.BatchHint`; :class:`StepLog` keeps one row per
step (a decode stretch is one row), so reports can show batch sizes,
padding and CUDA-graph use, and a user can see how the engine stepped.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import numpy as np

from scheduler.policy import BatchHint
from sim.inflight import SimRequest

__all__ = [
    "BATCH_COLUMNS",
    "STEP_COLUMNS",
    "STEP_DECODE",
    "STEP_IDLE",
    "STEP_MIXED",
    "STEP_PREFILL",
    "GraphBatch",
    "StepLog",
    "StepRecord",
    "check_hints",
    "stretch_s",
]

#: Kinds of the step in progress.
STEP_IDLE, STEP_PREFILL, STEP_DECODE, STEP_MIXED = 0, 1, 2, 3


class StepRecord:
    """What one step (or stretch of decode steps) did.

    The engine reuses one record: it is valid until the next :meth:`Engine.begin`.
    ``kind`` is ``prefill``, ``decode`` or ``mixed``; ``n_steps`` is the
    number of engine iterations (above 1 only for a decode stretch); the
    lists hold the requests that produced their first token, finished,
    were handed off to a decode instance, or were preempted. A prefill or
    mixed step also says how many sequences it prefilled (``n_prefill``),
    the tokens its shape computed (``shape_tokens``: the real new tokens,
    or the padded graph shape's), and whether it replayed a CUDA graph of
    ``graph_batch`` sequences of ``graph_tokens`` tokens.

    What a driver records: ``started`` holds the requests whose prefill
    began in this step for the first time (``req.cached_tokens`` of their
    prompt were found cached), ``first_decodes`` the PD requests whose first
    decode step on this instance ended (``req.first_decode_s`` after their
    KV landed).

    Tokens, for a driver that streams them (an engine built with
    ``track_tokens``): every request in ``decoded`` produced one token at
    the end of each of the ``n_steps`` steps (:meth:`token_times_s`), and
    every request in ``prefilled`` produced one token at ``end_s`` (a
    first token, or the next token after a preemption's recompute).
    Without ``track_tokens`` both lists stay empty.
    """

    __slots__ = (
        "batch_size",
        "cuda_graph",
        "decode_a",
        "decode_b",
        "decode_c1",
        "decoded",
        "end_s",
        "finished",
        "first_decodes",
        "first_tokens",
        "graph_batch",
        "graph_tokens",
        "handoffs",
        "kind",
        "n_prefill",
        "n_steps",
        "preempted",
        "prefill_tokens",
        "prefilled",
        "shape_tokens",
        "start_s",
        "started",
    )

    def __init__(self, start_s: float = 0.0) -> None:
        self.first_tokens: list[SimRequest] = []
        self.finished: list[SimRequest] = []
        self.handoffs: list[SimRequest] = []
        self.preempted: list[SimRequest] = []
        self.started: list[SimRequest] = []
        self.first_decodes: list[SimRequest] = []
        self.decoded: list[SimRequest] = []
        self.prefilled: list[SimRequest] = []
        self.reset(start_s)

    def reset(self, start_s: float) -> None:
        """Empty the record for a step starting at ``start_s``."""
        self.kind = "idle"
        self.start_s = self.end_s = start_s
        self.n_steps = self.batch_size = self.prefill_tokens = 0
        self.n_prefill = self.shape_tokens = self.graph_batch = self.graph_tokens = 0
        self.cuda_graph = False
        self.decode_a = self.decode_b = 0.0
        self.decode_c1 = 0
        # Most steps leave most lists empty: test before clearing.
        if self.started:
            self.started.clear()
        if self.first_decodes:
            self.first_decodes.clear()
        if self.decoded:
            self.decoded.clear()
        if self.prefilled:
            self.prefilled.clear()
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

    def token_times_s(self) -> list[float]:
        """End time of each of the ``n_steps`` steps: when ``decoded`` requests got their tokens.

        A decode stretch's step ``i`` takes ``a + b * (c1 + batch * i)``
        (:func:`stretch_s`); any other step ends at ``end_s``.
        """
        if self.kind != "decode" or self.n_steps <= 1:
            return [self.end_s]
        a, b, c1, batch, t0 = (
            self.decode_a,
            self.decode_b,
            self.decode_c1,
            self.batch_size,
            self.start_s,
        )
        times = [t0 + stretch_s(a, b, c1, batch, i) for i in range(1, self.n_steps)]
        times.append(self.end_s)
        return times


def stretch_s(a: float, b: float, c1: int, batch: int, k: int) -> float:
    """Duration of ``k`` decode steps: step ``i`` takes ``a + b * (c1 + batch * i)``."""
    return k * a + b * (k * c1 + batch * (k * (k - 1) // 2))


class GraphBatch:
    """Requests enqueued together to run as one CUDA-graph prefill batch.

    The engine's record of a :class:`scheduler.policy.BatchHint`: the
    captured shape, how many members were queued, and whether the batch
    was broken up (it could not run whole; its members run eagerly).
    """

    __slots__ = ("broken", "padded_batch", "padded_tokens", "size")

    def __init__(self, padded_tokens: int, padded_batch: int) -> None:
        self.padded_tokens = padded_tokens
        self.padded_batch = padded_batch
        self.size = 0
        self.broken = False

    def __repr__(self) -> str:
        return (
            f"GraphBatch({self.size} of {self.padded_batch} x {self.padded_tokens} tokens"
            f"{', broken' if self.broken else ''})"
        )


#: Columns of ``SimResult.batches_frame()``: :class:`StepLog` rows of prefill and mixed steps.
BATCH_COLUMNS: tuple[str, ...] = (
    "start_s",
    "end_s",
    "instance",
    "kind",
    "n_prefill",
    "decode_batch",
    "prefill_tokens",
    "shape_tokens",
    "padding_tokens",
    "cuda_graph",
    "graph_batch",
    "graph_tokens",
)

#: Columns of :meth:`StepLog.columns` (``steps.parquet``, ``SimResult.steps_frame()``).
STEP_COLUMNS: tuple[str, ...] = (
    *BATCH_COLUMNS[:4],
    "n_steps",
    *BATCH_COLUMNS[4:],
    "n_first_tokens",
    "n_finished",
    "n_preempted",
)

_KINDS = ("prefill", "decode", "mixed")


class StepLog:
    """One row per engine step, a decode stretch being one row, as typed arrays.

    Every step of every instance, whatever the policy. The columns
    (:data:`STEP_COLUMNS`):

    * ``start_s``, ``end_s``: when the step (or stretch) ran, seconds;
    * ``instance``: the instance id;
    * ``kind``: ``prefill`` (prefill chunks only), ``decode`` (the running
      batch produces one token each), ``mixed`` (both in one step: vLLM's
      steps, SGLang's ``--enable-mixed-chunk``);
    * ``n_steps``: engine iterations the row covers (above 1 only for a
      decode stretch, whose batch does not change);
    * ``n_prefill``: sequences that prefilled (a chunk or a whole prompt);
    * ``decode_batch``: sequences that decoded (in each of the ``n_steps``);
    * ``prefill_tokens``: new prompt tokens computed; ``shape_tokens``: the
      tokens the step's shape computed (the padded graph shape's when a
      CUDA graph ran); ``padding_tokens``: their difference;
    * ``cuda_graph``, ``graph_batch``, ``graph_tokens``: whether a prefill
      ran as a CUDA graph of ``graph_batch`` sequences of ``graph_tokens``;
    * ``n_first_tokens``, ``n_finished``, ``n_preempted``: requests that got
      their first token, finished, or were preempted at this step.
    """

    __slots__ = (
        "cuda_graph",
        "decode_batch",
        "end_s",
        "graph_batch",
        "graph_tokens",
        "instance",
        "kind",
        "n_finished",
        "n_first_tokens",
        "n_preempted",
        "n_prefill",
        "n_steps",
        "prefill_tokens",
        "shape_tokens",
        "start_s",
    )

    def __init__(self) -> None:
        self.start_s = array("d")
        self.end_s = array("d")
        self.instance = array("i")
        self.kind = array("b")
        self.n_steps = array("q")
        self.n_prefill = array("i")
        self.decode_batch = array("i")
        self.prefill_tokens = array("q")
        self.shape_tokens = array("q")
        self.cuda_graph = array("b")
        self.graph_batch = array("i")
        self.graph_tokens = array("i")
        self.n_first_tokens = array("i")
        self.n_finished = array("i")
        self.n_preempted = array("i")

    def __len__(self) -> int:
        return len(self.start_s)

    def record(self, rec: StepRecord, instance: int) -> None:
        """Append the step (or decode stretch) ``rec`` ran on ``instance``."""
        kind = rec.kind
        self.start_s.append(rec.start_s)
        self.end_s.append(rec.end_s)
        self.instance.append(instance)
        self.kind.append(_KINDS.index(kind))
        self.n_steps.append(rec.n_steps)
        self.n_prefill.append(rec.n_prefill)
        self.decode_batch.append(rec.batch_size - rec.n_prefill if kind != "prefill" else 0)
        self.prefill_tokens.append(rec.prefill_tokens)
        self.shape_tokens.append(rec.shape_tokens)
        self.cuda_graph.append(rec.cuda_graph)
        self.graph_batch.append(rec.graph_batch)
        self.graph_tokens.append(rec.graph_tokens)
        self.n_first_tokens.append(len(rec.first_tokens))
        self.n_finished.append(len(rec.finished))
        self.n_preempted.append(len(rec.preempted))

    def columns(self, *, prefills_only: bool = False) -> dict[str, np.ndarray]:
        """The rows as numpy arrays, keyed by :data:`STEP_COLUMNS`.

        ``prefills_only``: the prefill and mixed steps, keyed by :data:`BATCH_COLUMNS`.
        """
        kind = np.array(self.kind, dtype=np.int8)
        prefill = np.array(self.prefill_tokens, dtype=np.int64)
        shape = np.array(self.shape_tokens, dtype=np.int64)
        cols = {
            "start_s": np.array(self.start_s, dtype=np.float64),
            "end_s": np.array(self.end_s, dtype=np.float64),
            "instance": np.array(self.instance, dtype=np.int32),
            "kind": np.array(_KINDS, dtype=object)[kind].astype(str),
            "n_steps": np.array(self.n_steps, dtype=np.int64),
            "n_prefill": np.array(self.n_prefill, dtype=np.int32),
            "decode_batch": np.array(self.decode_batch, dtype=np.int32),
            "prefill_tokens": prefill,
            "shape_tokens": shape,
            "padding_tokens": shape - prefill,
            "cuda_graph": np.array(self.cuda_graph, dtype=bool),
            "graph_batch": np.array(self.graph_batch, dtype=np.int32),
            "graph_tokens": np.array(self.graph_tokens, dtype=np.int32),
            "n_first_tokens": np.array(self.n_first_tokens, dtype=np.int32),
            "n_finished": np.array(self.n_finished, dtype=np.int32),
            "n_preempted": np.array(self.n_preempted, dtype=np.int32),
        }
        if not prefills_only:
            return cols
        keep = kind != _KINDS.index("decode")
        return {name: cols[name][keep] for name in BATCH_COLUMNS}


def check_hints(policy: str, hints: Sequence[BatchHint], n_dispatches: int) -> Sequence[BatchHint]:
    """``hints``, if they cover disjoint runs of ``n_dispatches`` dispatches with a valid shape.

    Raises:
        RuntimeError: naming the policy and the hint that does not fit.
    """
    end = 0
    for h in sorted(hints, key=lambda h: h.start):
        if (
            h.start < end
            or h.start + h.count > n_dispatches
            or not 1 <= h.count <= h.padded_batch
            or h.padded_tokens < 1
        ):
            raise RuntimeError(
                f"policy {policy!r} gave a batch hint {h} that does not fit its "
                f"{n_dispatches} dispatch(es) (runs must be disjoint, within range, "
                "and no larger than padded_batch)"
            )
        end = h.start + h.count
    return hints
