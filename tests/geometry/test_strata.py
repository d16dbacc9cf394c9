"""Strata: cluster selection, scores, per-stratum dimension and tables."""

import numpy as np
import pytest

from moespec.errors import ConfigError
from moespec.geometry import Stratifier, cluster_scores, contingency_table, stratum_dimensions


def three_blobs(seed=0):
    """A 1-D segment, a 2-D square and a 4-D cube, far apart in 6-D."""
    rng = np.random.default_rng(seed)
    pieces = [
        np.c_[rng.random((300, 1)), np.zeros((300, 5))],
        np.c_[rng.random((300, 2)), np.zeros((300, 4))] + 20.0,
        np.c_[rng.random((300, 4)), np.zeros((300, 2))] - 20.0,
    ]
    return np.concatenate(pieces), np.repeat(np.arange(3), 300)


def same_partition(a, b):
    return len(set(zip(a.tolist(), b.tolist()))) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("method, selection", [("kmeans", "silhouette"), ("gmm", "silhouette"), ("gmm", "bic")])
def test_selection_finds_the_three_blobs(method, selection):
    X, truth = three_blobs()
    strata = Stratifier(method, k_range=(2, 5), selection=selection, n_init=2, random_state=0).fit(X)
    assert strata.n_clusters_ == 3
    assert sorted(strata.selection_scores_) == [2, 3, 4, 5]
    assert same_partition(strata.labels_, truth)
    assert strata.scores_["silhouette"] > 0.9


def test_fixed_k_and_scores():
    X, truth = three_blobs()
    strata = Stratifier("kmeans", n_clusters=2, n_init=2).fit(X)
    assert strata.n_clusters_ == 2 and strata.selection_scores_ == {}
    scores = cluster_scores(X, truth)
    assert set(scores) == {"silhouette", "davies_bouldin", "calinski_harabasz"}
    assert scores["davies_bouldin"] < 0.1 and scores["calinski_harabasz"] > 1000


def test_stratum_dimensions_follow_each_piece():
    X, truth = three_blobs(1)
    dims = stratum_dimensions(X, truth, 4, mle_k=10)
    assert dims["n_points"].tolist() == [300, 300, 300, 0]
    np.testing.assert_allclose(dims["twonn"][:3], [1, 2, 4], rtol=0.2)
    np.testing.assert_allclose(dims["mle_levina_bickel"][:3], [1, 2, 4], rtol=0.2)
    assert dims["pca_count"][:3].tolist() == [1, 2, 3]  # 75 % of a cube's variance needs 3 of its 4 axes
    assert np.isnan(dims["twonn"][3]) and np.isnan(dims["pca_count"][3])  # an empty stratum has no value


def test_contingency_table():
    table = contingency_table([0, 0, 1, 2, 2, 2], [1, 1, 0, 0, 1, 1], 3, 2)
    assert table.tolist() == [[0, 2], [1, 0], [1, 2]]


def test_bad_parameters_are_config_errors():
    X, _ = three_blobs()
    with pytest.raises(ConfigError, match="method"):
        Stratifier("dbscan").fit(X)
    with pytest.raises(ConfigError, match="'bic' needs method='gmm'"):
        Stratifier("kmeans", selection="bic").fit(X)
    with pytest.raises(ConfigError, match="k_range"):
        Stratifier("kmeans", k_range=(1, 3)).fit(X)
