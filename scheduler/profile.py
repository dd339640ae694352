"""Cost-model profile files: the JSON a calibration writes and a cost model reads.

A profile holds the cost model's coefficients (seconds; the fields of
:class:`scheduler.cost_model.Coefficients`, by name) fitted for one model,
GPU and tensor-parallel degree, with how well each kind of step fitted and
what the data could not determine. This module is the file format alone:
pydantic and JSON, no numpy or pandas, so every driver (simulator, emulator,
router) reads profiles without the offline fitter
(:mod:`scheduler.calibration`), and it imports nothing of the cost model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from traces.errors import ConfigError

__all__ = ["CoefficientsModel", "FitQuality", "Profile", "load_profile", "save_profile"]

_Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class CoefficientsModel(BaseModel):
    """The cost model's coefficients as a profile stores them, in seconds.

    Field for field :class:`scheduler.cost_model.Coefficients`
    (``Coefficients(**model.model_dump())``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefill_overhead_s: _Seconds
    decode_overhead_s: _Seconds
    eager_extra_s: _Seconds
    linear_s_per_token: _Seconds
    lm_head_s_per_seq: _Seconds
    attention_s_per_unit: _Seconds
    weight_read_s: _Seconds
    kv_read_s_per_token: _Seconds
    decode_s_per_seq: _Seconds
    comm_s_per_token: _Seconds
    comm_s_per_step: _Seconds
    #: Absent from profiles written before the term existed: none then.
    request_overhead_s: _Seconds = 0.0


class FitQuality(BaseModel):
    """How well one kind of step was fitted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Coefficient of determination of the fitted model on the latencies;
    #: None where it means nothing (fewer than three points, or latencies
    #: that do not vary).
    r2: float | None
    points: int = Field(ge=0)
    #: Root mean square of relative errors.
    rms_rel_error: float = Field(ge=0)
    #: Largest relative error of one point.
    max_rel_error: float = Field(0.0, ge=0)


class Profile(BaseModel):
    """A calibrated cost-model profile (the JSON file's schema)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    gpu: str
    tp: int = Field(ge=1)
    coefficients: CoefficientsModel
    #: The model's shape (:class:`scheduler.hardware.ModelSpec`'s fields), so a
    #: profile of a model outside the catalogue says what it was fitted for.
    model_description: dict[str, Any] | None = None
    #: The device's figures (:class:`scheduler.hardware.GpuSpec`'s fields), likewise.
    device_description: dict[str, Any] | None = None
    #: Per row kind (``ttft``, ``prefill``, ``mixed``, ``decode``); kinds without data are absent.
    fit: dict[str, FitQuality] = Field(default_factory=dict)
    #: Where the measurements came from (engine, version, date, command).
    source: str = ""
    #: What the data could not determine and kept its first-principles value, and why.
    notes: list[str] = Field(default_factory=list)
    #: Coefficients the fit did not determine (they keep the model and GPU's values).
    unfitted: list[str] = Field(default_factory=list)


def save_profile(profile: Profile, path: str | Path) -> None:
    """Write ``profile`` as indented JSON."""
    Path(path).write_text(profile.model_dump_json(indent=2) + "\n")


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile file.

    Raises:
        ConfigError: missing file, binary or invalid JSON, or a field that is missing,
            unknown or out of range (the message names it, dotted:
            ``coefficients.weight_read_s``).
    """
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read profile: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from exc
    except UnicodeDecodeError:
        raise ConfigError(
            f"{path}: not a profile: the file is not text (expected the JSON of llmsched calibrate)"
        ) from None
    try:
        return Profile.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(top level)"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        got = "" if first["type"] == "missing" else f"; got {first.get('input')!r}"
        raise ConfigError(f"{path}: field {field!r}: {first['msg']}{got}{more}") from exc
