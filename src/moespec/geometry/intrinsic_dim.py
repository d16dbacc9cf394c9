"""Intrinsic-dimension estimators, each named for what it computes.

* :func:`pca_count` - how many principal components reach a share of the variance. A linear count,
  not an intrinsic dimension of a curved manifold (it returns the ambient dimension of a curved one,
  e.g. 3 for a swiss roll: see the tests); the "intrinsic dimension 7" of the earlier pipeline is this at 0.75.
* :func:`twonn` - Facco, d'Errico, Rodriguez & Laio (2017), Sci. Rep. 7:12140.
* :func:`mle_levina_bickel` - Levina & Bickel (2004), NIPS 17, with k neighbours.

The two neighbour-based estimators take sorted k-nearest-neighbour distances (self excluded), so
one neighbour search serves both. Points whose needed radii include a zero (exact duplicates) are
skipped: their ratios are undefined, and keeping them would put 0 or inf into the average.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moespec.errors import ConfigError, DataError
from moespec.geometry.knn import knn_distances

ESTIMATORS = ("pca_count", "twonn", "mle_levina_bickel")


def pca_count(variances, threshold: float = 0.75) -> int:
    """Smallest number of leading components whose variance share reaches ``threshold``.

    Parameters
    ----------
    variances : array_like of shape (n_components,)
        Component variances or explained variance ratios, in any order (sorted here).
    threshold : float in (0, 1]

    Returns
    -------
    int
    """
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"threshold: must be in (0, 1], got {threshold}")
    values = np.sort(np.clip(np.asarray(variances, dtype=np.float64), 0.0, None))[::-1]
    if values.sum() <= 0.0:
        raise DataError("pca_count: the variances sum to zero")
    cumulative = np.cumsum(values) / values.sum()
    return min(int(np.searchsorted(cumulative, threshold * (1.0 - 1e-12))) + 1, len(values))


def covariance_spectrum(X) -> np.ndarray:
    """Eigenvalues of the covariance of ``X`` (n_samples, n_features), descending, in float64."""
    X = np.asarray(X, dtype=np.float64)
    centred = X - X.mean(axis=0)
    return np.clip(np.linalg.eigvalsh(centred.T @ centred / max(len(X) - 1, 1))[::-1], 0.0, None)


def twonn(distances, discard_fraction: float = 0.1) -> float:
    """TwoNN estimate from the ratio of second to first neighbour distance (Facco et al. 2017).

    mu = r2 / r1 is Pareto(d) distributed on a locally uniform d-manifold, so
    ``-log(1 - F(mu)) = d log(mu)``: d is the slope through the origin of that line fitted to the
    empirical distribution ``F(mu_(i)) = i / N`` (i = 1 .. N over the sorted ratios), after discarding
    the largest ``discard_fraction`` of mu (paper, Eq. 4 and Fig. 2). This is scikit-dimension's
    ``TwoNN(method="linear")`` on the same neighbour distances (tested to 1e-10). With
    ``discard_fraction = 0`` the largest ratio has ``F = 1`` and an infinite ordinate; it is left
    out of the fit (scikit-dimension fails there).

    Parameters
    ----------
    distances : array_like of shape (n_samples, >=2)
        Sorted neighbour distances, self excluded.
    discard_fraction : float in [0, 1)

    Returns
    -------
    float
    """
    if not 0.0 <= discard_fraction < 1.0:
        raise ConfigError(f"discard_fraction: must be in [0, 1), got {discard_fraction}")
    distances = np.asarray(distances, dtype=np.float64)
    usable = distances[:, 0] > 0.0
    mu = np.sort(distances[usable, 1] / distances[usable, 0])
    n_points = len(mu)
    n_kept = min(int(n_points * (1.0 - discard_fraction)), n_points - 1)  # F = 1 has no finite ordinate
    if n_kept < 2:
        raise DataError(f"twonn: needs at least 2 points with distinct neighbours, got {n_kept}")
    x = np.log(mu[:n_kept])
    y = -np.log(1.0 - np.arange(1, n_kept + 1) / n_points)  # empirical F(mu_(i)) = i / N, i = 1 .. n_kept
    return float((x @ y) / (x @ x))


def mle_pointwise(distances, k: int = 20) -> np.ndarray:
    """Levina-Bickel local estimates m_k(x) = [1/(k-1) sum_{j<k} log(T_k / T_j)]^{-1} (paper Eq. 8).

    Parameters
    ----------
    distances : array_like of shape (n_samples, >=k)
        Sorted neighbour distances, self excluded.
    k : int >= 2

    Returns
    -------
    ndarray of shape (n_samples,)
        NaN for points whose first neighbour is at distance 0 (duplicates), whose estimate is undefined.
    """
    distances = np.asarray(distances, dtype=np.float64)
    if not 2 <= k <= distances.shape[1]:
        raise ConfigError(f"k: must be between 2 and the {distances.shape[1]} neighbours given, got {k}")
    radii = distances[:, :k]
    usable = radii[:, 0] > 0.0
    estimates = np.full(len(radii), np.nan)
    logs = np.log(radii[usable, k - 1 : k] / radii[usable, : k - 1]).sum(axis=1)
    with np.errstate(divide="ignore"):
        estimates[usable] = (k - 1) / logs
    estimates[usable & ~np.isfinite(estimates)] = np.nan  # all k radii equal: no scale information
    return estimates


def mle_levina_bickel(distances, k: int = 20, combine: str = "mean") -> float:
    """Levina-Bickel maximum-likelihood intrinsic dimension with ``k`` neighbours.

    Parameters
    ----------
    distances : array_like of shape (n_samples, >=k)
        Sorted neighbour distances, self excluded.
    k : int >= 2
    combine : {"mean", "harmonic"}, default="mean"
        ``"mean"``: the paper's average of local estimates (Eq. 9). ``"harmonic"``: the inverse of
        the mean inverse (MacKay & Ghahramani 2005), less biased upward at small k.

    Returns
    -------
    float
    """
    local = mle_pointwise(distances, k)
    local = local[np.isfinite(local)]
    if local.size == 0:
        raise DataError("mle_levina_bickel: no point has distinct neighbours")
    if combine == "mean":
        return float(local.mean())
    if combine == "harmonic":
        return float(1.0 / np.mean(1.0 / local))
    raise ConfigError(f"combine: must be 'mean' or 'harmonic', got {combine!r}")


@dataclass(frozen=True)
class IntrinsicDimension:
    """Several intrinsic-dimension estimates of one point set, side by side.

    Attributes
    ----------
    pca_count : int
        Leading components reaching ``threshold`` of the variance of the point set.
    twonn : float
    mle_levina_bickel : float
    n_points : int
        Points the neighbour-based estimates used (after subsampling).
    """

    pca_count: int
    twonn: float
    mle_levina_bickel: float
    n_points: int

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in (*ESTIMATORS, "n_points")}


def estimate_intrinsic_dimension(
    X,
    *,
    threshold: float = 0.75,
    mle_k: int = 20,
    discard_fraction: float = 0.1,
    max_points: int | None = None,
    random_state=None,
    device: str | None = None,
) -> IntrinsicDimension:
    """All estimators on one point set, sharing one exact neighbour search.

    Parameters
    ----------
    X : array_like of shape (n_samples, n_features)
    threshold : float, default=0.75
        Variance share of :func:`pca_count`.
    mle_k : int, default=20
        Neighbours of :func:`mle_levina_bickel`.
    discard_fraction : float, default=0.1
        Of :func:`twonn`.
    max_points : int, optional
        Estimate on a seeded random subset of this many rows (the neighbour search is O(n^2)).
    random_state : int or numpy.random.Generator, optional
    device : str, optional
        Torch device of the neighbour search.

    Returns
    -------
    IntrinsicDimension
    """
    X = np.asarray(X)
    if max_points is not None and len(X) > max_points:
        rows = np.sort(np.random.default_rng(random_state).choice(len(X), max_points, replace=False))
        X = X[rows]
    if len(X) < mle_k + 1:
        raise DataError(f"intrinsic dimension needs more than mle_k = {mle_k} points, got {len(X)}")
    distances, _ = knn_distances(X, max(mle_k, 2), device=device)
    return IntrinsicDimension(
        pca_count=pca_count(covariance_spectrum(X), threshold),
        twonn=twonn(distances, discard_fraction),
        mle_levina_bickel=mle_levina_bickel(distances, mle_k),
        n_points=len(X),
    )
