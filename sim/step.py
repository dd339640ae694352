"""What one engine step is: its kind, the record it leaves, and the step log.

Shared by the engine's planning and applying halves (:mod:`sim.engine`).
:class:`GraphBatch` is the engine's side of a policy's
:class:`scheduler.policy.BatchHint`; :class:`StepLog` keeps one row per
step (a decode stretch is one row), so reports can show batch sizes,
padding and CUDA-graph use, and a user can see how the engine stepped.
"""

from __future__ import annotations

import struct
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
_KIND_CODES = {kind: code for code, kind in enumerate(_KINDS)}


class StepLog:
    """One row per engine step, a decode stretch being one row, packed as it runs.

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

    __slots__ = ("_rows",)

    #: The fields of a packed row after ``start_s`` and ``end_s``, in :meth:`record`'s order.
    _INT_FIELDS = (
        "instance",
        "kind",
        "n_steps",
        "n_prefill",
        "decode_batch",
        "prefill_tokens",
        "shape_tokens",
        "cuda_graph",
        "graph_batch",
        "graph_tokens",
        "n_first_tokens",
        "n_finished",
        "n_preempted",
    )
    _ROW = struct.Struct(f"<2d{len(_INT_FIELDS)}q")
    _DTYPE = np.dtype(
        [("start_s", "<f8"), ("end_s", "<f8")] + [(name, "<i8") for name in _INT_FIELDS]
    )

    def __init__(self) -> None:
        # Packed rows: one struct.pack per step on the hot path.
        self._rows = bytearray()

    def __len__(self) -> int:
        return len(self._rows) // self._ROW.size

    def record(self, rec: StepRecord, instance: int) -> None:
        """Append the step (or decode stretch) ``rec`` ran on ``instance``."""
        kind = _KIND_CODES[rec.kind]
        n_prefill = rec.n_prefill
        self._rows += self._ROW.pack(
            rec.start_s,
            rec.end_s,
            instance,
            kind,
            rec.n_steps,
            n_prefill,
            rec.batch_size - n_prefill if kind else 0,
            rec.prefill_tokens,
            rec.shape_tokens,
            rec.cuda_graph,
            rec.graph_batch,
            rec.graph_tokens,
            len(rec.first_tokens),
            len(rec.finished),
            len(rec.preempted),
        )

    def columns(self, *, prefills_only: bool = False) -> dict[str, np.ndarray]:
        """The rows as numpy arrays, keyed by :data:`STEP_COLUMNS`.

        ``prefills_only``: the prefill and mixed steps, keyed by :data:`BATCH_COLUMNS`.
        """
        got = np.frombuffer(bytes(self._rows), dtype=self._DTYPE)
        kind = got["kind"]
        small = np.int32
        cols = {
            "start_s": got["start_s"].copy(),
            "end_s": got["end_s"].copy(),
            "instance": got["instance"].astype(small),
            "kind": np.array(_KINDS, dtype=object)[kind].astype(str),
            "n_steps": got["n_steps"].copy(),
            "n_prefill": got["n_prefill"].astype(small),
            "decode_batch": got["decode_batch"].astype(small),
            "prefill_tokens": got["prefill_tokens"].copy(),
            "shape_tokens": got["shape_tokens"].copy(),
            "padding_tokens": got["shape_tokens"] - got["prefill_tokens"],
            "cuda_graph": got["cuda_graph"].astype(bool),
            "graph_batch": got["graph_batch"].astype(small),
            "graph_tokens": got["graph_tokens"].astype(small),
            "n_first_tokens": got["n_first_tokens"].astype(small),
            "n_finished": got["n_finished"].astype(small),
            "n_preempted": got["n_preempted"].astype(small),
        }
        if not prefills_only:
            return cols
        keep = kind != _KIND_CODES["decode"]
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
