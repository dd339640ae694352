"""Mooncake FAST'25 trace loader (kvcache-ai/Mooncake, ``FAST25-release/traces``).

One JSON object per line, fields read by name::

    {"timestamp": 0, "input_length": 6758, "output_length": 500, "hash_ids": [0, 1, 2]}

``timestamp`` is milliseconds from the trace start; ``hash_ids`` are the
prompt's block hashes with 512 tokens per block (the trace README), stored as
``prefix_hashes`` with ``block_tokens=512``. Every prompt has one hash per
block it fills, the last one partial (``ceil(input_length / 512)``, true of
every row of the released files), so a row with more or fewer is an error.

The released ``conversation_trace.jsonl`` quantizes timestamps to 3 s buckets
(90% of consecutive requests share one), so sub-3 s arrival patterns in it are
artefacts. ``jitter=True`` spreads each bucket's requests uniformly over
``[t, t + bucket_s)``: n uniforms are drawn, sorted, and handed out in file
order, so the order within a bucket is kept and one seed always gives the same
arrivals. The jittered trace is shifted so its first arrival is 0; ``origin_s``
absorbs the shift, so ``origin_s + arrival_s`` lies in ``[t, t + bucket_s)``
on the file's clock.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from traces.errors import ConfigError, TraceError, TraceFormatError
from traces.loaders._common import (
    finish,
    get_int,
    get_int_list,
    get_number,
    iter_json_objects,
    object_column,
)
from traces.trace import Trace

__all__ = ["BLOCK_TOKENS", "jitter_buckets", "load_mooncake"]

#: Tokens per ``hash_ids`` block in the Mooncake traces.
BLOCK_TOKENS = 512


def jitter_buckets(bucket_start_s: np.ndarray, bucket_s: float, seed: int) -> np.ndarray:
    """Spread requests sharing a bucket start uniformly over ``[t, t + bucket_s)``.

    Within a bucket the offsets are sorted and assigned in input order, so
    requests keep their relative order; the result depends only on the seed.
    """
    t = np.asarray(bucket_start_s, dtype=np.float64)
    offsets = np.random.default_rng(seed).uniform(0.0, bucket_s, size=len(t))
    # Rows grouped by bucket, input order inside each group ...
    rows = np.argsort(t, kind="stable")
    # ... and the offsets sorted inside the same groups, in the same group order.
    sorted_offsets = offsets[np.lexsort((offsets, t))]
    out = t.copy()
    out[rows] += sorted_offsets
    return out


def load_mooncake(
    path: str | Path, *, jitter: bool = False, bucket_s: float = 3.0, seed: int = 0
) -> Trace:
    """Load a Mooncake JSONL trace as a Trace named after the file.

    Args:
        path: the ``.jsonl`` (or ``.jsonl.gz``) file.
        jitter: spread each timestamp bucket's requests over ``bucket_s``.
        bucket_s: the timestamp quantum of the file (3 s in the FAST'25 release).
        seed: random seed of the jitter.

    Raises:
        TraceFormatError: invalid JSON, a missing field, a wrong type, a
            negative or non-integral length, ``input_length`` below 1,
            ``hash_ids`` not one per 512 tokens of ``input_length``, arrivals
            spanning more than :data:`~traces.trace.MAX_SPAN_S`.
        TraceError: the file has no requests.
        ConfigError: ``bucket_s`` is not positive or ``seed`` not an integer.
    """
    path = Path(path)
    if isinstance(bucket_s, bool) or not isinstance(bucket_s, int | float) or not bucket_s > 0:
        raise ConfigError(f"mooncake option bucket_s: expected seconds > 0, got {bucket_s!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"mooncake option seed: expected an integer, got {seed!r}")
    ts_ms: list[float] = []
    prompt: list[int] = []
    output: list[int] = []
    hashes: list[np.ndarray] = []
    lines: list[int] = []
    for line, obj in iter_json_objects(path):
        lines.append(line)
        ts_ms.append(get_number(obj, "timestamp", path, line, expected="a number (milliseconds)"))
        input_length = get_int(obj, "input_length", path, line, minimum=1)
        prompt.append(input_length)
        output.append(get_int(obj, "output_length", path, line, minimum=0))
        ids = get_int_list(obj, "hash_ids", path, line)
        blocks = -(-input_length // BLOCK_TOKENS)
        if len(ids) != blocks:
            raise TraceFormatError(
                path,
                field="hash_ids",
                expected=(
                    f"{blocks} block hash(es) for input_length {input_length} "
                    f"(one per {BLOCK_TOKENS} tokens, the last block partial)"
                ),
                line=line,
                got=f"{len(ids)} hash(es)",
            )
        hashes.append(np.asarray(ids, dtype=np.int64))
    if not ts_ms:
        raise TraceError(f"{path}: no requests (the file is empty)")

    t_s = np.asarray(ts_ms, dtype=np.float64) / 1000.0
    if jitter:
        t_s = jitter_buckets(t_s, float(bucket_s), seed)
    origin_s = float(t_s.min())
    frame = pd.DataFrame(
        {
            "arrival_s": t_s - origin_s,
            "prompt_tokens": np.asarray(prompt, dtype=np.int64),
            "output_tokens": np.asarray(output, dtype=np.int64),
            "prefix_hashes": object_column(hashes),
            "block_tokens": pd.array([BLOCK_TOKENS] * len(t_s), dtype="Int64"),
        }
    )
    return finish(frame, path, origin_s=origin_s, time_field="timestamp", lines=np.asarray(lines))
