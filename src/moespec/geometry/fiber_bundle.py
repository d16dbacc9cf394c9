"""The manifold / fiber-bundle hypothesis test of Robinson, Dey & Chiang (arXiv:2504.01002).

For each tested point, the radius ``r_V`` of the smallest ball around it holding ``V`` other points,
``V = vol_min .. vol_max - 1``, gives log V against log r. On a manifold the curve is a line whose
slope is the dimension; Theorem 1 of the paper says that on a fiber bundle the slope can only
*decrease* as r grows. The test follows the authors' reference code (``kb1dds/stratified_estimator``,
``split_geo_estimator.py``: ``stratification_test`` and ``estimate_stratifications``):

1. local slopes ``delta = gradient(log V) / gradient(log r)`` (centred differences, one-sided at
   the ends); entries that are not finite (tied radii) or ``|delta| <= 1e-5`` are left out;
2. at each position ``w`` a two-sided Welch t-test compares ``delta[w-2ws : w-ws]`` with
   ``delta[w+ws : w+2ws]`` (two windows of ``ws`` slopes with a guard gap of ``2 ws``); the first
   ``w`` with ``p < alpha / max_strata`` is a change, and the search restarts from it, at most
   ``max_strata`` times;
3. each segment between changes gets its dimension, the least-squares slope of log V on log r.

A point rejects the manifold null when it has a change, the fiber-bundle null at small radius when
its first change is an increase of dimension and at large radius when its second change is one.
Radii at or below ``1e-10`` times the point's largest radius (exact duplicates) are skipped, as the
reference skips ``r <= 1e-10``; the relative cut keeps the test invariant to scale. Radii within a
relative ``TIE_TOLERANCE`` (1e-9) of the radius before them are tied: they are set equal to it, so
that radii a few ulps apart (the same distance summed in another order) give the same decisions
as exact ties (whose infinite slopes the windows drop) instead of huge finite slopes.

Per-point p-value: ``max_strata * min_w p_w`` over the first search, clipped to 1. It is below
``alpha`` exactly when the search finds a change, so it carries the manifold decision. As in the
paper, the looks along one point's radii are not corrected (the authors dropped that Bonferroni
factor as far too strict for such correlated tests), so this p-value is far from uniform on smooth
data: P(p < 1e-3) is about 0.03, and the rejection rate sits well above alpha. Compare rates with
:func:`null_calibration`, never with alpha. The corrections across points, ``"bonferroni_nominal"``
and ``"bh_nominal"``, apply Bonferroni and Benjamini-Hochberg to these p-values as if they were
uniform; they are therefore *nominal* and do not control the family-wise error or false-discovery
rate they name (nominal Bonferroni at alpha = 1e-3 rejected at least one point of a smooth null data
set in 17-37 % of data sets). They only make the test stricter.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from scipy import special

from moespec.errors import ConfigError, DataError
from moespec.geometry.knn import check_finite_rows, knn_distances
from moespec.geometry.params import check_parameters

#: Radii at or below this fraction of the point's largest radius count as zero (duplicates).
_ZERO_RADIUS = 1e-10
#: A radius within this fraction of the radius before it is tied with it (set equal to it).
TIE_TOLERANCE = 1e-9
#: Slopes with |delta| at or below this are dropped from the windows (as in the reference code).
_MIN_SLOPE = 1e-5
#: float64 elements of one block of window statistics.
_WINDOW_BLOCK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------------------
# result


@dataclass
class FiberBundleResult:
    """Per-point outcome of :func:`fiber_bundle_test` (arrays of length ``n_tested``).

    Attributes
    ----------
    point_index : ndarray of int64, shape (n_tested,)
        Row of each tested point in the input.
    testable : ndarray of bool, shape (n_tested,)
        False when, after skipping zero radii (duplicates), no window position is left, or when all
        the remaining radii are equal (neighbours that are copies of one point).
    pvalue : ndarray of float64, shape (n_tested,)
        ``max_strata`` times the smallest window p-value of the first search, clipped to 1
        (1 for untestable points).
    pvalue_adjusted : ndarray of float64, shape (n_tested,)
        ``pvalue`` after the correction across points (equal to it for ``"none"``).
    n_changes : ndarray of int64, shape (n_tested,)
    change_radius, change_pvalue : ndarray of float64, shape (n_tested, max_strata)
        Radius of each detected change and the Welch p-value of its window; NaN where absent.
    change_volume : ndarray of int64, shape (n_tested, max_strata)
        Neighbour count V at each change; -1 where absent.
    segment_dimension, segment_start_radius : ndarray of float64, shape (n_tested, max_strata + 1)
        Slope of log V on log r on each segment, and the radius where it starts; NaN where absent.
    dimension_small, dimension_large : ndarray of float64, shape (n_tested,)
        The first segment's slope (dim T in the paper) and the second's (dim S; the first's when
        there is no change). NaN for untestable points.
    reject_manifold, reject_fiber_small, reject_fiber_large, reject_fiber : ndarray of bool
        Rejections of the manifold null (a change), of the fiber-bundle null at small radius (first
        change is an increase), at large radius (second change is an increase), and either.
    vol_min, vol_max, window, alpha, max_strata, correction
        The parameters.
    threshold : float
        Level the per-point p-values were compared with after the correction across points.
    """

    point_index: np.ndarray
    testable: np.ndarray
    pvalue: np.ndarray
    pvalue_adjusted: np.ndarray
    n_changes: np.ndarray
    change_radius: np.ndarray
    change_pvalue: np.ndarray
    change_volume: np.ndarray
    segment_dimension: np.ndarray
    segment_start_radius: np.ndarray
    dimension_small: np.ndarray
    dimension_large: np.ndarray
    reject_manifold: np.ndarray
    reject_fiber_small: np.ndarray
    reject_fiber_large: np.ndarray
    reject_fiber: np.ndarray
    vol_min: int
    vol_max: int
    window: int
    alpha: float
    max_strata: int
    correction: str
    threshold: float

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-point arrays by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), np.ndarray)}

    def summary(self) -> dict[str, float | int]:
        """Rejection rates over testable points (``<rate>``) and over all tested points, an untestable
        point counting as not rejected (``<rate>_all_points``, the paper's denominator: all tokens),
        and quartiles of the local dimensions."""
        testable = self.testable
        n_testable = int(testable.sum())
        out: dict[str, float | int] = {"n_tested": len(testable), "n_testable": n_testable}
        for name, rejected in _rejections(self).items():
            out[name] = float(rejected[testable].mean()) if n_testable else float("nan")
            out[f"{name}_all_points"] = float(rejected.mean()) if len(rejected) else float("nan")
        for name in ("dimension_small", "dimension_large"):
            values = getattr(self, name)[testable]
            quartiles = np.quantile(values, [0.25, 0.5, 0.75]) if n_testable else [np.nan] * 3
            out.update(
                {
                    f"{name}_q1": float(quartiles[0]),
                    f"{name}_median": float(quartiles[1]),
                    f"{name}_q3": float(quartiles[2]),
                }
            )
        out["threshold"] = self.threshold
        return out

    def group_rates(self, groups, n_groups: int) -> dict[str, np.ndarray]:
        """Rejection rates per group (domain, stratum) of the tested points.

        Parameters
        ----------
        groups : array_like of int, shape (n_tested,)
            Group code of each tested point, in ``0 .. n_groups - 1``.
        n_groups : int

        Returns
        -------
        dict of str to ndarray of shape (n_groups,)
            ``n_testable`` per group and each rejection rate (NaN for a group with no testable point).
        """
        groups = np.asarray(groups)[self.testable]
        counts = np.bincount(groups, minlength=n_groups).astype(np.int64)
        out: dict[str, np.ndarray] = {"n_testable": counts}
        with np.errstate(invalid="ignore", divide="ignore"):
            for name, rejected in _rejections(self).items():
                hits = np.bincount(groups, weights=rejected[self.testable], minlength=n_groups)
                out[name] = np.where(counts > 0, hits / counts, np.nan)
        return out


def _rejections(result: FiberBundleResult) -> dict[str, np.ndarray]:
    return {
        "rejection_rate": result.reject_manifold,
        "fiber_rejection_rate": result.reject_fiber,
        "fiber_small_rejection_rate": result.reject_fiber_small,
        "fiber_large_rejection_rate": result.reject_fiber_large,
    }


# --------------------------------------------------------------------------------------------------
# public entry points


def fiber_bundle_test(
    X,
    *,
    vol_min: int = 10,
    vol_max: int = 100,
    window: int = 10,
    alpha: float = 1e-3,
    max_strata: int = 2,
    correction: str = "none",
    points=None,
    device: str | None = None,
    block_size: int | None = None,
) -> FiberBundleResult:
    """Run the manifold and fiber-bundle tests on the rows of ``X``.

    Parameters
    ----------
    X : array_like of shape (n_samples, n_features)
        The point cloud. Neighbours of every tested point are searched among all rows.
    vol_min, vol_max : int
        Neighbour counts V tested: ``vol_min .. vol_max - 1`` (the reference's half-open range).
    window : int
        Slopes per window of the Welch test (``ws`` in the reference); ``vol_max - vol_min`` must
        exceed ``4 * window``.
    alpha : float
        Significance level (1e-3 in the paper), split over ``max_strata`` changes.
    max_strata : int
        Maximum number of changes searched per point (``nstrat``; 2 as in the paper's Table 1, which
        reports a small- and a large-radius change; the reference CLI's default is 3).
    correction : {"none", "bonferroni_nominal", "bh_nominal"}
        Correction of the per-point p-values across the tested points; nominal only (see the module
        docstring): it makes the test stricter but controls no error rate.
    points : array_like of int, optional
        Rows to test (default: all).
    device : str, optional
        Torch device of the neighbour search.
    block_size : int, optional
        Queries per block of the neighbour search.

    Returns
    -------
    FiberBundleResult
    """
    problems = check_parameters(
        vol_min=vol_min, vol_max=vol_max, window=window, alpha=alpha, max_strata=max_strata, correction=correction
    )
    if problems:
        raise ConfigError(problems)
    X = np.asarray(X)
    if X.ndim != 2:
        raise DataError(f"X must be 2-D (n_samples, n_features), got shape {X.shape}")
    if X.shape[0] < vol_max + 1:
        raise DataError(
            f"the fiber-bundle test with vol_max = {vol_max} needs at least vol_max + 1 = "
            f"{vol_max + 1} points, got {X.shape[0]}"
        )
    check_finite_rows(X)
    rows = np.arange(len(X)) if points is None else np.asarray(points, dtype=np.int64)
    distances, _ = knn_distances(X, vol_max - 1, queries=rows, device=device, block_size=block_size)
    return fiber_bundle_test_from_radii(
        distances,
        vol_min=vol_min,
        vol_max=vol_max,
        window=window,
        alpha=alpha,
        max_strata=max_strata,
        correction=correction,
        point_index=rows,
    )


def fiber_bundle_test_from_radii(
    distances,
    *,
    vol_min: int = 10,
    vol_max: int = 100,
    window: int = 10,
    alpha: float = 1e-3,
    max_strata: int = 2,
    correction: str = "none",
    point_index=None,
) -> FiberBundleResult:
    """The test on precomputed neighbour distances.

    Parameters
    ----------
    distances : array_like of shape (n_tested, >= vol_max - 1)
        Sorted distances of each tested point to its nearest other points (self excluded): column
        ``j`` is the radius of the ball holding ``V = j + 1`` other points.
    point_index : array_like of int, optional
        Stored in the result (default ``arange(n_tested)``).
    Other parameters are those of :func:`fiber_bundle_test`.

    Returns
    -------
    FiberBundleResult
    """
    problems = check_parameters(
        vol_min=vol_min, vol_max=vol_max, window=window, alpha=alpha, max_strata=max_strata, correction=correction
    )
    distances = np.asarray(distances, dtype=np.float64)
    if distances.ndim != 2 or distances.shape[1] < vol_max - 1:
        problems.append(f"distances: need shape (n_tested, >= vol_max - 1 = {vol_max - 1}), got {distances.shape}")
    if problems:
        raise ConfigError(problems)
    radii = snap_ties(distances[:, vol_min - 1 : vol_max - 1])
    log_volume = np.log(np.arange(vol_min, vol_max, dtype=np.float64))
    start = (radii <= _ZERO_RADIUS * radii[:, -1:]).sum(axis=1)  # zero radii form a prefix (sorted)
    testable = _testable(radii, start, window)
    pvalue = _first_search_pvalues(radii, log_volume, start, testable, window, max_strata)
    adjusted, threshold = _correct(pvalue, testable, alpha, correction)
    segments = _segment_all(radii, log_volume, start, testable & (pvalue < threshold), window, threshold, max_strata)
    rows = np.arange(len(radii)) if point_index is None else np.asarray(point_index, dtype=np.int64)
    return _assemble(
        rows,
        testable,
        pvalue,
        adjusted,
        threshold,
        radii,
        log_volume,
        start,
        segments,
        dict(
            vol_min=vol_min, vol_max=vol_max, window=window, alpha=alpha, max_strata=max_strata, correction=correction
        ),
    )


def snap_ties(radii: np.ndarray, tolerance: float = TIE_TOLERANCE) -> np.ndarray:
    """Sorted radii with every radius within ``tolerance`` (relative) of the one before it set equal to it.

    Parameters
    ----------
    radii : ndarray of shape (n_points, n_radii)
        Each row sorted ascending.
    tolerance : float

    Returns
    -------
    ndarray of shape (n_points, n_radii)
        Each run of radii whose successive gaps are at most ``tolerance`` times the radius takes
        the run's first value.
    """
    columns = np.arange(radii.shape[1])
    starts = np.ones(radii.shape, dtype=bool)
    starts[:, 1:] = np.diff(radii, axis=1) > tolerance * radii[:, 1:]
    first = np.maximum.accumulate(np.where(starts, columns, 0), axis=1)
    return np.take_along_axis(radii, first, axis=1)


def _testable(radii: np.ndarray, start: np.ndarray, window: int) -> np.ndarray:
    """Points with more than ``4 window`` nonzero radii that are not all equal.

    Equal radii (a point whose neighbours are copies of one point) carry no scale: every slope is
    infinite and the dimension undefined, so such a point is reported untestable rather than NaN.
    """
    n = radii.shape[1]
    enough = n - start > 4 * window
    first = radii[np.arange(len(radii)), np.minimum(start, n - 1)]
    return enough & (radii[:, -1] > first * (1.0 + 1e-12))


# --------------------------------------------------------------------------------------------------
# the sliding Welch test


def local_slopes(log_radius: np.ndarray, log_volume: np.ndarray) -> np.ndarray:
    """``gradient(log V) / gradient(log r)`` along the last axis (inf/NaN where radii tie)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.gradient(log_volume, axis=-1) / np.gradient(log_radius, axis=-1)


def window_pvalues(slopes: np.ndarray, window: int) -> np.ndarray:
    """Welch two-sided p-values of every test position of the reference's sliding test.

    Parameters
    ----------
    slopes : ndarray of shape (n_points, n)
        Local slopes; non-finite entries and ``|slope| <= 1e-5`` are left out of the windows.
    window : int
        ``ws``; position ``w`` (``2 ws <= w < n - 2 ws``) compares ``slopes[w-2ws : w-ws]`` with
        ``slopes[w+ws : w+2ws]``.

    Returns
    -------
    ndarray of shape (n_points, n - 4 ws)
        Column ``j`` is position ``w = 2 ws + j``. Undefined tests (fewer than two slopes in a
        window, or both windows constant and equal) get p = 1, as ``p < alpha`` is False for the
        NaN that scipy returns there.
    """
    n_points, n = slopes.shape
    rows_per_block = max(1, _WINDOW_BLOCK_ELEMENTS // max(n * window, 1))
    out = np.empty((n_points, n - 4 * window))
    for s in range(0, n_points, rows_per_block):
        count, mean, var = _window_moments(slopes[s : s + rows_per_block], window)
        left = slice(0, n - 4 * window)  # windows starting at w - 2 ws
        right = slice(3 * window, n - window)  # windows starting at w + ws
        out[s : s + rows_per_block] = _welch_pvalue(
            count[:, left], mean[:, left], var[:, left], count[:, right], mean[:, right], var[:, right]
        )
    return out


def _window_moments(slopes: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Count, mean and sample variance of the kept slopes in every window of ``window`` entries."""
    keep = np.isfinite(slopes) & (np.abs(slopes) > _MIN_SLOPE)
    values = np.where(keep, slopes, 0.0)
    windows = np.lib.stride_tricks.sliding_window_view(values, window, axis=1)  # (m, n-ws+1, ws)
    kept = np.lib.stride_tricks.sliding_window_view(keep, window, axis=1)
    count = kept.sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = windows.sum(axis=2) / count
        # Two-pass variance (not sum-of-squares) so that near-constant slopes keep their precision.
        deviation = np.where(kept, windows - mean[..., None], 0.0)
        var = (deviation * deviation).sum(axis=2) / (count - 1)
    return count, mean, var


def _welch_pvalue(n1, m1, v1, n2, m2, v2) -> np.ndarray:
    """Two-sided Welch t-test p-values, elementwise (scipy's ``ttest_ind(equal_var=False)``)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        s1, s2 = v1 / n1, v2 / n2
        se2 = s1 + s2
        t = (m1 - m2) / np.sqrt(se2)
        df = se2 * se2 / (s1 * s1 / (n1 - 1) + s2 * s2 / (n2 - 1))
        p = 2.0 * special.stdtr(df, -np.abs(t))
    # scipy returns p = 0 for two constant windows with different means (t = +-inf).
    p = np.where((se2 == 0) & (m1 != m2) & (n1 >= 2) & (n2 >= 2), 0.0, p)
    return np.where(np.isfinite(p), p, 1.0)


def _first_search_pvalues(radii, log_volume, start, testable, window, max_strata) -> np.ndarray:
    """``max_strata`` times the smallest window p-value from each point's first valid radius."""
    pvalue = np.ones(len(radii))
    for offset in np.unique(start[testable]):
        rows = np.flatnonzero(testable & (start == offset))
        slopes = local_slopes(np.log(radii[rows, offset:]), log_volume[offset:])
        pvalue[rows] = np.minimum(1.0, max_strata * window_pvalues(slopes, window).min(axis=1))
    return pvalue


def _correct(pvalue, testable, alpha, correction) -> tuple[np.ndarray, float]:
    """Adjusted p-values and the level the raw p-values are compared with (``p < threshold``)."""
    tested = pvalue[testable]
    m = len(tested)
    adjusted = pvalue.copy()
    if correction == "none" or m == 0:
        return adjusted, alpha
    if correction == "bonferroni_nominal":
        adjusted[testable] = np.minimum(1.0, tested * m)
        return adjusted, alpha / m
    order = np.argsort(tested)
    ranked = tested[order] * m / np.arange(1, m + 1)
    qvalues = np.empty(m)
    qvalues[order] = np.minimum(1.0, np.minimum.accumulate(ranked[::-1])[::-1])
    adjusted[testable] = qvalues
    rejected = qvalues < alpha
    # Rejecting q < alpha means rejecting every raw p up to the largest rejected one.
    threshold = float(np.nextafter(tested[rejected].max(), np.inf)) if rejected.any() else 0.0
    return adjusted, threshold


# --------------------------------------------------------------------------------------------------
# segmentation of the points that have a change


def _first_change(log_radius, log_volume, window, threshold, max_strata) -> tuple[int | None, float]:
    """First position whose window p-value is below ``threshold / max_strata`` (the reference
    ``stratification_test``), compared as ``max_strata * p < threshold`` like the per-point p-value."""
    if len(log_radius) <= 4 * window:
        return None, 1.0
    pvalues = window_pvalues(local_slopes(log_radius, log_volume)[None, :], window)[0]
    hits = np.flatnonzero(np.minimum(1.0, max_strata * pvalues) < threshold)
    if hits.size == 0:
        return None, 1.0
    return 2 * window + int(hits[0]), float(pvalues[hits[0]])


def _segment_point(log_radius, log_volume, start, window, threshold, max_strata) -> list[tuple[int, float]]:
    """Changes ``(index, p)`` of one point: the reference ``estimate_stratifications`` loop."""
    changes: list[tuple[int, float]] = []
    lo = start
    for _ in range(max_strata):
        position, p = _first_change(log_radius[lo:], log_volume[lo:], window, threshold, max_strata)
        if position is None:
            break
        lo += position
        changes.append((lo, p))
    return changes


def _segment_all(radii, log_volume, start, has_change, window, threshold, max_strata) -> dict[int, list]:
    log_radius = np.log(np.where(radii > 0, radii, 1.0))  # zero radii lie before `start`, never read
    return {
        int(i): _segment_point(log_radius[i], log_volume, start[i], window, threshold, max_strata)
        for i in np.flatnonzero(has_change)
    }


def _slopes(log_radius: np.ndarray, log_volume: np.ndarray) -> np.ndarray:
    """Least-squares slopes of log V on log r along the last axis (rows with one radius: NaN)."""
    x = log_radius - log_radius.mean(axis=-1, keepdims=True)
    y = log_volume - log_volume.mean()
    with np.errstate(invalid="ignore", divide="ignore"):
        slopes = (x @ y) / np.einsum("...i,...i->...", x, x)
    return np.where(np.isfinite(slopes), slopes, np.nan)


def _assemble(rows, testable, pvalue, adjusted, threshold, radii, log_volume, start, segments, params):
    n_tested, max_strata = len(radii), params["max_strata"]
    change_radius = np.full((n_tested, max_strata), np.nan)
    change_pvalue = np.full((n_tested, max_strata), np.nan)
    change_volume = np.full((n_tested, max_strata), -1, dtype=np.int64)
    dims = np.full((n_tested, max_strata + 1), np.nan)
    seg_start = np.full((n_tested, max_strata + 1), np.nan)
    n_changes = np.zeros(n_tested, dtype=np.int64)
    log_radius = np.log(np.where(radii > 0, radii, 1.0))
    # Points without a change have one segment from their first nonzero radius: vectorised by start.
    unchanged = testable & ~np.isin(np.arange(n_tested), list(segments))
    for offset in np.unique(start[unchanged]):
        group = np.flatnonzero(unchanged & (start == offset))
        dims[group, 0] = _slopes(log_radius[group, offset:], log_volume[offset:])
        seg_start[group, 0] = radii[group, offset]
    for i, changes in segments.items():
        bounds = [int(start[i]), *(c for c, _ in changes), radii.shape[1]]
        for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            dims[i, s] = _slopes(log_radius[i, lo:hi], log_volume[lo:hi])
            seg_start[i, s] = radii[i, lo]
        for s, (c, p) in enumerate(changes):
            change_radius[i, s], change_pvalue[i, s] = radii[i, c], p
            change_volume[i, s] = params["vol_min"] + c
        n_changes[i] = len(changes)
    small = (n_changes >= 1) & (dims[:, 1] > dims[:, 0])
    large = (n_changes >= 2) & (dims[:, 2] > dims[:, 1]) if max_strata >= 2 else np.zeros(n_tested, bool)
    return FiberBundleResult(
        point_index=rows,
        testable=testable,
        pvalue=pvalue,
        pvalue_adjusted=adjusted,
        n_changes=n_changes,
        change_radius=change_radius,
        change_pvalue=change_pvalue,
        change_volume=change_volume,
        segment_dimension=dims,
        segment_start_radius=seg_start,
        dimension_small=dims[:, 0],
        dimension_large=np.where(n_changes >= 1, dims[:, 1], dims[:, 0]),
        reject_manifold=n_changes >= 1,
        reject_fiber_small=small,
        reject_fiber_large=large,
        reject_fiber=small | large,
        threshold=float(threshold),
        **params,
    )


# --------------------------------------------------------------------------------------------------
# null calibration

NULL_KINDS = ("gaussian", "resample")


def null_sample(X, kind: str = "gaussian", random_state=None) -> np.ndarray:
    """Smooth data matched to ``X``: same number of points, dimension, mean and covariance.

    Parameters
    ----------
    X : array_like of shape (n_samples, n_features)
    kind : {"gaussian", "resample"}
        ``"gaussian"``: a normal sample with the mean and covariance of X (a flat manifold of the
        covariance's rank). ``"resample"``: a smoothed bootstrap - rows drawn with replacement plus
        Gaussian noise of covariance ``h^2 Sigma`` (Silverman's factor
        ``h = (4 / (n (D + 2)))^(1 / (D + 4))``), shrunk by ``1 / sqrt(1 + h^2)`` about the mean so the
        covariance is kept: X's large-scale shape with a smooth (full-dimensional) density.
    random_state : int or numpy.random.Generator, optional

    Returns
    -------
    ndarray of shape (n_samples, n_features), float64
    """
    if kind not in NULL_KINDS:
        raise ConfigError(f"kind: must be one of {NULL_KINDS}, got {kind!r}")
    X = np.asarray(X, dtype=np.float64)
    n_samples, n_features = X.shape
    rng = np.random.default_rng(random_state)
    mean = X.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(X, rowvar=False).reshape(n_features, n_features))
    root = eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))  # Sigma = root @ root.T
    noise = rng.standard_normal((n_samples, n_features)) @ root.T
    if kind == "gaussian":
        return mean + noise
    h = (4.0 / (n_samples * (n_features + 2))) ** (1.0 / (n_features + 4))
    rows = X[rng.integers(0, n_samples, n_samples)]
    return mean + (rows - mean + h * noise) / np.sqrt(1.0 + h * h)


@dataclass
class NullCalibration:
    """Rejection rates of the test on null data matched to the input, one entry per repeat.

    Attributes
    ----------
    kind : str
    rates : dict of str to ndarray of shape (n_repeats,)
        ``rejection_rate``, ``fiber_rejection_rate``, ``fiber_small_rejection_rate`` and
        ``fiber_large_rejection_rate`` of each repeat, over its testable points.
    n_testable : ndarray of int64, shape (n_repeats,)
        Testable points of each repeat.
    """

    kind: str
    rates: dict
    n_testable: np.ndarray

    def summary(self) -> dict[str, float]:
        """Mean and sample standard deviation (NaN for one repeat) of each rate over repeats:
        ``null_<rate>`` and ``null_<rate>_std``."""
        out = {}
        for name, values in self.rates.items():
            out[f"null_{name}"] = float(np.mean(values))
            out[f"null_{name}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
        return out

    def compare(self, result: FiberBundleResult) -> dict[str, float]:
        """One-sided tests that the observed rates exceed the null's.

        For each rate: ``<rate>_null_t`` and ``<rate>_null_pvalue``, the prediction t-test of the
        observed rate against the repeats (``t = (r - mean) / (sd sqrt(1 + 1/R))`` with ``R - 1``
        degrees of freedom; it uses the spread between null data sets, so the dependence between
        neighbouring points is accounted for; NaN with fewer than 2 repeats or no spread), and
        ``<rate>_null_fisher_pvalue``, Fisher's exact test of the observed count of rejected
        testable points against the pooled null counts, which treats points as independent and so
        is too liberal when neighbourhoods overlap.
        """
        from scipy import stats

        observed = result.summary()
        n_observed = observed["n_testable"]
        out = {}
        for name, values in self.rates.items():
            repeats = len(values)
            spread = np.std(values, ddof=1) if repeats > 1 else 0.0
            t = (observed[name] - np.mean(values)) / (spread * np.sqrt(1 + 1 / repeats)) if spread > 0 else np.nan
            out[f"{name}_null_t"] = float(t)
            out[f"{name}_null_pvalue"] = float(stats.t.sf(t, repeats - 1)) if np.isfinite(t) else float("nan")
            hits_null = int(np.round(np.sum(values * self.n_testable)))
            hits = int(round(observed[name] * n_observed)) if n_observed else 0
            table = [[hits, n_observed - hits], [hits_null, int(self.n_testable.sum()) - hits_null]]
            out[f"{name}_null_fisher_pvalue"] = (
                float(stats.fisher_exact(table, alternative="greater")[1])
                if n_observed and self.n_testable.sum()
                else float("nan")
            )
        return out


def null_calibration(
    X,
    *,
    kind: str = "gaussian",
    n_repeats: int = 3,
    n_points: int | None = None,
    random_state=None,
    device: str | None = None,
    **test_params,
) -> NullCalibration:
    """The test's false-alarm rates on smooth data matched to ``X`` (see :func:`null_sample`).

    Parameters
    ----------
    X : array_like of shape (n_samples, n_features)
    kind : {"gaussian", "resample"}
    n_repeats : int, default=3
        Independent null samples; their spread is what :meth:`NullCalibration.compare` tests against.
    n_points : int, optional
        Test this many random points of each null sample (all when omitted), to match a subsampled
        test of the input.
    random_state : int or numpy.random.Generator, optional
    device : str, optional
    **test_params
        ``vol_min``, ``vol_max``, ``window``, ``alpha``, ``max_strata``, ``correction``: as the test
        of the input.

    Returns
    -------
    NullCalibration
    """
    if n_repeats < 1:
        raise ConfigError(f"n_repeats: must be >= 1, got {n_repeats}")
    rng = np.random.default_rng(random_state)
    rates: dict[str, list[float]] = {}
    n_testable = []
    for _ in range(n_repeats):
        sample = null_sample(X, kind, rng)
        points = None
        if n_points is not None and n_points < len(sample):
            points = np.sort(rng.choice(len(sample), n_points, replace=False))
        summary = fiber_bundle_test(sample, points=points, device=device, **test_params).summary()
        n_testable.append(summary["n_testable"])
        for name in _REJECTION_RATES:
            rates.setdefault(name, []).append(summary[name])
    return NullCalibration(
        kind=kind,
        rates={name: np.asarray(v) for name, v in rates.items()},
        n_testable=np.asarray(n_testable, dtype=np.int64),
    )


_REJECTION_RATES = (
    "rejection_rate",
    "fiber_rejection_rate",
    "fiber_small_rejection_rate",
    "fiber_large_rejection_rate",
)
