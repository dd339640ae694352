"""Result records: the per-request schema every driver writes, and the run's metadata.

A run's records are a folder: ``results.parquet`` (one row per request,
:data:`RESULT_SCHEMA`) and ``run.json`` (:class:`RunMetadata`: where the
records come from and which instance is which). The simulator, the
emulator, a live replay and the router all write this shape, and
:mod:`traces.metrics` defines the metrics over it once, so one report
compares any of them with any other.

Schema of ``results.parquet`` (column: pandas dtype), in order. Times are
seconds on the trace's clock (``arrival_s`` of the first request is about
0), NaN when the request never got there:

================  ==========  ===============================================
request_id        int64       the trace's request id
arrival_s         float64     scheduled arrival (the trace's)
send_s            float64     when the client actually sent it (a live
                              client may lag its schedule; the simulator
                              sends at arrival)
dispatch_s        float64     the router sent it to an instance
prefill_start_s   float64     its prefill began (simulated and emulated only)
first_token_s     float64     its first output token reached the client
finish_s          float64     its last token (or its error) reached the client
prompt_tokens     int64
cached_tokens     int64       prompt tokens served from the prefix cache
output_tokens     int64       tokens produced
max_tokens        int64       the requested output budget
session_id        string      conversation id, <NA> when none
instance          int32       instance that prefilled it (-1: none)
decode_instance   int32       PD: instance that decoded it (-1: none)
policy            category    the routing policy's name
outcome           category    :data:`OUTCOME_NAMES`
http_status       Int32       the backend's HTTP status, <NA> when none
error_message     string      why it did not finish, <NA> when it did
n_preemptions     int32       times the engine evicted it and recomputed
slo_ttft_s        float64     the request's own SLOs, NaN when it has none
slo_tpot_s        float64
ttft_s            float64     first_token_s - arrival_s
tpot_s            float64     (finish_s - first_token_s) / (output_tokens - 1)
e2e_s             float64     finish_s - arrival_s
router_queue_s    float64     PD parts of TTFT: dispatch_s - arrival_s,
prefill_queue_s   float64     prefill_start_s - dispatch_s,
prefill_s         float64     first_token_s - prefill_start_s;
kv_transfer_s     float64     the KV hand-off, and KV landed to the end of
first_decode_s    float64     the first decode step
itl_p50_s         float64     the request's own inter-token latencies
itl_p90_s         float64     (:func:`inter_token_figures`), NaN when not
itl_p99_s         float64     measured
itl_max_s         float64
n_chunks          int64       streamed chunks that carried tokens
================  ==========  ===============================================

Readers must accept older folders: only :data:`REQUIRED_COLUMNS` are
guaranteed, and a folder without ``run.json`` is one written before it
existed (:func:`read_run_metadata` returns ``None``).

Outcome codes are stable integers (:data:`OUTCOME_PENDING` ...): new
outcomes are appended, never renumbered, because in-memory record arrays
and old files hold the codes.

Importing this module loads numpy and pydantic, not pandas, so a server
that writes records starts light.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from traces.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "OUTCOME_CANCELLED",
    "OUTCOME_ERROR",
    "OUTCOME_FAILED",
    "OUTCOME_NAMES",
    "OUTCOME_OK",
    "OUTCOME_PENDING",
    "OUTCOME_REJECTED",
    "OUTCOME_TIMEOUT",
    "REQUIRED_COLUMNS",
    "RESULT_COLUMNS",
    "RESULT_SCHEMA",
    "RUN_FILE",
    "RUN_SOURCES",
    "InstanceRecord",
    "InterTokenFigures",
    "RunMetadata",
    "inter_token_figures",
    "inter_token_samples",
    "json_safe",
    "llmsched_version",
    "measured_frame",
    "outcome_codes",
    "read_run_metadata",
]

#: Outcome codes (the index into :data:`OUTCOME_NAMES`).
OUTCOME_PENDING = 0
#: Served to the end.
OUTCOME_OK = 1
#: Flagged failed by the trace: not served, counted.
OUTCOME_FAILED = 2
#: Can never fit the instance's KV cache.
OUTCOME_REJECTED = 3
#: The backend answered with an error (HTTP status and message say which).
OUTCOME_ERROR = 4
#: The client gave up waiting.
OUTCOME_TIMEOUT = 5
#: Cancelled before it finished (the client disconnected, the run stopped).
OUTCOME_CANCELLED = 6
OUTCOME_NAMES: tuple[str, ...] = (
    "pending",
    "ok",
    "failed",
    "rejected",
    "error",
    "timeout",
    "cancelled",
)

#: Column name -> pandas dtype of ``results.parquet``, in order (module docstring).
RESULT_SCHEMA: dict[str, str] = {
    "request_id": "int64",
    "arrival_s": "float64",
    "send_s": "float64",
    "dispatch_s": "float64",
    "prefill_start_s": "float64",
    "first_token_s": "float64",
    "finish_s": "float64",
    "prompt_tokens": "int64",
    "cached_tokens": "int64",
    "output_tokens": "int64",
    "max_tokens": "int64",
    "session_id": "string",
    "instance": "int32",
    "decode_instance": "int32",
    "policy": "category",
    "outcome": "category",
    "http_status": "Int32",
    "error_message": "string",
    "n_preemptions": "int32",
    "slo_ttft_s": "float64",
    "slo_tpot_s": "float64",
    "ttft_s": "float64",
    "tpot_s": "float64",
    "e2e_s": "float64",
    "router_queue_s": "float64",
    "prefill_queue_s": "float64",
    "prefill_s": "float64",
    "kv_transfer_s": "float64",
    "first_decode_s": "float64",
    "itl_p50_s": "float64",
    "itl_p90_s": "float64",
    "itl_p99_s": "float64",
    "itl_max_s": "float64",
    "n_chunks": "int64",
}

#: Columns of ``results.parquet``, in order.
RESULT_COLUMNS: tuple[str, ...] = tuple(RESULT_SCHEMA)

#: Columns every ``results.parquet`` has, whoever wrote it and when.
REQUIRED_COLUMNS: tuple[str, ...] = (
    "arrival_s",
    "first_token_s",
    "finish_s",
    "prompt_tokens",
    "output_tokens",
)


def outcome_codes(outcomes: Sequence[Any] | pd.Series | None, finish_s: np.ndarray) -> np.ndarray:
    """Outcome codes (int8) of an ``outcome`` column of names.

    Without the column (records from a writer that had none), a request
    with a finish time counts as ok and the rest as failed; a name outside
    :data:`OUTCOME_NAMES` counts as failed.
    """
    if outcomes is None:
        return np.where(np.isnan(finish_s), OUTCOME_FAILED, OUTCOME_OK).astype(np.int8)
    codes = {name: i for i, name in enumerate(OUTCOME_NAMES)}
    return np.array([codes.get(str(o), OUTCOME_FAILED) for o in outcomes], dtype=np.int8)


# -- per-request inter-token figures --------------------------------------------------


class InterTokenFigures(BaseModel):
    """One request's inter-token latencies: the ``itl_*`` and ``n_chunks`` columns.

    Seconds; NaN when the request streamed no token after its first chunk.
    """

    model_config = ConfigDict(frozen=True)

    itl_p50_s: float
    itl_p90_s: float
    itl_p99_s: float
    itl_max_s: float
    n_chunks: int


def inter_token_samples(
    chunk_times_s: Sequence[float], chunk_tokens: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One request's inter-token latencies as ``(values_s, weights)``, one pair per later chunk.

    Args:
        chunk_times_s: arrival time of each chunk that carried tokens, in
            order (any clock; only differences matter).
        chunk_tokens: tokens each chunk carried (default: one each). Servers
            may pack several tokens into one SSE chunk.

    The first chunk's tokens belong to the TTFT. A later chunk of ``k``
    tokens arriving ``g`` seconds after the previous one stands for ``k``
    samples of ``g / k`` (the gap spread evenly over its tokens): value
    ``g / k``, weight ``k``. So there is one sample per token after the
    first chunk, as in the simulator's ITL histogram, and a live writer pools
    a run's ITLs with ``LogHistogram.add(value, weight)``.

    Raises:
        ValueError: the lists differ in length, times go backwards, or a
            chunk carries fewer than one token.
    """
    times = np.asarray(chunk_times_s, dtype=np.float64)
    if chunk_tokens is None:
        tokens = np.ones(len(times), dtype=np.int64)
    else:
        tokens = np.asarray(chunk_tokens, dtype=np.int64)
        if len(tokens) != len(times):
            raise ValueError(f"chunk_tokens has {len(tokens)} entries for {len(times)} chunk times")
        if len(tokens) and tokens.min() < 1:
            raise ValueError("every chunk counted must carry at least one token")
    gaps = np.diff(times)
    if len(gaps) and gaps.min() < 0:
        raise ValueError("chunk times must not go backwards")
    later = tokens[1:]
    return gaps / later, later


def inter_token_figures(
    chunk_times_s: Sequence[float], chunk_tokens: Sequence[int] | None = None
) -> InterTokenFigures:
    """Per-request ITL figures (the ``itl_*`` and ``n_chunks`` columns) from chunk times.

    Samples as :func:`inter_token_samples` defines them; percentiles
    interpolate linearly, as the summary's do.

    Raises:
        ValueError: as :func:`inter_token_samples`.
    """
    values, weights = inter_token_samples(chunk_times_s, chunk_tokens)
    n_chunks = len(chunk_times_s)
    if not len(values):
        nan = math.nan
        return InterTokenFigures(
            itl_p50_s=nan, itl_p90_s=nan, itl_p99_s=nan, itl_max_s=nan, n_chunks=n_chunks
        )
    samples = np.repeat(values, weights)
    p50, p90, p99 = np.quantile(samples, (0.50, 0.90, 0.99))
    return InterTokenFigures(
        itl_p50_s=float(p50),
        itl_p90_s=float(p90),
        itl_p99_s=float(p99),
        itl_max_s=float(samples.max()),
        n_chunks=n_chunks,
    )


# -- run metadata ---------------------------------------------------------------------

#: The run-metadata file written beside ``results.parquet``.
RUN_FILE = "run.json"

#: Who wrote the records.
RUN_SOURCES: tuple[str, ...] = ("simulator", "emulator", "replay", "router")

Source = Literal["simulator", "emulator", "replay", "router"]
Role = Literal["mixed", "prefill", "decode"]


def measured_frame(
    *,
    request_id: np.ndarray,
    arrival_s: np.ndarray,
    send_s: np.ndarray,
    dispatch_s: np.ndarray | None,
    first_token_s: np.ndarray,
    finish_s: np.ndarray,
    prompt_tokens: np.ndarray,
    cached_tokens: np.ndarray,
    output_tokens: np.ndarray,
    max_tokens: np.ndarray,
    session_id: Sequence[str | None],
    instance: np.ndarray | None,
    decode_instance: np.ndarray | None,
    policy: str,
    outcome: np.ndarray,
    http_status: np.ndarray,
    error_message: Sequence[str | None],
    slo_ttft_s: np.ndarray,
    slo_tpot_s: np.ndarray,
    itl: np.ndarray,
    n_chunks: np.ndarray,
) -> pd.DataFrame:
    """Records measured from the outside (a replay client, the router) as the shared schema.

    Times are seconds on the run's clock; ``outcome`` codes, ``http_status``
    -1 for none, ``itl`` an ``(n, 4)`` array of the per-request ITL p50,
    p90, p99 and max. What such a driver cannot see (prefill start, the PD
    parts of TTFT, preemptions) is NaN or 0; ``dispatch_s`` None: not seen
    either (``router_queue_s`` NaN); ``instance`` None: all 0.
    """
    import pandas as pd

    n = len(request_id)
    nan = np.full(n, np.nan)
    out = output_tokens
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(out > 1, (finish_s - first_token_s) / np.maximum(out - 1, 1), np.nan)
    dispatch = nan if dispatch_s is None else dispatch_s
    columns: dict[str, Any] = {
        "request_id": request_id,
        "arrival_s": arrival_s,
        "send_s": send_s,
        "dispatch_s": dispatch,
        "prefill_start_s": nan,
        "first_token_s": first_token_s,
        "finish_s": finish_s,
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached_tokens,
        "output_tokens": out,
        "max_tokens": max_tokens,
        "session_id": pd.array(list(session_id), dtype="string"),
        "instance": np.zeros(n, dtype=np.int32) if instance is None else instance.astype(np.int32),
        "decode_instance": (
            np.full(n, -1, dtype=np.int32)
            if decode_instance is None
            else decode_instance.astype(np.int32)
        ),
        "policy": pd.Categorical([policy] * n),
        "outcome": pd.Categorical.from_codes(
            np.asarray(outcome).astype(np.int8), categories=list(OUTCOME_NAMES)
        ),
        "http_status": pd.array([None if s < 0 else int(s) for s in http_status], dtype="Int32"),
        "error_message": pd.array(list(error_message), dtype="string"),
        "n_preemptions": np.zeros(n, dtype=np.int32),
        "slo_ttft_s": slo_ttft_s,
        "slo_tpot_s": slo_tpot_s,
        "ttft_s": first_token_s - arrival_s,
        "tpot_s": tpot,
        "e2e_s": finish_s - arrival_s,
        "router_queue_s": dispatch - arrival_s,
        "prefill_queue_s": nan,
        "prefill_s": nan,
        "kv_transfer_s": nan,
        "first_decode_s": nan,
        "itl_p50_s": itl[:, 0],
        "itl_p90_s": itl[:, 1],
        "itl_p99_s": itl[:, 2],
        "itl_max_s": itl[:, 3],
        "n_chunks": n_chunks,
    }
    frame = pd.DataFrame(columns)
    return frame.astype({k: v for k, v in RESULT_SCHEMA.items() if k != "outcome"})


def llmsched_version() -> str:
    """The installed llmsched version ("unknown" when run from a bare checkout)."""
    try:
        return metadata.version("llmsched")
    except metadata.PackageNotFoundError:
        return "unknown"


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (in lists, tuples and dicts too) as ``None``.

    JSON has no NaN; writers pass summaries and options through this first.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return value


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class InstanceRecord(BaseModel):
    """One serving instance: the ``instance`` column's id, and what it is.

    Attributes:
        id: the value of the records' ``instance`` / ``decode_instance`` columns.
        name: a label for reports (the simulator: ``instance-0`` ...).
        url: where it serves (live runs); ``None`` for simulated instances.
        role: ``mixed``, or ``prefill`` / ``decode`` under PD disaggregation.
        pools: the deployment's named pools it belongs to (``short``, ``long``),
            beyond the built-in ``entry``, ``all`` and per-role pools.
    """

    model_config = ConfigDict(extra="ignore")

    id: int
    name: str
    url: str | None = None
    role: Role = "mixed"
    pools: list[str] = Field(default_factory=list)


class RunMetadata(BaseModel):
    """``run.json``: where a folder's records come from and which instance is which.

    Attributes:
        source: who wrote the records (:data:`RUN_SOURCES`).
        target_url: the server a replay or router run talked to; ``None`` otherwise.
        created: when the records were written (ISO 8601, UTC).
        llmsched_version: the writer's llmsched version.
        instances: one entry per instance, ids unique, listed by id.
        options: how the policy was fed and driven (prefix knowledge estimated
            or exact, poll interval, batch-hint mode ...), as the writer
            names them; reports show them beside the run.

    Keys a later version adds are ignored on reading.
    """

    model_config = ConfigDict(extra="ignore")

    source: Source
    target_url: str | None = None
    created: str = Field(default_factory=_now_iso)
    llmsched_version: str = Field(default_factory=llmsched_version)
    instances: list[InstanceRecord] = Field(default_factory=list)
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _ids_unique(self) -> RunMetadata:
        ids = [i.id for i in self.instances]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"instances: id {dup} appears more than once")
        self.instances = sorted(self.instances, key=lambda i: i.id)
        return self

    @property
    def roles(self) -> tuple[str, ...]:
        """Instance roles in id order."""
        return tuple(i.role for i in self.instances)

    def write(self, folder: str | Path) -> Path:
        """Write ``run.json`` into ``folder``; returns its path."""
        path = Path(folder) / RUN_FILE
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        return path


def read_run_metadata(folder: str | Path) -> RunMetadata | None:
    """The ``run.json`` in ``folder``; ``None`` when the folder has none (older writers).

    Raises:
        ConfigError: the file is not valid run metadata (names the file and the field).
    """
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return RunMetadata.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(file)"
        raise ConfigError(f"{path}: {where}: {first['msg']}") from None
