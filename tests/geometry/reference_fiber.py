"""A literal, slow transcription of the authors' per-point algorithm, used as a test oracle.

It follows ``stratification_test`` and ``estimate_stratifications`` of ``kb1dds/stratified_estimator``
(``split_geo_estimator.py``, with the slope filter of its later copies: non-finite and ``|delta| <= 1e-5``
slopes are dropped), one point and one window at a time with ``scipy.stats.ttest_ind``. The only
changes: the zero-radius cut is relative to the point's largest radius, and the tail segment after
the last change is also fitted.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.stats


def first_change(radii, volumes, ws, level):
    dimvec = np.gradient(np.log(volumes)) / np.gradient(np.log(radii))
    for w in range(2 * ws, dimvec.shape[0] - 2 * ws):
        t1 = dimvec[w - 2 * ws : w - ws]
        t2 = dimvec[w + ws : w + 2 * ws]
        t1 = t1[np.isfinite(t1) & (np.abs(t1) > 1e-5)]
        t2 = t2[np.isfinite(t2) & (np.abs(t2) > 1e-5)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p = scipy.stats.ttest_ind(t1, t2, equal_var=False).pvalue
        if p < level:
            return w, float(p)
    return None, 1.0


def slope(radii, volumes):
    design = np.column_stack((np.ones_like(radii), np.log(radii)))
    return float(np.linalg.lstsq(design, np.log(volumes), rcond=None)[0][1])


def estimate_point(sorted_dists_with_self, vol_min, vol_max, ws, alpha, nstrat):
    """``sorted_dists_with_self[0]`` is the point itself (0). Returns changes (volume, p) and dims."""
    radii = np.asarray(sorted_dists_with_self[vol_min:vol_max], dtype=np.float64)
    volumes = np.arange(vol_min, vol_max, dtype=np.float64)
    lo = int(np.argmax(radii > 1e-10 * radii[-1])) if radii[-1] > 0 else len(radii)
    changes, dims = [], []
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(nstrat):
            c, p = first_change(radii[lo:], volumes[lo:], ws, alpha / nstrat)
            hi = len(radii) if c is None else lo + c
            dims.append(slope(radii[lo:hi], volumes[lo:hi]))
            if c is None:
                break
            changes.append((vol_min + lo + c, p))
            lo += c
        else:
            dims.append(slope(radii[lo:], volumes[lo:]))
    return changes, dims
