"""Parameters of the geometry computations, importable without torch or scipy (config validation):
checks of the fiber-bundle test, and the intrinsic-dimension settings shared by the reduce and fiber stages."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Corrections of the per-point p-values across tested points. Both are *nominal*: they treat the
#: per-point p-values as uniform under the null, which they are not (see moespec.geometry.fiber_bundle).
CORRECTIONS = ("none", "bonferroni_nominal", "bh_nominal")
#: Earlier names of the corrections, refused with a message naming the new one.
RENAMED_CORRECTIONS = {"bonferroni": "bonferroni_nominal", "bh": "bh_nominal"}


def check_parameters(
    *,
    vol_min: int,
    vol_max: int,
    window: int,
    alpha: float,
    max_strata: int,
    correction: str = "none",
    prefix: str = "",
) -> list[str]:
    """Every problem with a set of test parameters, one line each (empty when valid).

    ``prefix`` is prepended to the parameter names (``"fiber."`` in stage configs).
    """
    problems = []
    if vol_min < 1:
        problems.append(
            f"{prefix}vol_min: must be >= 1 (a ball around a point holds at least one other point), got {vol_min}"
        )
    if vol_max <= vol_min:
        problems.append(f"{prefix}vol_max: must exceed vol_min ({vol_min}), got {vol_max}")
    if window < 1:
        problems.append(f"{prefix}window: must be >= 1, got {window}")
    elif vol_max > vol_min and vol_max - vol_min <= 4 * window:
        problems.append(
            f"{prefix}window: {prefix}vol_max - {prefix}vol_min = {vol_max} - {vol_min} = "
            f"{vol_max - vol_min} must exceed 4 * {prefix}window = {4 * window}: the two windows and "
            "their guard gap need that many radii, otherwise no position can be tested"
        )
    if not 0.0 < alpha < 1.0:
        problems.append(f"{prefix}alpha: must be in (0, 1), got {alpha}")
    if max_strata < 1:
        problems.append(f"{prefix}max_strata: must be >= 1, got {max_strata}")
    if correction in RENAMED_CORRECTIONS:
        problems.append(
            f"{prefix}correction: {correction!r} is now {RENAMED_CORRECTIONS[correction]!r}: the per-point "
            "p-values are not uniform on smooth data, so the correction does not control the error rate "
            "it names; compare rejection rates with the null calibration instead"
        )
    elif correction not in CORRECTIONS:
        problems.append(f"{prefix}correction: must be one of {CORRECTIONS}, got {correction!r}")
    return problems


#: Flat stage-config keys of the intrinsic-dimension settings, still accepted, and their sub-section names.
LEGACY_ID_KEYS = {
    "id_threshold": "threshold",
    "mle_k": "mle_k",
    "twonn_discard_fraction": "twonn_discard_fraction",
    "id_max_points": "max_points",
}


class IntrinsicDimensionConfig(BaseModel):
    """Settings of the intrinsic-dimension estimates, shared by the reduce and fiber stages.

    Attributes
    ----------
    threshold : float in (0, 1]
        Variance share of the ``pca_count`` estimator.
    mle_k : int
        Neighbours of the Levina-Bickel estimator (Levina & Bickel 2004).
    twonn_discard_fraction : float in [0, 1)
        Largest neighbour ratios discarded by TwoNN (Facco et al. 2017).
    max_points : int, optional
        Neighbour-based estimates use at most this many seeded random rows of each point set; None =
        all (the exact neighbour search is O(n^2)).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float = Field(0.75, gt=0.0, le=1.0)
    mle_k: int = Field(20, ge=2)
    twonn_discard_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    max_points: Optional[int] = Field(10000, ge=3)

    @model_validator(mode="after")
    def _enough_points(self) -> "IntrinsicDimensionConfig":
        if self.max_points is not None and self.max_points <= self.mle_k:
            raise ValueError(f"max_points = {self.max_points} must exceed mle_k = {self.mle_k}")
        return self


def nest_legacy_id_keys(data: Any) -> Any:
    """Move the flat keys ``id_threshold``, ``mle_k``, ``twonn_discard_fraction`` and ``id_max_points`` of a
    stage section into its ``intrinsic_dimension`` sub-section (before validation), so older YAML still loads."""
    if not isinstance(data, dict) or not set(data) & set(LEGACY_ID_KEYS):
        return data
    data = dict(data)
    section = data.get("intrinsic_dimension") or {}
    if not isinstance(section, dict):
        return data  # not a mapping: let validation report it
    section = dict(section)
    for flat, nested in LEGACY_ID_KEYS.items():
        if flat in data:
            if nested in section:
                raise ValueError(
                    f"{flat} and intrinsic_dimension.{nested} are both set; keep only intrinsic_dimension.{nested}"
                )
            section[nested] = data.pop(flat)
    data["intrinsic_dimension"] = section
    return data
