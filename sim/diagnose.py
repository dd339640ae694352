"""What a finished run's records say about the run itself: overload and rejections.

A simulation always produces figures, and some of them describe the run
rather than the policy: past capacity the waiting queue grows for as long as
requests keep arriving, so latencies measure the trace's length; a request
whose prompt plus output exceeds an instance's KV cache is rejected and
counts in no latency. :func:`diagnose` reads both from the result records
(``traces.records`` schema) and the run's config (``summary.json``'s
``config``), so ``llmsched simulate`` and ``llmsched compare`` can say so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from traces.records import OUTCOME_OK, OUTCOME_REJECTED, outcome_codes

__all__ = ["Diagnosis", "Overload", "Rejections", "diagnose", "diagnose_folder"]

#: The queue must absorb at least this share of the arrivals of the second half of the
#: trace (served rate under 95% of offered) to count as growing without bound.
OVERLOAD_SHARE = 0.05
#: ... and hold at least this many waiting requests at the last arrival.
OVERLOAD_MIN_WAITING = 20


@dataclass(frozen=True)
class Overload:
    """The waiting queue grew through the second half of the arrivals."""

    #: How fast the queue grew over the second half of the arrivals, requests/s.
    growth_rps: float
    #: Its offered rate over that half, requests/s.
    offered_rps: float
    #: Requests waiting for their prefill at the last arrival.
    waiting_at_end: int
    #: Mean wait before the prefill of the first and of the last tenth of arrivals, s.
    wait_first_s: float
    wait_last_s: float

    def describe(self) -> str:
        """One sentence: how much the offered load exceeds capacity."""
        return (
            f"offered load exceeds capacity: the waiting queue grew by {self.growth_rps:.2f} "
            f"req/s ({self.growth_rps / self.offered_rps:.0%} of arrivals) over the second half "
            f"of the trace, to {self.waiting_at_end:,} waiting at the last arrival; the last "
            f"tenth of requests waited {self.wait_last_s:,.1f} s before their prefill "
            f"(the first tenth {self.wait_first_s:,.2f} s), so latencies grow with the "
            "trace's length"
        )


@dataclass(frozen=True)
class Rejections:
    """Requests the engines refused because they cannot fit an instance's KV cache."""

    n_rejected: int
    n_requests: int
    #: An instance's KV cache, tokens (``max_total_tokens``), when the config says.
    kv_tokens: int | None
    #: The shortest and the longest prompt plus output among the rejected requests, tokens.
    shortest_tokens: int
    longest_tokens: int
    #: The flag that sizes the KV cache, for the engine the run modelled.
    flag: str | None = "--max-total-tokens"

    def describe(self) -> str:
        """One sentence: how many were rejected and why."""
        share = (
            "every request was rejected"
            if self.n_rejected == self.n_requests
            else f"{self.n_rejected:,} of {self.n_requests:,} requests "
            f"({self.n_rejected / self.n_requests:.1%}) were rejected"
        )
        need = (
            f"{self.shortest_tokens:,} tokens"
            if self.shortest_tokens == self.longest_tokens
            else f"{self.shortest_tokens:,} to {self.longest_tokens:,} tokens"
        )
        cache = f"the {self.kv_tokens:,} tokens" if self.kv_tokens else "what"
        fix = f"{self.flag}, " if self.flag else ""
        return (
            f"{share}: their prompt plus output ({need}) is longer than {cache} an instance's "
            f"KV cache holds ({fix}a larger GPU or --tp make room); they count in no latency"
        )


@dataclass(frozen=True)
class Diagnosis:
    """What is wrong with a run as a measurement; both None when nothing is."""

    overload: Overload | None
    rejections: Rejections | None

    def messages(self) -> list[str]:
        """One sentence per finding."""
        return [f.describe() for f in (self.rejections, self.overload) if f is not None]


def diagnose(records: pd.DataFrame, config: dict[str, Any] | None = None) -> Diagnosis:
    """Overload and rejections in one run's result records.

    Overload: among requests served, the number arrived but not yet in a
    prefill grew between the middle of the arrivals and the last arrival by
    at least :data:`OVERLOAD_SHARE` of the requests that arrived meanwhile,
    to at least :data:`OVERLOAD_MIN_WAITING`.
    """
    codes = outcome_codes(records["outcome"], records["finish_s"].to_numpy(dtype=float))
    return Diagnosis(
        _overload(records[codes == OUTCOME_OK]),
        _rejections(records[codes == OUTCOME_REJECTED], len(records), config or {}),
    )


def _overload(served: pd.DataFrame) -> Overload | None:
    ok = served.sort_values("arrival_s")
    if len(ok) < 2 * OVERLOAD_MIN_WAITING:
        return None
    arrivals = ok["arrival_s"].to_numpy(dtype=float)
    starts = np.sort(ok["prefill_start_s"].to_numpy(dtype=float))
    first, last = arrivals[0], arrivals[-1]
    middle = (first + last) / 2
    if last <= middle:
        return None

    def waiting(t: float) -> int:
        return int(np.searchsorted(arrivals, t, "right") - np.searchsorted(starts, t, "right"))

    at_end, at_middle = waiting(last), waiting(middle)
    arrived = int(np.searchsorted(arrivals, last, "right") - np.searchsorted(arrivals, middle))
    growth = at_end - at_middle
    if at_end < OVERLOAD_MIN_WAITING or growth < OVERLOAD_SHARE * arrived:
        return None
    wait = (ok["prefill_start_s"] - ok["arrival_s"]).to_numpy(dtype=float)
    tenth = max(1, len(ok) // 10)
    return Overload(
        growth_rps=growth / (last - middle),
        offered_rps=arrived / (last - middle),
        waiting_at_end=at_end,
        wait_first_s=float(np.nanmean(wait[:tenth])),
        wait_last_s=float(np.nanmean(wait[-tenth:])),
    )


def _rejections(
    rejected: pd.DataFrame, n_requests: int, config: dict[str, Any]
) -> Rejections | None:
    if rejected.empty:
        return None
    need = rejected["prompt_tokens"] + rejected["output_tokens"].clip(lower=1)
    limits = config.get("limits") or {}
    kv = limits.get("max_total_tokens")
    return Rejections(
        n_rejected=len(rejected),
        n_requests=n_requests,
        kv_tokens=int(kv) if kv else None,
        shortest_tokens=int(need.min()),
        longest_tokens=int(need.max()),
        flag="--max-total-tokens" if limits.get("engine", "sglang") == "sglang" else None,
    )


#: The record columns :func:`diagnose` reads.
COLUMNS = ("outcome", "arrival_s", "prefill_start_s", "finish_s", "prompt_tokens", "output_tokens")


def diagnose_folder(folder: str | Path) -> Diagnosis:
    """:func:`diagnose` of a run folder (``results.parquet``, ``summary.json``'s config)."""
    folder = Path(folder)
    records = pd.read_parquet(folder / "results.parquet", columns=list(COLUMNS))
    summary = folder / "summary.json"
    config = json.loads(summary.read_text()).get("config") if summary.is_file() else None
    return diagnose(records, config)
