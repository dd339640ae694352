"""Streaming record containers the simulator writes into while it runs.

* :class:`ResultColumns`: one preallocated numpy array per result field,
  indexed by the request's row in the trace; no object per request or
  event survives the request.
* :class:`LogHistogram`: the inter-token-latency distribution, as counts in
  log-spaced bins (defined with the metrics, :class:`traces.metrics.LogHistogram`,
  so live writers pool ITLs the same way).
* :class:`Timeline`: queue-length samples at state changes, as typed arrays.

The outcome codes (``OUTCOME_*``) are the shared record schema's
(:mod:`traces.records`) and the histogram is the metrics' own, both
re-exported here for the engine's imports.
"""

from __future__ import annotations

from array import array

import numpy as np

from traces.histogram import LogHistogram
from traces.records import (
    OUTCOME_CANCELLED,
    OUTCOME_ERROR,
    OUTCOME_FAILED,
    OUTCOME_NAMES,
    OUTCOME_OK,
    OUTCOME_PENDING,
    OUTCOME_REJECTED,
    OUTCOME_TIMEOUT,
)

__all__ = [
    "OUTCOME_CANCELLED",
    "OUTCOME_ERROR",
    "OUTCOME_FAILED",
    "OUTCOME_NAMES",
    "OUTCOME_OK",
    "OUTCOME_PENDING",
    "OUTCOME_REJECTED",
    "OUTCOME_TIMEOUT",
    "LogHistogram",
    "ResultColumns",
    "Timeline",
]


class ResultColumns:
    """Per-request results, one array per field, indexed by trace row.

    Times are seconds on the trace's clock (NaN until set); ``instance`` is
    the instance that prefilled the request and ``decode_instance`` the one
    that decoded it under PD disaggregation (-1 when none).
    """

    __slots__ = (
        "cached_tokens",
        "decode_instance",
        "dispatch_s",
        "finish_s",
        "first_decode_s",
        "first_token_s",
        "instance",
        "kv_transfer_s",
        "n_preemptions",
        "outcome",
        "prefill_start_s",
    )

    def __init__(self, n: int) -> None:
        nan = np.full(n, np.nan)
        self.dispatch_s = nan.copy()
        self.prefill_start_s = nan.copy()
        self.first_token_s = nan.copy()
        self.finish_s = nan.copy()
        #: PD: KV transfer time, and the time from the KV's arrival at the
        #: decode instance to the end of its first decode step.
        self.kv_transfer_s = nan.copy()
        self.first_decode_s = nan
        self.cached_tokens = np.zeros(n, dtype=np.int64)
        self.instance = np.full(n, -1, dtype=np.int32)
        self.decode_instance = np.full(n, -1, dtype=np.int32)
        self.n_preemptions = np.zeros(n, dtype=np.int32)
        self.outcome = np.zeros(n, dtype=np.int8)


class Timeline:
    """Queue samples ``(time_s, instance, waiting, running, kv_used_tokens)`` as typed arrays."""

    __slots__ = ("instance", "kv_used_tokens", "running", "time_s", "waiting")

    def __init__(self) -> None:
        self.time_s = array("d")
        self.instance = array("i")
        self.waiting = array("i")
        self.running = array("i")
        self.kv_used_tokens = array("q")

    def __len__(self) -> int:
        return len(self.time_s)

    def record(self, time_s: float, instance: int, waiting: int, running: int, kv: int) -> None:
        """Append one sample."""
        self.time_s.append(time_s)
        self.instance.append(instance)
        self.waiting.append(waiting)
        self.running.append(running)
        self.kv_used_tokens.append(kv)

    def columns(self) -> dict[str, np.ndarray]:
        """The samples as numpy arrays (copies), keyed by column name."""
        return {
            "time_s": np.array(self.time_s, dtype=np.float64),
            "instance": np.array(self.instance, dtype=np.int32),
            "waiting": np.array(self.waiting, dtype=np.int32),
            "running": np.array(self.running, dtype=np.int32),
            "kv_used_tokens": np.array(self.kv_used_tokens, dtype=np.int64),
        }
