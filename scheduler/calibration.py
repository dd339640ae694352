"""Fitting the cost model's coefficients to measured times (offline code).

Measurements are a table (CSV file or pandas DataFrame), one row per
measured time. Engine steps come from a benchmark such as SGLang's
``bench_one_batch`` (equal-length sequences); client-side rows come from
``llmsched calibrate --target`` (:mod:`sim.live_calibration`), which
measures a running server over HTTP:

==============  =======  =====================================================
column          type     meaning
==============  =======  =====================================================
kind            str      ``prefill``, ``decode``, ``mixed`` or ``ttft``
batch_size      int      sequences in the step (prefill, mixed: the prefill
                         sequences; ttft: 1), >= 1
new_tokens      int      prefill, mixed, ttft: new tokens summed, >= 1
cached_tokens   int      prefill, mixed, ttft: cached-prefix tokens summed
                         (default 0)
context_tokens  int      decode, mixed: context tokens of the decoding
                         sequences summed
decode_seqs     int      mixed: decode sequences riding in the step
                         (default 0)
latency_s       float    measured time in seconds, > 0
cuda_graph      bool     optional; default false except for decode
==============  =======  =====================================================

Row kinds: ``prefill`` and ``decode`` are engine steps; ``mixed`` is one
step that ran prefill chunks with decodes riding in it (vLLM's every step,
SGLang's ``--enable-mixed-chunk``); ``ttft`` is the time to first token of
a request sent alone to an idle server, measured by the client: the
server's per-request overhead (HTTP, tokenization, frontend) plus one
prefill step. Sequences of a row are taken as equal: ``new_tokens /
batch_size`` each.

The fit mirrors :class:`~scheduler.cost_model.CostModel`'s terms. A prefill
(or mixed) step: ``c0 + max(W, c1 * tokens + lm_head * seqs) + max(c2 *
attention_units, kv * cached) + kv * decode_context + d1 * decodes``, with
the per-step constant ``c0``, the per-token GEMM cost ``c1``, the attention
cost ``c2`` and the weight-read floor ``W``; a ``ttft`` row adds the
per-request overhead ``r0`` to its step. Decode: ``d0 + max(W, (c1 +
lm_head) * n) + d1 * n + b * context`` with the per-step constant ``d0``,
the per-sequence cost ``d1`` and the per-context-token cost ``b``. Each
``max`` is resolved by classifying points (compute- or memory-bound) and
refitting until the classes settle; each fit is a non-negative least
squares on relative errors. ``r0`` and ``c0`` are told apart only when
both ``ttft`` rows and step rows (prefill or mixed) are given: a TTFT alone
sees only their sum.

A term is fitted only where the data pins it: some row exercises it and it
is not a combination of the terms fitted before it (a batch size that never
varies cannot price a sequence). The others keep the value the model and
GPU description give, and the profile lists them (``unfitted``) with a note
saying why. The fit refuses data with no more points than terms it fits
(there would be no residual to judge it by), and a fit whose rms relative
error exceeds a bound: a cost model that misses by that much predicts
nothing.

A fit is a :class:`Calibration`: a :class:`~scheduler.profile.Profile` and
every row's residual. The file format and its load and save live in
:mod:`scheduler.profile`, apart from this module's numpy and pandas, so that
reading a profile (``CostModel.from_names(model, gpu, tp, profile=path)``)
needs neither.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from scheduler.cost_model import Coefficients, CostModel, Efficiency
from scheduler.describe import spec_fields
from scheduler.hardware import GpuSpec, ModelSpec, gpu_spec, model_spec
from scheduler.profile import CoefficientsModel, FitQuality, Profile
from traces.errors import ConfigError

__all__ = [
    "KINDS",
    "MAX_RMS_REL_ERROR",
    "Calibration",
    "calibrate",
    "fit_profile",
    "load_measurements",
]

#: Row kinds, in the order reports list them.
KINDS = ("ttft", "prefill", "mixed", "decode")

#: Default bound on any kind's rms relative error (see :func:`calibrate`).
MAX_RMS_REL_ERROR = 0.3

# -- measurements -----------------------------------------------------------------

_REQUIRED = ("kind", "batch_size", "latency_s")


def _bad(where: str, line: int | None, field: str, expected: str, got: object) -> ConfigError:
    at = f"{where}:{line}" if line is not None else where
    got = got.item() if hasattr(got, "item") else got  # numpy scalar -> plain value
    return ConfigError(f"{at}: field {field!r}: expected {expected}; got {got!r}")


def _read_csv(path: str | Path) -> pd.DataFrame:
    """The CSV at ``path``; one clear error for a missing, binary or malformed file."""
    where = str(path)
    try:
        head = Path(path).read_bytes()[:4096]
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read measurements: {exc.strerror or exc}") from exc
    if b"\0" in head:
        raise ConfigError(f"{where}: not a CSV file (binary data); expected a CSV of measurements")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not merely a character cut at the 4 KiB mark
            raise ConfigError(
                f"{where}: not a CSV file (byte {exc.start} is not UTF-8 text); "
                "expected a CSV of measurements"
            ) from None
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise ConfigError(f"{where}: empty file; expected a CSV of measurements") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{where}: not a readable CSV: {first}") from None


def load_measurements(source: str | Path | pd.DataFrame) -> pd.DataFrame:
    """Read and check a measurement table (schema in the module docstring).

    Returns a DataFrame with every column present and typed. Line numbers in
    errors count the CSV header as line 1 (DataFrame rows: header + index).

    Raises:
        ConfigError: a missing, binary or empty file, a missing column, or a
            malformed value, naming the file, line and field.
    """
    if isinstance(source, pd.DataFrame):
        where, df = "measurements", source.reset_index(drop=True)
    else:
        where, df = str(source), _read_csv(source)
    for col in _REQUIRED:
        if col not in df.columns:
            raise _bad(where, None, col, "a column of that name", None)
    if not len(df):
        raise ConfigError(f"{where}: no measurements (a header and no rows)")
    out = pd.DataFrame({"kind": df["kind"].astype(str).str.strip().str.lower()})
    for row, kind in enumerate(out["kind"]):
        if kind not in KINDS:
            raise _bad(
                where, row + 2, "kind", "'ttft', 'prefill', 'mixed' or 'decode'", df["kind"][row]
            )
    extends = out["kind"] != "decode"
    contexts = out["kind"].isin(("decode", "mixed"))

    def numbers(
        col: str, default: float | None, minimum: float, strict: bool, used: pd.Series | None
    ) -> np.ndarray:
        """Column ``col`` as floats; rows outside ``used`` may leave it empty."""
        if col not in df.columns:
            if default is None:
                raise _bad(where, None, col, "a column of that name", None)
            return np.full(len(df), default, dtype=float)
        values = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float, copy=True)
        for row, v in enumerate(values):
            if np.isnan(v) and used is not None and not used[row]:
                continue
            if np.isnan(v) and default is not None:
                values[row] = v = default
            if not (np.isfinite(v) and (v > minimum if strict else v >= minimum)):
                sign = ">" if strict else ">="
                raise _bad(where, row + 2, col, f"a number {sign} {minimum:g}", df[col][row])
        return np.nan_to_num(values)

    out["batch_size"] = numbers("batch_size", None, 1, False, None)
    out["new_tokens"] = numbers("new_tokens", None if extends.any() else 0, 1, False, extends)
    out["cached_tokens"] = numbers("cached_tokens", 0.0, 0, False, extends)
    out["context_tokens"] = numbers(
        "context_tokens", None if (out["kind"] == "decode").any() else 0, 0, False, contexts
    )
    out["decode_seqs"] = numbers("decode_seqs", 0.0, 0, False, out["kind"] == "mixed")
    out.loc[out["kind"] == "ttft", "batch_size"] = 1
    out.loc[~contexts, "context_tokens"] = 0
    out.loc[~extends, ["new_tokens", "cached_tokens"]] = 0
    out["latency_s"] = numbers("latency_s", None, 0, True, None)
    graph = df["cuda_graph"] if "cuda_graph" in df.columns else pd.Series([None] * len(df))
    flags = []
    for row, value in enumerate(graph):
        text = str(value).strip().lower()
        if value is None or text in ("", "nan", "none"):
            flags.append(out["kind"][row] == "decode")
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


def _pinned(x: np.ndarray, names: list[str]) -> tuple[list[int], dict[str, str]]:
    """Columns the data pins, in order, and why each other one is not.

    A column is pinned when some row exercises it and it adds to the rank
    of the columns pinned before it (columns scaled to unit norm first, so
    units do not matter).
    """
    keep: list[int] = []
    why: dict[str, str] = {}
    for j, name in enumerate(names):
        col = x[:, j]
        if not np.any(col):
            why[name] = "no row exercises it"
            continue
        trial = x[:, [*keep, j]]
        trial = trial / np.linalg.norm(trial, axis=0)
        if np.linalg.matrix_rank(trial, tol=1e-9) > len(keep):
            keep.append(j)
        else:
            others = ", ".join(names[i] for i in keep)
            why[name] = f"not separable from {others} in these rows"
    return keep, why


def _solve(
    x: np.ndarray, y: np.ndarray, t: np.ndarray, names: list[str], prior: dict[str, float]
) -> tuple[dict[str, float], dict[str, str]]:
    """Fit the pinned columns of ``x`` to ``y`` (relative to ``t``); the others keep ``prior``."""
    keep, why = _pinned(x, names)
    fixed = [j for j in range(len(names)) if j not in keep]
    y = y - x[:, fixed] @ np.array([prior[names[j]] for j in fixed]) if fixed else y
    coef = _nnls(x[:, keep] / t[:, None], y / t) if keep else np.zeros(0)
    values = dict(prior)
    values.update({names[j]: float(c) for j, c in zip(keep, coef, strict=True)})
    return values, why


_EXTEND_TERMS = [
    "linear_s_per_token",
    "attention_s_per_unit",
    "request_overhead_s",
    "prefill_overhead_s",
    "weight_read_s",
]
_DECODE_TERMS = ["decode_overhead_s", "decode_s_per_seq", "kv_read_s_per_token"]


def _fit_extend(p: pd.DataFrame, k: Coefficients) -> tuple[dict[str, float], dict[str, str]]:
    """c1, c2, r0, c0 and W from prefill, mixed and ttft rows, with ``k``'s decode terms."""
    b, n, c, dec, ctx, t = (
        p[col].to_numpy(float)
        for col in (
            "batch_size",
            "new_tokens",
            "cached_tokens",
            "decode_seqs",
            "context_tokens",
            "latency_s",
        )
    )
    request = (p["kind"] == "ttft").to_numpy(float)
    tokens, seqs = n + dec, b + dec
    units = n * (c / b + n / (2 * b))
    known = (1 - p["cuda_graph"].to_numpy(float)) * k.eager_extra_s + k.comm_s_per_step
    known = known + k.comm_s_per_token * tokens + k.kv_read_s_per_token * ctx
    known = known + k.decode_s_per_seq * dec
    values = {name: getattr(k, name) for name in _EXTEND_TERMS}
    why: dict[str, str] = {}
    comp = attn = None
    for _ in range(50):
        gemm = values["linear_s_per_token"] * tokens + k.lm_head_s_per_seq * seqs
        new_comp = gemm > values["weight_read_s"]
        new_attn = values["attention_s_per_unit"] * units > k.kv_read_s_per_token * c
        if comp is not None and np.array_equal(comp, new_comp) and np.array_equal(attn, new_attn):
            break
        comp, attn = new_comp, new_attn
        x = np.column_stack([comp * tokens, attn * units, request, np.ones_like(t), ~comp * 1.0])
        y = t - known - comp * k.lm_head_s_per_seq * seqs - ~attn * k.kv_read_s_per_token * c
        values, why = _solve(x, y, t, _EXTEND_TERMS, {n: getattr(k, n) for n in _EXTEND_TERMS})
    return values, why


def _fit_decode(d: pd.DataFrame, k: Coefficients) -> tuple[dict[str, float], dict[str, str]]:
    """d0, d1 and b from decode rows, with the GEMM/weight floor from ``k``."""
    n, ctx, t = (d[col].to_numpy(float) for col in ("batch_size", "context_tokens", "latency_s"))
    gemm = np.maximum((k.linear_s_per_token + k.lm_head_s_per_seq) * n, k.weight_read_s)
    known = (1 - d["cuda_graph"].to_numpy(float)) * k.eager_extra_s + k.comm_s_per_step
    y = t - known - gemm - k.comm_s_per_token * n
    x = np.column_stack([np.ones_like(t), n, ctx])
    return _solve(x, y, t, _DECODE_TERMS, {n: getattr(k, n) for n in _DECODE_TERMS})


def _predict(model: CostModel, rows: pd.DataFrame) -> np.ndarray:
    """What ``model`` says each row's latency is."""
    k = model.coefficients
    pred = []
    for r in rows.itertuples():
        b = int(r.batch_size)
        seqs_new, seqs_cached = [r.new_tokens / b] * b, [r.cached_tokens / b] * b
        if r.kind == "decode":
            pred.append(model.decode_time_s(b, r.context_tokens, cuda_graph=r.cuda_graph))
        elif r.kind == "mixed" and r.decode_seqs > 0:
            # CostModel.mixed_time_s is always eager (the extend path).
            pred.append(
                model.mixed_time_s(seqs_new, seqs_cached, int(r.decode_seqs), r.context_tokens)
                - (0.0 if not r.cuda_graph else k.eager_extra_s)
            )
        else:
            step = model.prefill_time_s(seqs_new, seqs_cached, cuda_graph=r.cuda_graph)
            pred.append(step + (k.request_overhead_s if r.kind == "ttft" else 0.0))
    return np.asarray(pred, dtype=float)


def _quality(t: np.ndarray, p: np.ndarray) -> FitQuality:
    rel = (p - t) / t
    ss_tot = float(((t - t.mean()) ** 2).sum())
    # R^2 means nothing on fewer than three points or latencies that do not vary.
    r2 = 1.0 - float(((t - p) ** 2).sum()) / ss_tot if len(t) >= 3 and ss_tot > 0 else None
    return FitQuality(
        r2=r2,
        points=len(t),
        rms_rel_error=float(np.sqrt(np.mean(rel**2))),
        max_rel_error=float(np.max(np.abs(rel))),
    )


@dataclass(frozen=True)
class Calibration:
    """A fit: the profile, and each measurement with the profile's prediction.

    ``residuals`` has the measurement columns plus ``predicted_s`` and
    ``rel_error`` (predicted over measured, minus one).
    """

    profile: Profile
    residuals: pd.DataFrame


def _check_enough(kind: str, points: int, fitted: list[str]) -> None:
    if fitted and points <= len(fitted):
        raise ConfigError(
            f"{kind} rows: {points} point{'s' if points != 1 else ''} cannot fit "
            f"{len(fitted)} term{'s' if len(fitted) != 1 else ''} ({', '.join(fitted)}) and "
            "leave a residual to judge the fit "
            f"by; measure at least {len(fitted) + 1} distinct points"
        )


def calibrate(
    measurements: str | Path | pd.DataFrame,
    model: str | ModelSpec,
    gpu: str | GpuSpec,
    tp: int = 1,
    *,
    source: str = "",
    efficiency: Efficiency | None = None,
    max_rms_rel_error: float = MAX_RMS_REL_ERROR,
) -> Calibration:
    """Fit the cost model of ``model`` on ``gpu`` at ``tp`` to measurements.

    Terms the data cannot pin (a kind of row absent, a regime never
    reached, a size never varied) keep the value the model and GPU give;
    the profile lists them in ``unfitted`` and its ``notes`` say why.

    Raises:
        ConfigError: malformed measurements (see :func:`load_measurements`),
            an unknown model or GPU, no more points of a kind than the terms
            fitted from it, or a fit whose rms relative error on some kind
            exceeds ``max_rms_rel_error``.
    """
    rows = load_measurements(measurements)
    model_s, gpu_s = model_spec(model), gpu_spec(gpu)
    prior = Coefficients.from_specs(model_s, gpu_s, tp, efficiency)
    decode = rows[rows["kind"] == "decode"]
    extend = rows[rows["kind"] != "decode"]
    fitted = prior
    why_extend: dict[str, str] = {}
    why_decode: dict[str, str] = {}
    # Each side leans on the other's terms (the prefix read is the decode KV
    # read; decode's GEMM floor is the prefill's): alternate until settled.
    for _ in range(3):
        if len(decode):
            values, why_decode = _fit_decode(decode, fitted)
            fitted = dataclasses.replace(fitted, **values)
        if len(extend):
            values, why_extend = _fit_extend(extend, fitted)
            fitted = dataclasses.replace(fitted, **values)
    notes: list[str] = []
    unfitted: list[str] = []
    for terms, part, why, label in (
        (_EXTEND_TERMS, extend, why_extend, "ttft, prefill or mixed"),
        (_DECODE_TERMS, decode, why_decode, "decode"),
    ):
        if not len(part):
            why = {t: f"no {label} rows" for t in terms}
        for term in terms:
            if term in why:
                unfitted.append(term)
                notes.append(f"{term}: {why[term]}; kept {getattr(fitted, term):.4g} s")
        kinds = "/".join(k for k in KINDS if k in set(part["kind"]))
        _check_enough(kinds, len(part), [t for t in terms if t not in why])
    # Terms no client- or step-level timing here separates; used by every step.
    for term, reason in (
        ("lm_head_s_per_seq", "folded into the per-token and per-step terms"),
        ("eager_extra_s", "no row compares eager and CUDA-graph steps"),
    ):
        if getattr(fitted, term) > 0:
            unfitted.append(term)
            notes.append(f"{term}: {reason}; kept {getattr(fitted, term):.4g} s")
    if tp > 1:
        unfitted += ["comm_s_per_token", "comm_s_per_step"]
        notes.append("comm_s_per_token, comm_s_per_step: tensor-parallel traffic not separated")
    cm = CostModel(model_s, gpu_s, tp, coefficients=fitted, efficiency=efficiency)
    predicted = _predict(cm, rows)
    residuals = rows.assign(predicted_s=predicted, rel_error=predicted / rows["latency_s"] - 1)
    fit: dict[str, FitQuality] = {}
    for kind in KINDS:
        part = residuals[residuals["kind"] == kind]
        if len(part):
            fit[kind] = _quality(part["latency_s"].to_numpy(float), part["predicted_s"].to_numpy())
    for kind, quality in fit.items():
        if quality.rms_rel_error > max_rms_rel_error:
            part = residuals[residuals["kind"] == kind]
            worst = part.loc[part["rel_error"].abs().idxmax()]
            raise ConfigError(
                f"the cost model does not fit the {kind} rows: rms relative error "
                f"{quality.rms_rel_error:.0%} (bound {max_rms_rel_error:.0%}); worst: measured "
                f"{worst.latency_s * 1e3:.3g} ms, predicted {worst.predicted_s * 1e3:.3g} ms "
                f"(row {int(worst.name) + 2}). Noisy or mislabelled measurements, or an engine "
                "that schedules differently (see --engine)"
            )
    profile = Profile(
        model=model_s.name,
        gpu=gpu_s.name,
        tp=tp,
        model_description=spec_fields(model_s),
        device_description=spec_fields(gpu_s),
        coefficients=CoefficientsModel(**dataclasses.asdict(fitted)),
        fit=fit,
        source=source,
        notes=notes,
        unfitted=unfitted,
    )
    return Calibration(profile=profile, residuals=residuals)


def fit_profile(
    measurements: str | Path | pd.DataFrame,
    model: str | ModelSpec,
    gpu: str | GpuSpec,
    tp: int = 1,
    *,
    source: str = "",
    efficiency: Efficiency | None = None,
) -> Profile:
    """The profile of :func:`calibrate` (same arguments and errors), without the residuals."""
    return calibrate(measurements, model, gpu, tp, source=source, efficiency=efficiency).profile
