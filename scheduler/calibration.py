"""Fitting the cost model's coefficients to measured step times (offline code).

Measurements are a table (CSV file or pandas DataFrame), one row per engine
step, e.g. from SGLang's ``bench_one_batch`` (equal-length sequences):

==============  =======  =====================================================
column          type     meaning
==============  =======  =====================================================
kind            str      ``prefill`` or ``decode``
batch_size      int      sequences in the step, >= 1
new_tokens      int      prefill: new tokens summed over the batch, >= 1
cached_tokens   int      prefill: cached-prefix tokens summed (default 0)
context_tokens  int      decode: context tokens summed over the batch
latency_s       float    measured step time in seconds, > 0
cuda_graph      bool     optional; default false for prefill, true for decode
==============  =======  =====================================================

Sequences of a row are taken as equal: ``new_tokens / batch_size`` each.

The fit mirrors :class:`~scheduler.cost_model.CostModel`'s terms. Prefill:
``c0 + max(W, c1 * new + lm_head * seqs) + max(c2 * attention_units, kv *
cached)``, with the per-step constant ``c0``, the per-token GEMM cost ``c1``,
the attention cost ``c2`` and the weight-read floor ``W``. Decode: ``d0 +
max(W, (c1 + lm_head) * n) + d1 * n + b * context`` with the per-step
constant ``d0``, the per-sequence cost ``d1`` and the per-context-token cost
``b``. Each ``max`` is resolved by classifying points (compute- or
memory-bound) and refitting until the classes settle; each fit is a
non-negative least squares on relative errors. Terms the data cannot pin
(eager-launch penalty, LM head, tensor-parallel all-reduce) keep their
first-principles values.

A fit is a :class:`~scheduler.profile.Profile`; the file format and its
load and save live in :mod:`scheduler.profile`, apart from this module's
numpy and pandas, so that reading a profile
(``CostModel.from_names(model, gpu, tp, profile=path)``) needs neither.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pandas as pd

from scheduler.cost_model import Coefficients, CostModel, Efficiency
from scheduler.hardware import GpuSpec, ModelSpec, gpu_spec, model_spec
from scheduler.profile import CoefficientsModel, FitQuality, Profile
from traces.errors import ConfigError

__all__ = ["fit_profile", "load_measurements"]

# -- measurements -----------------------------------------------------------------

_REQUIRED = ("kind", "batch_size", "latency_s")


def _bad(where: str, line: int | None, field: str, expected: str, got: object) -> ConfigError:
    at = f"{where}:{line}" if line is not None else where
    got = got.item() if hasattr(got, "item") else got  # numpy scalar -> plain value
    return ConfigError(f"{at}: field {field!r}: expected {expected}; got {got!r}")


def load_measurements(source: str | Path | pd.DataFrame) -> pd.DataFrame:
    """Read and check a measurement table (schema in the module docstring).

    Returns a DataFrame with every column present and typed. Line numbers in
    errors count the CSV header as line 1 (DataFrame rows: header + index).

    Raises:
        ConfigError: missing file or column, or a malformed value, naming the
            file, line and field.
    """
    if isinstance(source, pd.DataFrame):
        where, df = "measurements", source.reset_index(drop=True)
    else:
        where = str(source)
        try:
            df = pd.read_csv(source)
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise ConfigError(f"{where}: cannot read measurements: {exc}") from exc
    for col in _REQUIRED:
        if col not in df.columns:
            raise _bad(where, None, col, "a column of that name", None)
    out = pd.DataFrame({"kind": df["kind"].astype(str).str.strip().str.lower()})
    for row, kind in enumerate(out["kind"]):
        if kind not in ("prefill", "decode"):
            raise _bad(where, row + 2, "kind", "'prefill' or 'decode'", df["kind"][row])
    is_prefill = out["kind"] == "prefill"

    def numbers(
        col: str, default: float | None, minimum: float, strict: bool, used: pd.Series | None
    ) -> np.ndarray:
        """Column ``col`` as floats; rows outside ``used`` may leave it empty."""
        if col not in df.columns:
            if default is None:
                raise _bad(where, None, col, "a column of that name", None)
            return np.full(len(df), default, dtype=float)
        values = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)
        for row, v in enumerate(values):
            if np.isnan(v) and used is not None and not used[row]:
                continue
            if np.isnan(v) and default is not None:
                values[row] = v = default
            if not (np.isfinite(v) and (v > minimum if strict else v >= minimum)):
                sign = ">" if strict else ">="
                raise _bad(where, row + 2, col, f"a number {sign} {minimum:g}", df[col][row])
        return np.nan_to_num(values)

    is_decode = ~is_prefill
    out["batch_size"] = numbers("batch_size", None, 1, False, None)
    out["new_tokens"] = numbers("new_tokens", None if is_prefill.any() else 0, 1, False, is_prefill)
    out["cached_tokens"] = numbers("cached_tokens", 0.0, 0, False, is_prefill)
    out["context_tokens"] = numbers(
        "context_tokens", None if is_decode.any() else 0, 0, False, is_decode
    )
    out["latency_s"] = numbers("latency_s", None, 0, True, None)
    graph = df["cuda_graph"] if "cuda_graph" in df.columns else pd.Series([None] * len(df))
    flags = []
    for row, value in enumerate(graph):
        text = str(value).strip().lower()
        if value is None or text in ("", "nan", "none"):
            flags.append(not bool(is_prefill[row]))
        elif text in ("true", "1", "1.0", "yes"):
            flags.append(True)
        elif text in ("false", "0", "0.0", "no"):
            flags.append(False)
        else:
            raise _bad(where, row + 2, "cuda_graph", "true or false", value)
    out["cuda_graph"] = flags
    return out


# -- fitting ------------------------------------------------------------------------


def _nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Exact non-negative least squares for a handful of columns.

    The optimum is the unconstrained fit on some subset of the columns with
    every coefficient >= 0; with at most five columns, trying every subset
    is cheap and needs no solver.
    """
    best, best_sse = np.zeros(x.shape[1]), float(y @ y)
    cols = [j for j in range(x.shape[1]) if np.any(x[:, j])]
    for k in range(1, len(cols) + 1):
        for subset in itertools.combinations(cols, k):
            sol, *_ = np.linalg.lstsq(x[:, subset], y, rcond=None)
            if np.all(sol >= 0):
                resid = y - x[:, subset] @ sol
                sse = float(resid @ resid)
                if sse < best_sse:
                    best_sse, best = sse, np.zeros(x.shape[1])
                    best[list(subset)] = sol
    return best


def _fit_prefill(p: pd.DataFrame, k: Coefficients, kv: float, notes: list[str]) -> dict:
    """c0, c1, c2 and W from prefill rows (see the module docstring)."""
    b, n, c, t = (
        p[col].to_numpy(float) for col in ("batch_size", "new_tokens", "cached_tokens", "latency_s")
    )
    units = n * (c / b + n / (2 * b))
    known = (1 - p["cuda_graph"].to_numpy(float)) * k.eager_extra_s + k.comm_s_per_step
    known = known + k.comm_s_per_token * n
    c1, c2, w = k.linear_s_per_token, k.attention_s_per_unit, k.weight_read_s
    comp = attn = None
    for _ in range(50):
        new_comp = c1 * n + k.lm_head_s_per_seq * b > w
        new_attn = c2 * units > kv * c
        if comp is not None and np.array_equal(comp, new_comp) and np.array_equal(attn, new_attn):
            break
        comp, attn = new_comp, new_attn
        x = np.column_stack([np.ones_like(t), comp * n, attn * units, ~comp * 1.0])
        y = t - known - comp * k.lm_head_s_per_seq * b - ~attn * kv * c
        coef = _nnls(x / t[:, None], y / t)
        c0 = coef[0]
        c1 = coef[1] if comp.any() else k.linear_s_per_token
        c2 = coef[2] if attn.any() and units[attn].any() else k.attention_s_per_unit
        w = coef[3] if (~comp).any() else k.weight_read_s
    if not comp.any():
        notes.append("no compute-bound prefill: linear_s_per_token kept from specs")
    if comp.all():
        notes.append("no memory-bound prefill: weight_read_s kept from specs")
    return {
        "prefill_overhead_s": c0,
        "linear_s_per_token": c1,
        "attention_s_per_unit": c2,
        "weight_read_s": w,
    }


def _fit_decode(d: pd.DataFrame, k: Coefficients) -> dict:
    """d0, d1 and b from decode rows, with the GEMM/weight floor from ``k``."""
    n, ctx, t = (d[col].to_numpy(float) for col in ("batch_size", "context_tokens", "latency_s"))
    gemm = np.maximum((k.linear_s_per_token + k.lm_head_s_per_seq) * n, k.weight_read_s)
    known = (1 - d["cuda_graph"].to_numpy(float)) * k.eager_extra_s + k.comm_s_per_step
    y = t - known - gemm - k.comm_s_per_token * n
    coef = _nnls(np.column_stack([np.ones_like(t), n, ctx]) / t[:, None], y / t)
    return {
        "decode_overhead_s": coef[0],
        "decode_s_per_seq": coef[1],
        "kv_read_s_per_token": coef[2],
    }


def _quality(model: CostModel, rows: pd.DataFrame) -> FitQuality:
    pred = []
    for r in rows.itertuples():
        b = int(r.batch_size)
        if r.kind == "prefill":
            seqs_new, seqs_cached = [r.new_tokens / b] * b, [r.cached_tokens / b] * b
            pred.append(model.prefill_time_s(seqs_new, seqs_cached, cuda_graph=r.cuda_graph))
        else:
            pred.append(model.decode_time_s(b, r.context_tokens, cuda_graph=r.cuda_graph))
    t, p = rows["latency_s"].to_numpy(float), np.asarray(pred)
    ss_tot = float(((t - t.mean()) ** 2).sum())
    r2 = 1.0 - float(((t - p) ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    return FitQuality(
        r2=r2, points=len(t), rms_rel_error=float(np.sqrt(np.mean(((p - t) / t) ** 2)))
    )


def fit_profile(
    measurements: str | Path | pd.DataFrame,
    model: str | ModelSpec,
    gpu: str | GpuSpec,
    tp: int = 1,
    *,
    source: str = "",
    efficiency: Efficiency | None = None,
) -> Profile:
    """Fit the cost model of ``model`` on ``gpu`` at ``tp`` to measured steps.

    Coefficients without data (a kind of step absent, or a regime never
    reached) keep their first-principles values; the profile's ``notes``
    say which.

    Raises:
        ConfigError: malformed measurements (see :func:`load_measurements`)
            or an unknown model or GPU.
    """
    rows = load_measurements(measurements)
    model_s, gpu_s = model_spec(model), gpu_spec(gpu)
    prior = Coefficients.from_specs(model_s, gpu_s, tp, efficiency)
    prefill, decode = rows[rows["kind"] == "prefill"], rows[rows["kind"] == "decode"]
    notes: list[str] = []
    fitted = prior
    if len(prefill):
        fitted = dataclasses.replace(
            fitted, **_fit_prefill(prefill, prior, prior.kv_read_s_per_token, notes)
        )
    else:
        notes.append("no prefill rows: prefill coefficients kept from specs")
    if len(decode):
        fitted = dataclasses.replace(fitted, **_fit_decode(decode, fitted))
        if len(prefill):
            # The prefix-read cost of prefills is the decode KV read: refit with it.
            notes.clear()
            fitted = dataclasses.replace(
                fitted, **_fit_prefill(prefill, prior, fitted.kv_read_s_per_token, notes)
            )
            fitted = dataclasses.replace(fitted, **_fit_decode(decode, fitted))
    else:
        notes.append("no decode rows: decode coefficients kept from specs")
    cm = CostModel(model_s, gpu_s, tp, coefficients=fitted, efficiency=efficiency)
    fit = {
        kind: _quality(cm, part)
        for kind, part in (("prefill", prefill), ("decode", decode))
        if len(part)
    }
    return Profile(
        model=model_s.name,
        gpu=gpu_s.name,
        tp=tp,
        coefficients=CoefficientsModel(**dataclasses.asdict(fitted)),
        fit=fit,
        source=source,
        notes=notes,
    )
