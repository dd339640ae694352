"""Trace transforms: plain functions ``Trace -> Trace`` and the options model that chains them.

Every function returns a new trace (name and origin kept through
:meth:`Trace.replace`) and leaves its input untouched; each accepts an empty
trace. Rows keep their ``request_id`` so a transformed row can be traced back
to its source. Bad arguments raise :class:`~traces.errors.ConfigError`
naming the argument; a filter or window that would leave none of a
non-empty trace raises :class:`~traces.errors.TraceError` saying what the
trace holds, since an empty workload is never what was meant.

:class:`TraceTransforms` is the one description of "what to do to a trace"
that the CLI and scenario files share; :meth:`TraceTransforms.apply` runs the
set transforms in a fixed order:

1. filters: ``models``, ``log_types``, ``drop_failed``
2. ``window_s``
3. ``sample``
4. ``rate_rps`` or ``time_scale``
5. ``max_prompt_tokens``, ``max_output_tokens``
6. ``max_requests``

Filters come first so a window and a rate describe the traffic that is kept;
the cap on requests comes last so it counts what is finally replayed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from traces.errors import ConfigError, TraceError
from traces.trace import MAX_SPAN_S, Trace

__all__ = [
    "WINDOW_SYNTAX",
    "TraceTransforms",
    "cap_output",
    "cap_prompt",
    "config_error",
    "drop_failed",
    "filter_log_type",
    "filter_model",
    "head",
    "parse_window",
    "sample",
    "scale_to_rate",
    "time_scale",
    "window",
]


def window(trace: Trace, start_s: float, end_s: float) -> Trace:
    """Rows arriving in ``[start_s, end_s)``, shifted so ``start_s`` becomes time 0.

    The new trace's ``origin_s`` moves by ``start_s`` so absolute times stay right.
    """
    _finite("start_s", start_s)
    _finite("end_s", end_s)
    if end_s <= start_s:
        raise ConfigError(f"window_s: end ({end_s}) must be after start ({start_s})")
    a = trace.arrival_s
    keep = (a >= start_s) & (a < end_s)
    if len(trace) and not keep.any():
        raise TraceError(
            f"{trace.name}: window_s [{start_s:g}, {end_s:g}) s holds no arrival; "
            f"the trace's arrivals lie in [{a[0]:g}, {a[-1]:g}] s"
        )
    frame = _rows(trace, keep)
    frame["arrival_s"] = frame["arrival_s"].to_numpy() - start_s
    return trace.replace(frame, origin_s=trace.origin_s + start_s)


def time_scale(trace: Trace, factor: float, *, field: str = "time_scale") -> Trace:
    """Arrival times multiplied by ``factor`` (< 1 compresses the trace: more load).

    Raises:
        ConfigError: a factor that is not positive, or one that stretches the
            trace beyond :data:`~traces.trace.MAX_SPAN_S` (``field`` names
            the option in the message).
    """
    _positive(field, factor)
    if trace.span_s * factor > MAX_SPAN_S:
        raise ConfigError(
            f"{field}: stretches {trace.name} from {trace.span_s:g} s to "
            f"{trace.span_s * factor:.3g} s; a trace may span at most {MAX_SPAN_S:.0e} s"
        )
    frame = trace.frame.copy()
    frame["arrival_s"] = frame["arrival_s"].to_numpy() * factor
    return trace.replace(frame)


def scale_to_rate(trace: Trace, rate_rps: float) -> Trace:
    """Time-scaled so that rows / span equals ``rate_rps``.

    A trace of fewer than two rows has no rate and is returned unchanged.

    Raises:
        TraceError: two or more rows that all arrive at one instant.
    """
    _positive("rate_rps", rate_rps)
    if len(trace) < 2:
        return trace.replace(trace.frame.copy())
    span = trace.span_s
    if span <= 0:
        raise TraceError(f"{trace.name}: all {len(trace)} arrivals share one instant; no rate")
    return time_scale(trace, len(trace) / (rate_rps * span), field="rate_rps")


def sample(trace: Trace, fraction: float, seed: int = 0, *, by_session: bool = False) -> Trace:
    """A random ``fraction`` of the rows (exactly ``round(fraction * n)``), in order.

    With ``by_session`` the draw is over units, a unit being a whole session
    or one row without a session, so sampled conversations stay intact.

    Raises:
        TraceError: a fraction so small that a non-empty trace keeps nothing.
    """
    if not (0 < fraction <= 1):
        raise ConfigError(f"sample: fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    n = len(trace)
    if not by_session:
        _some_sampled(trace, fraction, n, "rows")
        keep = np.zeros(n, dtype=bool)
        keep[rng.choice(n, size=round(fraction * n), replace=False)] = True
        return trace.replace(_rows(trace, keep))
    codes, uniques = pd.factorize(trace.frame["session_id"])
    lone = codes < 0
    unit = codes.copy()
    unit[lone] = len(uniques) + np.arange(int(lone.sum()))
    n_units = len(uniques) + int(lone.sum())
    _some_sampled(trace, fraction, n_units, "sessions and lone requests")
    chosen = np.zeros(n_units, dtype=bool)
    chosen[rng.choice(n_units, size=round(fraction * n_units), replace=False)] = True
    return trace.replace(_rows(trace, chosen[unit]))


def filter_model(trace: Trace, models: Iterable[str]) -> Trace:
    """Rows served by one of ``models`` (case-insensitive, e.g. ``"gpt-4"``).

    Raises:
        TraceError: no row of a non-empty trace matches (the message lists
            the models the trace has and their counts).
    """
    wanted = _names("models", models)
    return _filtered(trace, "models", wanted, _matches(trace.frame["model"], wanted, _fold))


def filter_log_type(trace: Trace, log_types: Iterable[str]) -> Trace:
    """Rows of the given BurstGPT log types; ``"api"`` matches ``"API log"``, and so on.

    Raises:
        TraceError: no row of a non-empty trace matches (the message lists
            the log types the trace has and their counts).
    """
    wanted = _names("log_types", log_types)
    keep = _matches(trace.frame["log_type"], wanted, _log_key)
    return _filtered(trace, "log_types", wanted, keep)


def drop_failed(trace: Trace) -> Trace:
    """Rows the service did not fail.

    Raises:
        TraceError: every row of a non-empty trace failed.
    """
    keep = ~trace.frame["failed"].to_numpy(dtype=bool)
    if len(trace) and not keep.any():
        raise TraceError(f"{trace.name}: drop_failed leaves nothing: all {len(trace)} failed")
    return trace.replace(_rows(trace, keep))


def cap_prompt(trace: Trace, max_prompt_tokens: int) -> Trace:
    """Prompts clipped to ``max_prompt_tokens``.

    A clipped row keeps only the prefix hashes of the blocks that still fit
    whole (``max_prompt_tokens // block_tokens``): a cut block is other content.
    """
    if isinstance(max_prompt_tokens, bool) or int(max_prompt_tokens) != max_prompt_tokens:
        raise ConfigError(f"max_prompt_tokens: expected a whole number, got {max_prompt_tokens}")
    if max_prompt_tokens < 1:
        raise ConfigError(f"max_prompt_tokens: must be >= 1, got {max_prompt_tokens}")
    frame = trace.frame.copy()
    prompt = frame["prompt_tokens"].to_numpy()
    clipped = np.flatnonzero(prompt > max_prompt_tokens)
    frame["prompt_tokens"] = np.minimum(prompt, max_prompt_tokens)
    if len(clipped):
        hashes = frame["prefix_hashes"].to_numpy(dtype=object).copy()
        blocks = frame["block_tokens"].to_numpy(dtype=object)
        for i in clipped:
            h, b = hashes[i], blocks[i]
            if h is not None and b is not pd.NA and b:
                hashes[i] = h[: max_prompt_tokens // int(b)]
        frame["prefix_hashes"] = hashes
    return trace.replace(frame)


def cap_output(trace: Trace, max_output_tokens: int) -> Trace:
    """Outputs clipped to ``max_output_tokens``, the output budgets (``max_tokens``) too."""
    if isinstance(max_output_tokens, bool) or int(max_output_tokens) != max_output_tokens:
        raise ConfigError(f"max_output_tokens: expected a whole number, got {max_output_tokens}")
    if max_output_tokens < 1:
        raise ConfigError(f"max_output_tokens: must be >= 1, got {max_output_tokens}")
    frame = trace.frame.copy()
    for column in ("output_tokens", "max_tokens"):
        if column in frame:
            frame[column] = frame[column].clip(upper=max_output_tokens)
    return trace.replace(frame)


def head(trace: Trace, n: int) -> Trace:
    """The first ``n`` requests."""
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ConfigError(f"max_requests: expected a whole number >= 0, got {n}")
    return trace.replace(trace.frame.iloc[: int(n)].reset_index(drop=True))


class TraceTransforms(BaseModel):
    """Which transforms to apply; unset fields do nothing (order: see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    models: tuple[str, ...] | None = Field(None, min_length=1)
    """Keep these models only (case-insensitive)."""
    log_types: tuple[str, ...] | None = Field(None, min_length=1)
    """Keep these log types only (``api``, ``conversation`` or the full names)."""
    drop_failed: bool = False
    """Drop failed requests."""
    window_s: tuple[float, float] | None = None
    """Keep arrivals in [start, end) seconds, shifted to start at 0: ``"0:600"`` or ``[0, 600]``."""
    sample: float | None = Field(None, gt=0, le=1)
    """Keep this fraction of rows (or of sessions with ``sample_by_session``)."""
    sample_seed: int = 0
    """Seed of the sample."""
    sample_by_session: bool = False
    """Sample whole sessions so conversations stay intact."""
    time_scale: float | None = Field(None, gt=0, allow_inf_nan=False)
    """Multiply arrival times by this (< 1 compresses: more load)."""
    rate_rps: float | None = Field(None, gt=0, allow_inf_nan=False)
    """Rescale time so the mean rate (rows / span) is this, requests/s."""
    max_prompt_tokens: int | None = Field(None, ge=1)
    """Clip prompts to this many tokens."""
    max_output_tokens: int | None = Field(None, ge=1)
    """Clip outputs (and output budgets) to this many tokens."""
    max_requests: int | None = Field(None, ge=1)
    """Keep the first this many requests."""

    @field_validator("window_s", mode="before")
    @classmethod
    def _window_syntax(cls, v: object) -> object:
        return None if v is None else parse_window(v)

    @model_validator(mode="after")
    def _one_time_change(self) -> TraceTransforms:
        if self.time_scale is not None and self.rate_rps is not None:
            raise ValueError("time_scale and rate_rps: set one, not both")
        return self

    @classmethod
    def parse(cls, **values: object) -> TraceTransforms:
        """Validate ``values``; a bad one raises :class:`ConfigError` naming the field."""
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise config_error(exc, "trace transforms") from None

    def apply(self, trace: Trace) -> Trace:
        """Apply the set transforms in the documented order."""
        out = trace
        if self.models is not None:
            out = filter_model(out, self.models)
        if self.log_types is not None:
            out = filter_log_type(out, self.log_types)
        if self.drop_failed:
            out = drop_failed(out)
        if self.window_s is not None:
            out = window(out, *self.window_s)
        if self.sample is not None:
            out = sample(out, self.sample, self.sample_seed, by_session=self.sample_by_session)
        if self.rate_rps is not None:
            out = scale_to_rate(out, self.rate_rps)
        elif self.time_scale is not None:
            out = time_scale(out, self.time_scale)
        if self.max_prompt_tokens is not None:
            out = cap_prompt(out, self.max_prompt_tokens)
        if self.max_output_tokens is not None:
            out = cap_output(out, self.max_output_tokens)
        if self.max_requests is not None:
            out = head(out, self.max_requests)
        return out if out is not trace else trace.replace(trace.frame.copy())


#: How a time window is written, in every message about one.
WINDOW_SYNTAX = 'START:END in seconds, such as "0:600" or [0, 600]'


def parse_window(value: object) -> tuple[float, float]:
    """A time window ``(start_s, end_s)`` from ``"START:END"`` or a two-item list of seconds.

    The one syntax of a window wherever one is given: ``trace convert
    --window 0:600``, ``simulate --transform window_s=0:600`` (or
    ``window_s=[0,600]``) and ``window_s = "0:600"`` (or ``[0, 600]``) in a
    scenario file.

    Raises:
        ConfigError: anything else, or an end not after its start; the
            message shows the syntax.
    """
    if isinstance(value, str):
        parts: list[object] = value.split(":")
    elif isinstance(value, list | tuple):
        parts = list(value)
    else:
        parts = []
    bounds = [_seconds(p) for p in parts] if len(parts) == 2 else []
    if len(bounds) != 2 or None in bounds:
        raise ConfigError(f"expected {WINDOW_SYNTAX}; got {value!r}")
    start, end = bounds
    if end <= start:  # type: ignore[operator]
        raise ConfigError(f"end ({end:g}) must be after start ({start:g}); got {value!r}")
    return start, end  # type: ignore[return-value]


def _seconds(value: object) -> float | None:
    """A finite number of seconds from a number or its text, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def config_error(exc: ValidationError, what: str) -> ConfigError:
    """One :class:`ConfigError` listing each invalid field of ``exc`` and why."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(options)"
        msg = err["msg"]
        if err["type"] == "value_error":  # a validator's own words, without pydantic's prefix
            msg = str(err.get("ctx", {}).get("error", msg.removeprefix("Value error, ")))
        parts.append(f"{where}: {msg}")
    return ConfigError(f"{what}: " + "; ".join(parts))


# -- helpers ----------------------------------------------------------------


def _rows(trace: Trace, keep: np.ndarray) -> pd.DataFrame:
    return trace.frame.loc[keep].reset_index(drop=True)


def _finite(field: str, value: float) -> None:
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{field}: expected finite seconds, got {value!r}")


def _positive(field: str, value: float) -> None:
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{field}: expected a positive finite number, got {value!r}")


def _some_sampled(trace: Trace, fraction: float, n_units: int, units: str) -> None:
    """Raise when a sample of a non-empty trace would keep nothing."""
    if n_units and round(fraction * n_units) == 0:
        raise TraceError(
            f"{trace.name}: sample {fraction:g} of {n_units:,} {units} keeps none; "
            f"a fraction above {0.5 / n_units:.2g} keeps at least one"
        )


def _filtered(trace: Trace, field: str, wanted: list[str], keep: np.ndarray) -> Trace:
    """The kept rows; a filter that keeps none of a non-empty trace names what it has."""
    if len(trace) and not keep.any():
        column = trace.frame["model" if field == "models" else "log_type"]
        counts = column.value_counts(dropna=True)
        present = ", ".join(f"{k} ({v:,})" for k, v in counts.items() if v > 0)
        has = f"it has: {present}" if present else "the trace records none"
        asked = ", ".join(repr(w) for w in wanted)
        raise TraceError(f"{trace.name}: {field} {asked} match no request; {has}")
    return trace.replace(_rows(trace, keep))


def _names(field: str, values: Iterable[str]) -> list[str]:
    out = [values] if isinstance(values, str) else list(values)
    if not out:
        raise ConfigError(f"{field}: give at least one name")
    return out


def _fold(name: str) -> str:
    return name.strip().casefold()


def _log_key(name: str) -> str:
    return _fold(name).removesuffix(" log").strip()


def _matches(column: pd.Series, wanted: Iterable[str], key: Callable[[str], str]) -> np.ndarray:
    """Rows whose (categorical) value, normalized by ``key``, is in ``wanted``."""
    targets = {key(w) for w in wanted}
    values = column.astype("category")
    hit = np.array([key(str(c)) in targets for c in values.cat.categories], dtype=bool)
    codes = values.cat.codes.to_numpy()
    return (codes >= 0) & hit[np.maximum(codes, 0)] if len(hit) else np.zeros(len(codes), bool)
