"""How sure a prediction is: the same run with every step cost scaled down and up.

Near saturation a simulated latency is very sensitive to the cost model: a
few percent more per step can double a TTFT quantile. A run with a *band*
(``RunSpec.band``, ``llmsched simulate --band``) is simulated three times: as
given, with every engine step's duration multiplied by ``1 - band``, and by
``1 + band``. Its summary then carries, beside each figure of
:data:`BAND_KEYS`, ``<key>_lo`` (from the run with costs scaled down) and
``<key>_hi`` (scaled up), and the two factors as ``band_cost_scale_lo`` and
``band_cost_scale_hi``: what the reports (:mod:`sim.report.tables`) show as
ranges and shaded areas.

The natural band is the calibration's own error: :func:`profile_error` reads
a profile's fit quality and pools the rms relative error of its row kinds.

What is scaled: every coefficient of the cost model that makes up a step's
duration (:func:`scaled_cost`), so each prefill, decode and mixed step takes
exactly ``factor`` times as long. What is not: the per-request overhead outside
the steps, the KV transfer between instances, and the cost model the policy
sees (a router deployed with the profile would see the profile's, whatever
the engine really does).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from scheduler.cost_model import CostModel
from scheduler.profile import load_profile
from traces.errors import ConfigError

__all__ = [
    "BAND_KEYS",
    "PROFILE",
    "Band",
    "Summarized",
    "band_factors",
    "check_band",
    "profile_error",
    "resolve_band",
    "scaled_cost",
]

#: Summary figures that get a band: latency distributions, SLO attainment and rates.
BAND_KEYS: tuple[str, ...] = (
    *(
        f"{metric}_{stat}_s"
        for metric in ("ttft", "tpot", "e2e", "queue_delay")
        for stat in ("mean", "p50", "p90", "p99")
    ),
    "slo_attainment",
    "goodput_rps",
    "throughput_rps",
)

#: Coefficients that are not part of any engine step (:class:`Coefficients`), kept as they are.
_NOT_STEP_TERMS = frozenset({"request_overhead_s"})

#: What ``band`` may say instead of a number: the profile's fit error.
PROFILE = "profile"


def check_band(value: float) -> float:
    """``value`` if it is a relative error a band can use (0 <= value < 1).

    Raises:
        ValueError: anything else, saying what was expected.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"expected a relative error such as 0.05 (for ±5%); got {value!r}")
    if not 0 <= value < 1:
        raise ValueError(
            f"expected a relative error from 0 up to (not including) 1, "
            f"such as 0.05 for ±5%; got {value:g}"
        )
    return float(value)


def profile_error(path: str | Path) -> float:
    """The rms relative error of a profile's fit, pooled over its row kinds by points.

    ``sqrt(sum(points * rms**2) / sum(points))`` over the kinds of
    ``profile.fit`` (``ttft``, ``prefill``, ``mixed``, ``decode``): the rms
    relative error of every measured point the fit saw.

    Raises:
        ConfigError: an unreadable profile, or one that records no fit error.
    """
    fits = load_profile(path).fit.values()
    points = sum(f.points for f in fits)
    if not fits or points == 0:
        raise ConfigError(
            f"{path}: the profile records no fit error (its 'fit' has no measured points), "
            "so a band cannot default to it; give the band as a number (0.05 for ±5%)"
        )
    return math.sqrt(sum(f.points * f.rms_rel_error**2 for f in fits) / points)


def resolve_band(band: float | str | None, profile: str | Path | None) -> float | None:
    """The band's relative error: ``band`` itself, or for ``"profile"`` the profile's fit error.

    Raises:
        ValueError: ``"profile"`` with no profile, or a value that is no relative error.
        ConfigError: a profile that cannot be read or records no fit error.
    """
    if band is None:
        return None
    if band == PROFILE:
        if profile is None:
            raise ValueError(
                "the default band is a calibration profile's fit error, and no profile is "
                "given; give the band as a number (0.05 for ±5%)"
            )
        return profile_error(profile)
    if isinstance(band, str):
        raise ValueError(
            f"expected a relative error such as 0.05, or {PROFILE!r} for the profile's "
            f"fit error; got {band!r}"
        )
    return check_band(band)


def band_factors(rel: float) -> tuple[float, float]:
    """The step-cost factors of a band: ``1 - rel`` and ``1 + rel`` (to 12 places, so 0.07
    gives 0.93, not 0.9299999999999999)."""
    return round(1.0 - rel, 12), round(1.0 + rel, 12)


def scaled_cost(cost: CostModel, factor: float) -> CostModel:
    """``cost`` with every step's duration multiplied by ``factor`` (> 0).

    Each step time is a sum and maximum of coefficient-weighted terms, so
    scaling every step coefficient scales every step exactly; the per-request
    overhead and the KV link are kept.
    """
    if not factor > 0:
        raise ValueError(f"expected a step-cost factor > 0; got {factor!r}")
    k = cost.coefficients
    scaled = {
        f.name: getattr(k, f.name) * factor
        for f in dataclasses.fields(k)
        if f.name not in _NOT_STEP_TERMS
    }
    return CostModel(
        cost.model,
        cost.gpu,
        cost.tp,
        coefficients=dataclasses.replace(k, **scaled),
        efficiency=cost.efficiency,
        kv_link=cost.kv_link_bandwidth_Bps,
    )


class Summarized(Protocol):
    """A run's result as a band reads it (:class:`sim.metrics.SimResult`)."""

    def summary(
        self, slo_ttft_s: float | None = None, slo_tpot_s: float | None = None
    ) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Band:
    """A run's band: its results with step costs scaled down (``lo``) and up (``hi``)."""

    #: The relative error: costs were scaled by ``1 - rel`` and ``1 + rel``.
    rel: float
    lo: Summarized
    hi: Summarized

    @property
    def scale_lo(self) -> float:
        """The factor of the lower end's step costs."""
        return band_factors(self.rel)[0]

    @property
    def scale_hi(self) -> float:
        """The factor of the upper end's step costs."""
        return band_factors(self.rel)[1]

    def summary(self, slo_ttft_s: float | None, slo_tpot_s: float | None) -> dict[str, Any]:
        """``<key>_lo``, ``<key>_hi`` of each of :data:`BAND_KEYS`, and the two factors."""
        out: dict[str, Any] = {
            "band_cost_scale_lo": self.scale_lo,
            "band_cost_scale_hi": self.scale_hi,
        }
        for end, result in (("lo", self.lo), ("hi", self.hi)):
            figures = result.summary(slo_ttft_s, slo_tpot_s)
            out |= {f"{key}_{end}": figures[key] for key in BAND_KEYS if key in figures}
        return out
