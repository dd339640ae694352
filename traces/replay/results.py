"""A replay's records: ``results.parquet``, ``summary.json`` and ``run.json``.

The records are the shared schema (:data:`traces.records.RESULT_SCHEMA`), on
the trace's clock (wall seconds times the time scale, from the instant the
first request was due). What a client cannot see is unknown: dispatch and
prefill start are NaN, the PD parts of TTFT NaN, preemptions 0. The target
is instance 0 (``run.json`` names its URL). ``prompt_tokens`` is what the
server reported (usage, ``meta_info``), else the trace's length;
``max_tokens`` the budget asked for. The summary is
:func:`traces.metrics.summarize` with the run's pooled ITL histogram, and
its ``config`` holds the replay's settings, so the report labels and
describes the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from traces.metrics import summarize
from traces.records import (
    InstanceRecord,
    RunMetadata,
    json_safe,
    measured_frame,
)

if TYPE_CHECKING:
    import pandas as pd

    from traces.replay.client import Replay

__all__ = ["lag_report", "lag_warning", "records_frame", "replay_options", "write_run"]


def records_frame(replay: Replay) -> pd.DataFrame:
    """One row per replayed request (sent, or failed by the trace), in the schema's order."""
    plan, m, scale = replay.plan, replay.m, replay.config.time_scale
    keep = m.outcome != 0  # pending: never sent (the run stopped first)
    reported = m.prompt_tokens[keep]
    return measured_frame(
        request_id=plan.request_id[keep],
        arrival_s=plan.arrival_s[keep],
        send_s=m.send[keep] * scale,
        dispatch_s=None,
        first_token_s=m.first[keep] * scale,
        finish_s=m.finish[keep] * scale,
        prompt_tokens=np.where(reported >= 0, reported, plan.prompt_tokens[keep]),
        cached_tokens=m.cached_tokens[keep],
        output_tokens=m.output_tokens[keep],
        max_tokens=np.maximum(plan.output_tokens[keep], 1),
        session_id=[s for s, k in zip(plan.session_id, keep, strict=True) if k],
        instance=None,
        decode_instance=None,
        policy=replay.config.label,
        outcome=m.outcome[keep],
        http_status=m.http_status[keep],
        error_message=[e for e, k in zip(m.error_message, keep, strict=True) if k],
        slo_ttft_s=plan.slo_ttft_s[keep],
        slo_tpot_s=plan.slo_tpot_s[keep],
        itl=m.itl[keep],
        n_chunks=m.n_chunks[keep],
    )


def lag_report(replay: Replay) -> dict[str, Any]:
    """How late requests left, wall seconds: count late (over ``LATE_S``), p50, p99, max."""
    from traces.replay.client import LATE_S

    sent = ~np.isnan(replay.m.send)
    lag = replay.m.send[sent] - replay.plan.arrival_s[sent] / replay.config.time_scale
    if not len(lag):
        return {"n_sent": 0, "n_late": 0, "late_s": LATE_S}
    return {
        "n_sent": len(lag),
        "n_late": int((lag > LATE_S).sum()),
        "late_s": LATE_S,
        "lag_p50_s": float(np.quantile(lag, 0.5)),
        "lag_p99_s": float(np.quantile(lag, 0.99)),
        "lag_max_s": float(lag.max()),
    }


def lag_warning(lag: dict[str, Any]) -> str | None:
    """What a user must be told of a :func:`lag_report`: None when no request left late."""
    if not lag.get("n_late"):
        return None
    return (
        f"the client fell behind its schedule: {lag['n_late']:,} of {lag['n_sent']:,} "
        f"requests left more than {lag['late_s'] * 1000:g} ms late (p99 "
        f"{lag['lag_p99_s'] * 1000:,.1f} ms, max {lag['lag_max_s'] * 1000:,.1f} ms); "
        "TTFT counts from the scheduled time, so it includes that lag"
    )


def replay_options(replay: Replay) -> dict[str, Any]:
    """The replay's settings and what it met, as ``run.json`` options and the summary's config."""
    c = replay.config
    return {
        "label": c.label,
        "protocol": c.protocol,
        "endpoint": c.endpoint,
        "prompt_format": "ids" if c.sends_ids else "text",
        "tokenizer": replay.tokenizer.name,
        "load": c.load,
        "time_scale": c.time_scale,
        "seed": c.seed,
        "timeout_s": c.timeout_s,
        "model": c.model,
        "send_lag": lag_report(replay),
        "errors": dict(replay.errors),
        "early_session_turns": replay.prompts.early_turns,
        "stopped": replay.stopped_reason,
    }


def write_run(replay: Replay, out_dir: str | Path) -> dict[str, Path]:
    """Write the folder ``llmsched report`` reads; returns the paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame = records_frame(replay)
    paths = {
        "results": out / "results.parquet",
        "summary": out / "summary.json",
    }
    frame.to_parquet(paths["results"], index=False)
    c = replay.config
    options = json_safe(replay_options(replay))
    summary = summarize(
        frame,
        c.slo_ttft_s,
        c.slo_tpot_s,
        policy=c.label,
        roles=("mixed",),
        itl=replay.itl if replay.itl.count else None,
    )
    summary["config"] = options
    paths["summary"].write_text(json.dumps(json_safe(summary), indent=2) + "\n")
    meta = RunMetadata(
        source="replay",
        target_url=c.target_url,
        instances=[InstanceRecord(id=0, name="target", url=c.target_url)],
        options=options,
    )
    paths["run"] = meta.write(out)
    return paths
