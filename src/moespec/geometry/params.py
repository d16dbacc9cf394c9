"""Parameter checks of the fiber-bundle test, importable without torch or scipy (config validation)."""

from __future__ import annotations

#: Corrections of the per-point p-values across tested points.
CORRECTIONS = ("none", "bonferroni", "bh")


def check_parameters(*, vol_min: int, vol_max: int, window: int, alpha: float, max_strata: int,
                     correction: str = "none", prefix: str = "") -> list[str]:
    """Every problem with a set of test parameters, one line each (empty when valid).

    ``prefix`` is prepended to the parameter names (``"fiber."`` in stage configs).
    """
    problems = []
    if vol_min < 1:
        problems.append(f"{prefix}vol_min: must be >= 1 (a ball around a point holds at least one other "
                        f"point), got {vol_min}")
    if vol_max <= vol_min:
        problems.append(f"{prefix}vol_max: must exceed vol_min ({vol_min}), got {vol_max}")
    if window < 1:
        problems.append(f"{prefix}window: must be >= 1, got {window}")
    elif vol_max > vol_min and vol_max - vol_min <= 4 * window:
        problems.append(f"{prefix}window: {prefix}vol_max - {prefix}vol_min = {vol_max} - {vol_min} = "
                        f"{vol_max - vol_min} must exceed 4 * {prefix}window = {4 * window}: the two windows and "
                        "their guard gap need that many radii, otherwise no position can be tested")
    if not 0.0 < alpha < 1.0:
        problems.append(f"{prefix}alpha: must be in (0, 1), got {alpha}")
    if max_strata < 1:
        problems.append(f"{prefix}max_strata: must be >= 1, got {max_strata}")
    if correction not in CORRECTIONS:
        problems.append(f"{prefix}correction: must be one of {CORRECTIONS}, got {correction!r}")
    return problems
