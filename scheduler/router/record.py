"""``--record DIR``: the router's arrivals as a trace, and its result records.

The router hands each finished request to :meth:`Recorder.add` as a
:class:`RouterRecord` (times in seconds on its monotonic clock, asyncio's
and uvloop's ``loop.time()``); the recorder writes the folder every
``flush_every_s`` seconds from a thread of its own, and on
:meth:`Recorder.close`::

    DIR/
      run.json          RunMetadata: source "router", target, instances
                        (id, name, URL, role), options; written at start too
      results.parquet   the shared schema (traces.records.RESULT_SCHEMA), in
                        order, then x_request_id (string, <NA>: none given);
                        one row per request, sorted by arrival
      summary.json      traces.metrics.summarize over the records, with the
                        pooled ITL histogram; its "config" is the options
      trace.parquet     the arrivals as a canonical trace
                        (llmsched simulate --trace, llmsched replay)

which is the replay client's folder (:mod:`traces.replay.results`) plus
the trace, so ``llmsched report DIR SIMULATED_DIR`` shows the router run
beside a simulated one. Every file is written whole into ``DIR/.writing/``
and moved into place with ``os.replace``: a reader, or a crash, sees the
previous complete file or the new one, never half of one, and a crash
loses at most the last ``flush_every_s`` of records (plus one write's
time). Each write rewrites the files from every record so far, kept in
memory as numpy columns: a long recording costs about half a kilobyte a
request, and a write about 2.5 s per million requests recorded (one core,
in the recorder's thread; the router's :meth:`Recorder.add` only appends).

Times in the files count from the first arrival (``arrival_s`` of the
earliest request is 0); until the run closes, a request still in flight
that arrived earlier than every recorded one moves that origin at a later
write. ``send_s`` is the arrival (the router sees a request when its
client sends it), ``dispatch_s`` when it went upstream, ``router_queue_s``
their difference; what the router cannot see (prefill start, the other
PD parts of TTFT) is NaN, preemptions 0. Unknown cached tokens are written
0, as the replay writes them.

The trace holds every recorded arrival: ``request_id`` is the record's
``row``; ``output_tokens`` is what a served request produced and the
budget asked for (``max_tokens``) of one that was not (rejected, failed or
cut short: its true length is unknown); prompt tokens at least 1; session,
SLOs, prefix hashes and the model as the router saw them; none is flagged
failed, so a simulation serves the whole offered load.

Importing this module loads neither pandas nor pyarrow; a :class:`Recorder`
loads them when built (a router without ``--record`` never does).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ValidationError

from traces.errors import ConfigError
from traces.histogram import LogHistogram
from traces.metrics import summarize
from traces.records import (
    OUTCOME_NAMES,
    OUTCOME_OK,
    InstanceRecord,
    RunMetadata,
    json_safe,
    measured_frame,
)

if TYPE_CHECKING:
    import pandas as pd

    from traces.trace import Trace

__all__ = ["FILES", "Recorder", "RouterRecord"]

log = logging.getLogger(__name__)

#: The files a recording folder holds, by kind.
FILES: dict[str, str] = {
    "run": "run.json",
    "results": "results.parquet",
    "summary": "summary.json",
    "trace": "trace.parquet",
}
_STAGING = ".writing"


@dataclass(slots=True)
class RouterRecord:
    """One request as the router saw it; times are seconds on the router's monotonic clock.

    Attributes:
        row: the request's number, unique in the run (``request_id`` of the
            results and the trace; the policy's request id).
        arrival_s: when its request reached the router.
        request_id: its ``x-request-id`` as given (``None``: none).
        dispatch_s: when it was sent upstream (NaN: never).
        first_token_s: when its first output token reached the client (NaN: never).
        finish_s: when its last token, or its error, reached the client.
        prompt_tokens: the prompt's tokens (usage when the backend reported
            them, else the router's count).
        cached_tokens: prompt tokens served from the prefix cache (usage); -1: unknown.
        output_tokens: tokens produced.
        max_tokens: the output budget asked for (0: none given).
        session_id: ``x-session-id``.
        slo_ttft_s, slo_tpot_s: ``x-slo-ttft-ms`` / ``x-slo-tpot-ms``, in seconds.
        instance: the backend (its index) that served or prefilled it; -1: none.
        decode_instance: under PD, the backend that decoded it; -1 otherwise.
        outcome: a code of :data:`traces.records.OUTCOME_NAMES` (``OUTCOME_OK``,
            ``OUTCOME_ERROR``, ``OUTCOME_TIMEOUT``, ``OUTCOME_CANCELLED``,
            ``OUTCOME_REJECTED`` ...), not pending.
        http_status: the status the client got (``None``: none was sent).
        error_message: why it did not finish (``None`` when it did).
        chunk_times_s: when each streamed chunk that carried tokens reached
            the client, in order (for the ITL figures; empty: not streamed).
        chunk_tokens: tokens each chunk carried (``None``: one each).
        prefix_hashes: the prompt's block hashes, as the policy's prefix
            record computed them (``None``: unknown).
        block_tokens: tokens per prefix block (needed with ``prefix_hashes``).
        model: the model the client asked for.
    """

    row: int
    arrival_s: float
    request_id: str | None = None
    dispatch_s: float = math.nan
    first_token_s: float = math.nan
    finish_s: float = math.nan
    prompt_tokens: int = 0
    cached_tokens: int = -1
    output_tokens: int = 0
    max_tokens: int = 0
    session_id: str | None = None
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    instance: int = -1
    decode_instance: int = -1
    outcome: int = OUTCOME_OK
    http_status: int | None = None
    error_message: str | None = None
    chunk_times_s: list[float] | None = None
    chunk_tokens: list[int] | None = None
    prefix_hashes: Sequence[int] | None = None
    block_tokens: int | None = None
    model: str | None = None


# The in-memory columns: numpy ones concatenate, object ones hold str/arrays/None.
_FLOAT = ("arrival_s", "dispatch_s", "first_token_s", "finish_s", "slo_ttft_s", "slo_tpot_s")
_INT = ("row", "prompt_tokens", "cached_tokens", "output_tokens", "max_tokens", "instance",
        "decode_instance", "outcome")  # fmt: skip
_OBJECT = ("request_id", "session_id", "error_message", "prefix_hashes", "model")


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _itl(batch: list[RouterRecord], itl: LogHistogram) -> tuple[np.ndarray, np.ndarray]:
    """Each record's ITL figures (p50, p90, p99, max) and chunk count, for a whole batch at once.

    The same samples and percentiles as :func:`traces.records.inter_token_figures`
    (a chunk of ``k`` tokens ``g`` seconds after the previous one: ``k``
    samples of ``g / k``; linear interpolation), computed over the batch's
    concatenated chunks rather than record by record. Served records'
    samples go into ``itl``. A record whose chunk lists are inconsistent
    (times going backwards, a chunk of no tokens, lists of two lengths)
    keeps NaN figures.
    """
    n = len(batch)
    figures = np.full((n, 4), np.nan)
    sizes = np.zeros(n, dtype=np.int64)
    times: list[float] = []
    tokens: list[int] = []
    for i, r in enumerate(batch):
        t = r.chunk_times_s
        if not t:
            continue
        k = r.chunk_tokens
        if k is not None and len(k) != len(t):
            log.warning(
                "record row %d: %d chunk_tokens for %d chunks; no ITL", r.row, len(k), len(t)
            )
            k = None
            sizes[i] = -len(t)  # counted, no figures
        else:
            sizes[i] = len(t)
        times.extend(t)
        tokens.extend(k if k is not None else [1] * len(t))
    n_chunks = np.abs(sizes)
    if len(times) < 2:
        return figures, n_chunks
    t_all = np.asarray(times, dtype=np.float64)
    k_all = np.asarray(tokens, dtype=np.int64)
    owner = np.repeat(np.arange(n), n_chunks)  # record of each chunk
    starts = np.cumsum(n_chunks) - n_chunks
    later = np.ones(len(t_all), dtype=bool)  # chunks after their record's first
    later[starts[n_chunks > 0]] = False
    gap_owner = owner[later]
    values = np.diff(t_all)[later[1:]] / np.maximum(k_all[later], 1)
    weights = k_all[later]
    bad = np.zeros(n, dtype=bool)
    bad[sizes < 0] = True
    bad[gap_owner[values < 0]] = True
    bad[owner[k_all < 1]] = True
    keep = ~bad[gap_owner]
    values, weights, gap_owner = values[keep], weights[keep], gap_owner[keep]
    for i in np.flatnonzero(bad & (sizes > 0)):
        log.warning("record row %d: chunk times go backwards or a chunk has no tokens; no ITL",
                    batch[i].row)  # fmt: skip
    served = np.fromiter((r.outcome == OUTCOME_OK for r in batch), bool, n)
    pooled = served[gap_owner]
    add = itl.add  # one call per chunk: the sketch has no bulk add
    for v, w in zip(values[pooled].tolist(), weights[pooled].tolist(), strict=True):
        add(v, w)
    # One sample per token, sorted within each record: percentiles by index arithmetic.
    samples = np.repeat(values, weights)
    group = np.repeat(gap_owner, weights)
    order = np.lexsort((samples, group))
    samples = samples[order]
    m = np.bincount(group, minlength=n)
    has = m > 0
    offset = (np.cumsum(m) - m)[has]
    last = (m - 1)[has]
    for col, q in enumerate((0.50, 0.90, 0.99)):
        pos = q * last
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, last)
        a, b = samples[offset + lo], samples[offset + hi]
        figures[has, col] = a + (b - a) * (pos - lo)
    figures[has, 3] = samples[offset + last]
    return figures, n_chunks


def _columns(batch: list[RouterRecord], itl: LogHistogram) -> dict[str, np.ndarray]:
    """The batch as columns; ITL samples of served requests go into ``itl``."""
    n = len(batch)
    figures, n_chunks = _itl(batch, itl)
    hashes: list[Any] = []
    blocks = np.full(n, -1, dtype=np.int64)
    for i, r in enumerate(batch):
        if r.prefix_hashes is not None and r.block_tokens is None:
            log.warning("record row %d: prefix hashes without block_tokens; left out", r.row)
            hashes.append(None)
        else:
            hashes.append(
                None if r.prefix_hashes is None else np.asarray(r.prefix_hashes, np.int64)
            )
            blocks[i] = -1 if r.block_tokens is None else r.block_tokens
    cols: dict[str, np.ndarray] = {
        name: np.fromiter((_nan(getattr(r, name)) for r in batch), np.float64, n) for name in _FLOAT
    }
    for name in _INT:
        cols[name] = np.fromiter((getattr(r, name) for r in batch), np.int64, n)
    status = (-1 if r.http_status is None else r.http_status for r in batch)
    cols["http_status"] = np.fromiter(status, np.int64, n)
    cols["n_chunks"] = n_chunks
    cols["block_tokens"] = blocks
    for name in _OBJECT:
        column = np.empty(n, dtype=object)
        column[:] = hashes if name == "prefix_hashes" else [getattr(r, name) for r in batch]
        cols[name] = column
    cols["itl"] = figures
    return cols


class Recorder:
    """Writes a router run's folder (module docstring) from the records it is given.

    Args:
        folder: the folder; created (with its parents) when missing. It must
            not hold a recording already (``results.parquet`` or
            ``trace.parquet``): a new run never overwrites an old one.
        policy: the routing policy's name (the records' ``policy`` column and
            the report's label, unless ``options`` has a ``label``).
        instances: the backends, by index: ``InstanceRecord`` or its fields
            as a mapping (``id``, ``name``, ``url``, ``role`` ...).
        target_url: where the router served its clients.
        options: the router's settings, as ``run.json`` options and the
            summary's ``config`` (``policy`` is added).
        slo_ttft_s, slo_tpot_s: run-wide SLOs for the summary (a request's own win).
        flush_every_s: seconds between writes; 0 writes only on
            :meth:`flush` and :meth:`close`.

    Raises:
        ConfigError: the folder cannot be made or written (names the path and
            why), already holds a recording, or the metadata is invalid.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        policy: str,
        instances: Sequence[InstanceRecord | Mapping[str, Any]] = (),
        target_url: str | None = None,
        options: Mapping[str, Any] | None = None,
        slo_ttft_s: float | None = None,
        slo_tpot_s: float | None = None,
        flush_every_s: float = 5.0,
    ) -> None:
        if not flush_every_s >= 0:
            raise ConfigError(f"flush_every_s must be >= 0 seconds; got {flush_every_s}")
        self.folder = Path(folder)
        self.paths = {kind: self.folder / name for kind, name in FILES.items()}
        self.policy = policy
        self.options: dict[str, Any] = {"policy": policy, **(options or {})}
        self.label = str(self.options.get("label") or policy)
        self.slo_ttft_s = slo_ttft_s
        self.slo_tpot_s = slo_tpot_s
        self.flush_every_s = float(flush_every_s)
        self.metadata = self._metadata(target_url, instances)
        self._prepare_folder()
        # The writer's libraries load now, at start, not mid-run.
        import pandas  # noqa: F401
        import pyarrow  # noqa: F401

        # Monotonic to epoch seconds: the trace's origin_s (its first arrival, wall clock).
        self._epoch_offset_s = time.time() - time.monotonic()
        self._pending: deque[RouterRecord] = deque()
        self._rows: set[int] = set()
        self._cols: dict[str, np.ndarray] | None = None
        self._itl = LogHistogram()
        self._written = 0  # records in the files on disk
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._closed = False
        try:
            self._write_run()
        except OSError as exc:
            raise ConfigError(f"{self.paths['run']}: cannot write: {exc}") from None
        self._thread: threading.Thread | None = None
        if self.flush_every_s > 0:
            self._thread = threading.Thread(
                target=self._flush_loop, name=f"recorder {self.folder}", daemon=True
            )
            self._thread.start()

    # -- the router's calls --------------------------------------------------------------

    def add(self, record: RouterRecord) -> None:
        """Take one finished request (cheap: it is written by the next flush).

        Raises:
            ValueError: the recorder is closed, the record's ``row`` was
                recorded before, or its outcome is pending or unknown.
        """
        if self._closed:
            raise ValueError(f"{self.folder}: the recorder is closed")
        if not 0 < record.outcome < len(OUTCOME_NAMES):
            raise ValueError(f"record row {record.row}: outcome {record.outcome} is not final")
        if record.row in self._rows:
            raise ValueError(f"record row {record.row} was recorded before; rows must be unique")
        self._rows.add(record.row)
        self._pending.append(record)

    def __len__(self) -> int:
        """Records taken so far."""
        return len(self._rows)

    def flush(self) -> dict[str, Path]:
        """Write every record taken so far now; returns the paths written.

        Raises:
            OSError: a file could not be written (the records stay in memory
                and the next flush tries again).
        """
        with self._lock:
            return self._write()

    def close(self) -> dict[str, Path]:
        """Stop the flush thread and write everything; returns the paths written.

        Closing twice is harmless.

        Raises:
            OSError: as :meth:`flush`.
        """
        if not self._closed:
            self._closed = True
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
        with self._lock:
            paths = self._write()
            self._write_run()
            with contextlib.suppress(OSError):  # not empty: a leftover of a failed write
                (self.folder / _STAGING).rmdir()
        return {**paths, "run": self.paths["run"]}

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _metadata(
        self, target_url: str | None, instances: Sequence[InstanceRecord | Mapping[str, Any]]
    ) -> RunMetadata:
        where = "instances"
        try:
            checked = []
            for i, inst in enumerate(instances):
                where = f"instances[{i}]"
                checked.append(
                    inst
                    if isinstance(inst, InstanceRecord)
                    else InstanceRecord.model_validate(inst)
                )
            where = "run metadata"
            return RunMetadata(
                source="router",
                target_url=target_url,
                instances=checked,
                options=json_safe(self.options),
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            at = f"{where}.{field}" if field else where
            raise ConfigError(f"{self.folder}: {at}: {first['msg']}") from None

    # -- writing -------------------------------------------------------------------------

    def _prepare_folder(self) -> None:
        folder = self.folder
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"{folder}: not a folder (a file is there); --record needs a folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / _STAGING).mkdir(exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{folder}: cannot create the record folder: {exc}") from None
        for kind in ("results", "trace"):
            if self.paths[kind].exists():
                raise ConfigError(
                    f"{folder}: holds a recording already ({FILES[kind]}); record into a new folder"
                )
        if not os.access(folder, os.W_OK) or not os.access(folder / _STAGING, os.W_OK):
            raise ConfigError(f"{folder}: the record folder is not writable")

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.flush_every_s):
            try:
                with self._lock:
                    self._write()
            except Exception:  # keep recording; the records stay in memory
                log.exception("%s: writing the records failed; will retry", self.folder)

    def _take(self) -> None:
        """Move the pending records into the in-memory columns."""
        batch: list[RouterRecord] = []
        queue = self._pending
        for _ in range(len(queue)):
            batch.append(queue.popleft())
        if not batch:
            return
        new = _columns(batch, self._itl)
        if self._cols is None:
            self._cols = new
        else:
            self._cols = {k: np.concatenate((v, new[k])) for k, v in self._cols.items()}

    def _replace(self, kind: str, write: Any) -> Path:
        """Write one file in the staging folder, then move it over the old one."""
        final = self.paths[kind]
        staged = self.folder / _STAGING / final.name
        staged.parent.mkdir(exist_ok=True)
        write(staged)
        os.replace(staged, final)
        return final

    def _write_run(self) -> None:
        text = self.metadata.model_dump_json(indent=2) + "\n"
        self._replace("run", lambda p: p.write_text(text, encoding="utf-8"))

    def _write(self) -> dict[str, Path]:
        import json

        self._take()
        cols = self._cols
        if cols is None or len(cols["row"]) == self._written:
            return {k: p for k, p in self.paths.items() if k != "run" and p.is_file()}
        order = np.lexsort((cols["row"], cols["arrival_s"]))
        cols = {k: v[order] for k, v in cols.items()}
        origin = float(cols["arrival_s"][0])
        frame = _results_frame(cols, origin, self.label)
        trace = _trace(cols, origin, name=self.folder.name, epoch_s=origin + self._epoch_offset_s)
        summary = summarize(
            frame,
            self.slo_ttft_s,
            self.slo_tpot_s,
            policy=self.label,
            roles=self._roles(cols),
            itl=self._itl if self._itl.count else None,
        )
        summary["config"] = self.options
        text = json.dumps(json_safe(summary), indent=2, default=str) + "\n"

        from traces.loaders.canonical import save_parquet

        paths = {
            "trace": self._replace("trace", lambda p: save_parquet(trace, p)),
            "results": self._replace("results", lambda p: frame.to_parquet(p, index=False)),
            "summary": self._replace("summary", lambda p: p.write_text(text, encoding="utf-8")),
        }
        self._written = len(order)
        return paths

    def _roles(self, cols: dict[str, np.ndarray]) -> tuple[str, ...] | None:
        roles = self.metadata.roles
        used = max(int(cols["instance"].max()), int(cols["decode_instance"].max()))
        return roles if roles and used < len(roles) else None


def _results_frame(cols: dict[str, np.ndarray], origin: float, policy: str) -> pd.DataFrame:
    """The records as ``results.parquet`` rows: the shared schema, then ``x_request_id``."""
    import pandas as pd

    arrival = cols["arrival_s"] - origin
    frame = measured_frame(
        request_id=cols["row"],
        arrival_s=arrival,
        send_s=arrival,
        dispatch_s=cols["dispatch_s"] - origin,
        first_token_s=cols["first_token_s"] - origin,
        finish_s=cols["finish_s"] - origin,
        prompt_tokens=cols["prompt_tokens"],
        cached_tokens=np.maximum(cols["cached_tokens"], 0),
        output_tokens=cols["output_tokens"],
        max_tokens=cols["max_tokens"],
        session_id=cols["session_id"],
        instance=cols["instance"],
        decode_instance=cols["decode_instance"],
        policy=policy,
        outcome=cols["outcome"],
        http_status=cols["http_status"],
        error_message=cols["error_message"],
        slo_ttft_s=cols["slo_ttft_s"],
        slo_tpot_s=cols["slo_tpot_s"],
        itl=cols["itl"],
        n_chunks=cols["n_chunks"],
    )
    frame["x_request_id"] = pd.array(cols["request_id"], dtype="string")
    return frame


def _trace(cols: dict[str, np.ndarray], origin: float, *, name: str, epoch_s: float) -> Trace:
    """The recorded arrivals as a canonical trace (module docstring)."""
    import pandas as pd

    from traces.trace import Trace

    served = cols["outcome"] == OUTCOME_OK
    budget = cols["max_tokens"]
    output = np.where(served | (budget <= 0), cols["output_tokens"], budget)
    blocks = cols["block_tokens"]
    frame = pd.DataFrame(
        {
            "request_id": cols["row"],
            "arrival_s": cols["arrival_s"] - origin,
            "prompt_tokens": np.maximum(cols["prompt_tokens"], 1),
            "output_tokens": np.maximum(output, 0),
            "session_id": cols["session_id"],
            "prefix_hashes": cols["prefix_hashes"],
            "block_tokens": pd.arrays.IntegerArray(blocks, blocks < 1),
            "model": pd.Categorical(cols["model"]),
            "slo_ttft_s": cols["slo_ttft_s"],
            "slo_tpot_s": cols["slo_tpot_s"],
        }
    )
    return Trace(frame, name=name, origin_s=epoch_s)
