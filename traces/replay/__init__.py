"""Live replay: a trace played open-loop against an OpenAI-compatible or SGLang server.

Example::

    from traces.loaders import load
    from traces.replay import Replay, ReplayConfig, run_replay, write_run

    trace = load("chat.parquet")
    replay = Replay(trace, ReplayConfig("http://127.0.0.1:30000", protocol="sglang"))
    run_replay(replay)
    write_run(replay, "runs/live")   # llmsched report runs/live runs/simulated

Each request leaves at its trace time whether or not earlier ones finished
(:mod:`traces.replay.client`), with a prompt of the trace's length that
shares what the trace shares (:mod:`traces.replay.prompts`), over the
endpoint's own wire format (:mod:`traces.replay.protocol`), and the run is
written as the shared result records (:mod:`traces.replay.results`). The
package needs only workloads, HTTP and the record schema: it imports
nothing from the simulator or the policy core.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "LATE_S",
    "Progress",
    "Replay",
    "ReplayConfig",
    "lag_report",
    "lag_warning",
    "records_frame",
    "run_replay",
    "write_run",
]

# Loaded on first use, so the router can take the HTTP client (traces.replay.http)
# without the replay's pandas.
_WHERE = {
    "LATE_S": "client",
    "Progress": "client",
    "Replay": "client",
    "ReplayConfig": "client",
    "run_replay": "client",
    "lag_report": "results",
    "lag_warning": "results",
    "records_frame": "results",
    "write_run": "results",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'traces.replay' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"traces.replay.{module}"), name)
    globals()[name] = value
    return value
