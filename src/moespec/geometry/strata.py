"""Strata: clusters of the point cloud, their quality scores, and per-stratum summaries.

"Strata" here are k-means or Gaussian-mixture clusters, as in Li & Sarwate (arXiv:2502.13577: k-means
with k = 5 on PCA-64 embeddings, per-cluster PCA-75 % dimension, silhouette). They are a partition
of the points, not the strata of a stratified space in the topological sense; the fiber-bundle
test is what probes the latter, point by point.
"""

from __future__ import annotations

import numpy as np

from moespec.errors import ConfigError, DataError
from moespec.geometry.intrinsic_dim import covariance_spectrum, mle_levina_bickel, pca_count, twonn
from moespec.geometry.knn import knn_distances

METHODS = ("kmeans", "gmm")
SELECTIONS = ("silhouette", "bic")


class Stratifier:
    """Partition points into strata with k-means or a Gaussian mixture.

    Parameters
    ----------
    method : {"kmeans", "gmm"}, default="kmeans"
    n_clusters : int, optional
        Fixed number of strata. When omitted, it is chosen over ``k_range``.
    k_range : tuple of (int, int), default=(2, 10)
        Inclusive range of candidate numbers of strata.
    selection : {"silhouette", "bic"}, default="silhouette"
        Criterion over ``k_range``: the highest silhouette, or (``gmm`` only) the lowest BIC.
    silhouette_sample_size : int, default=10000
        Silhouette is O(n^2): above this many points it is computed on a seeded subsample.
    covariance_type : str, default="full"
        Of the Gaussian mixture (sklearn's ``GaussianMixture``); "diag" for wide inputs.
    n_init : int, default=10
    random_state : int, default=0

    Attributes
    ----------
    labels_ : ndarray of int64, shape (n_samples,)
    n_clusters_ : int
    scores_ : dict of str to float
        ``silhouette``, ``davies_bouldin``, ``calinski_harabasz`` of the chosen partition.
    selection_scores_ : dict of int to float
        The selection criterion for each candidate k (empty when ``n_clusters`` is fixed).
    """

    def __init__(
        self,
        method: str = "kmeans",
        *,
        n_clusters: int | None = None,
        k_range: tuple[int, int] = (2, 10),
        selection: str = "silhouette",
        silhouette_sample_size: int = 10000,
        covariance_type: str = "full",
        n_init: int = 10,
        random_state: int = 0,
    ):
        self.method = method
        self.n_clusters = n_clusters
        self.k_range = k_range
        self.selection = selection
        self.silhouette_sample_size = silhouette_sample_size
        self.covariance_type = covariance_type
        self.n_init = n_init
        self.random_state = random_state

    def fit(self, X) -> "Stratifier":
        """Fit on ``X`` of shape (n_samples, n_features)."""
        X = np.asarray(X, dtype=np.float64)
        candidates = self._validate(len(X))
        self.selection_scores_: dict[int, float] = {}
        fits = {}
        for k in candidates:
            model, fits[k] = self._fit_one(X, k)
            if len(candidates) > 1:
                self.selection_scores_[k] = self._criterion(X, model, fits[k])
        if len(candidates) == 1:
            self.n_clusters_ = candidates[0]
        else:
            sign = 1.0 if self.selection == "bic" else -1.0  # BIC: lower is better; silhouette: higher
            scores = self.selection_scores_
            self.n_clusters_ = min(scores, key=lambda k: sign * scores[k] if np.isfinite(scores[k]) else np.inf)
        self.labels_ = fits[self.n_clusters_]
        self.scores_ = cluster_scores(
            X, self.labels_, sample_size=self.silhouette_sample_size, random_state=self.random_state
        )
        return self

    def _validate(self, n_samples: int) -> list[int]:
        problems = []
        if self.method not in METHODS:
            problems.append(f"method: must be one of {METHODS}, got {self.method!r}")
        if self.selection not in SELECTIONS:
            problems.append(f"selection: must be one of {SELECTIONS}, got {self.selection!r}")
        elif self.selection == "bic" and self.method != "gmm":
            problems.append("selection: 'bic' needs method='gmm'")
        if self.n_clusters is not None:
            candidates = [self.n_clusters]
        else:
            low, high = self.k_range
            candidates = list(range(low, high + 1))
            if low < 2 or high < low:
                problems.append(f"k_range: need 2 <= low <= high, got {tuple(self.k_range)}")
        if candidates and (min(candidates) < 1 or max(candidates) >= n_samples):
            problems.append(
                f"number of strata must be between 1 and n_samples - 1 = {n_samples - 1}, "
                f"got {candidates[0] if len(candidates) == 1 else tuple(self.k_range)}"
            )
        if problems:
            raise ConfigError(problems)
        return candidates

    def _fit_one(self, X, k):
        if self.method == "kmeans":
            from sklearn.cluster import KMeans

            model = KMeans(n_clusters=k, n_init=self.n_init, random_state=self.random_state).fit(X)
            return model, model.labels_.astype(np.int64)
        from sklearn.mixture import GaussianMixture

        model = GaussianMixture(
            n_components=k, covariance_type=self.covariance_type, n_init=self.n_init, random_state=self.random_state
        ).fit(X)
        return model, model.predict(X).astype(np.int64)

    def _criterion(self, X, model, labels) -> float:
        if self.selection == "bic":
            return float(model.bic(X))
        return silhouette(X, labels, sample_size=self.silhouette_sample_size, random_state=self.random_state)


def silhouette(X, labels, *, sample_size: int = 10000, random_state: int = 0) -> float:
    """Mean silhouette (sklearn), on a seeded subsample above ``sample_size`` points; NaN for 1 cluster."""
    from sklearn.metrics import silhouette_score

    if len(np.unique(labels)) < 2:
        return float("nan")
    size = sample_size if len(X) > sample_size else None
    return float(silhouette_score(X, labels, sample_size=size, random_state=random_state))


def cluster_scores(X, labels, *, sample_size: int = 10000, random_state: int = 0) -> dict[str, float]:
    """Silhouette (higher is better), Davies-Bouldin (lower) and Calinski-Harabasz (higher) scores."""
    from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score

    if len(np.unique(labels)) < 2:
        return {"silhouette": float("nan"), "davies_bouldin": float("nan"), "calinski_harabasz": float("nan")}
    return {
        "silhouette": silhouette(X, labels, sample_size=sample_size, random_state=random_state),
        "davies_bouldin": float(davies_bouldin_score(X, labels)),
        "calinski_harabasz": float(calinski_harabasz_score(X, labels)),
    }


def stratum_dimensions(
    X,
    labels,
    n_strata: int,
    *,
    threshold: float = 0.75,
    mle_k: int = 20,
    discard_fraction: float = 0.1,
    max_points: int | None = 5000,
    random_state=0,
    device: str | None = None,
) -> dict[str, np.ndarray]:
    """Intrinsic-dimension estimates of each stratum.

    Parameters
    ----------
    X : array_like of shape (n_samples, n_features)
    labels : array_like of int, shape (n_samples,)
    n_strata : int
    threshold, mle_k, discard_fraction
        As in :mod:`moespec.geometry.intrinsic_dim`.
    max_points : int, optional
        Neighbour-based estimates use at most this many points per stratum (seeded subsample).
    random_state : int or numpy.random.Generator
    device : str, optional

    Returns
    -------
    dict of str to ndarray of shape (n_strata,)
        ``n_points``, ``pca_count`` (on all of the stratum's points), ``twonn`` and
        ``mle_levina_bickel``. A stratum too small for an estimator (fewer than ``mle_k + 1`` points,
        or 2 for ``pca_count``) gets NaN there, never a made-up value.
    """
    X = np.asarray(X)
    labels = np.asarray(labels)
    rng = np.random.default_rng(random_state)
    out = {name: np.full(n_strata, np.nan) for name in ("pca_count", "twonn", "mle_levina_bickel")}
    out["n_points"] = np.bincount(labels, minlength=n_strata)[:n_strata]
    for s in range(n_strata):
        members = np.flatnonzero(labels == s)
        if len(members) >= 2:
            out["pca_count"][s] = pca_count(covariance_spectrum(X[members]), threshold)
        if len(members) < mle_k + 1:
            continue
        if max_points is not None and len(members) > max_points:
            members = np.sort(rng.choice(members, max_points, replace=False))
        distances, _ = knn_distances(X[members], max(mle_k, 2), device=device)
        try:
            out["twonn"][s] = twonn(distances, discard_fraction)
            out["mle_levina_bickel"][s] = mle_levina_bickel(distances, mle_k)
        except DataError:
            continue  # all points of the stratum duplicate each other: no neighbour ratio exists
    return out


def contingency_table(row_codes, col_codes, n_rows: int, n_cols: int) -> np.ndarray:
    """Counts of each (row, column) pair, e.g. domain x stratum: ndarray of int64, shape (n_rows, n_cols)."""
    table = np.zeros((n_rows, n_cols), dtype=np.int64)
    np.add.at(table, (np.asarray(row_codes), np.asarray(col_codes)), 1)
    return table
