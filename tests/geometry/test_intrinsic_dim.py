"""Intrinsic-dimension estimators on manifolds of known dimension."""

import numpy as np
import pytest

from moespec.errors import ConfigError, DataError
from moespec.geometry import (
    estimate_intrinsic_dimension,
    knn_distances,
    mle_levina_bickel,
    mle_pointwise,
    pca_count,
    twonn,
)


def embed(points, ambient, rng):
    """Put ``points`` into ``ambient`` dimensions with a random rotation."""
    rotation = np.linalg.qr(rng.standard_normal((ambient, ambient)))[0]
    padded = np.zeros((len(points), ambient))
    padded[:, : points.shape[1]] = points
    return padded @ rotation


def manifolds():
    rng = np.random.default_rng(0)
    angle = rng.uniform(0, 2 * np.pi, 2000)
    sphere = rng.standard_normal((2000, 3))
    sphere /= np.linalg.norm(sphere, axis=1, keepdims=True)
    roll = rng.uniform(0, 4 * np.pi, 2000)
    return {
        "circle": (1, embed(np.c_[np.cos(angle), np.sin(angle)], 5, rng)),
        "sphere": (2, embed(sphere, 6, rng)),
        "swiss_roll": (2, np.c_[roll * np.cos(roll), rng.uniform(0, 5, 2000), roll * np.sin(roll)]),
        "gaussian": (3, embed(rng.standard_normal((2000, 3)), 8, rng)),
        "cube": (5, embed(rng.random((2000, 5)), 12, rng)),
    }


@pytest.mark.parametrize("name", ["circle", "sphere", "swiss_roll", "gaussian", "cube"])
def test_neighbour_estimators_recover_known_dimension(name):
    dimension, X = manifolds()[name]
    distances, _ = knn_distances(X, 20)
    # Both are biased low as the dimension grows (docs/performance.md, "Intrinsic dimension"): 5-D reads about 4.7.
    assert twonn(distances) == pytest.approx(dimension, rel=0.12)
    assert mle_levina_bickel(distances, 20) == pytest.approx(dimension, rel=0.12)
    assert mle_levina_bickel(distances, 20, combine="harmonic") == pytest.approx(dimension, rel=0.12)


@pytest.mark.parametrize("name", ["circle", "sphere", "cube"])
@pytest.mark.parametrize("discard_fraction", [0.1, 0.25])
def test_twonn_equals_scikit_dimension_on_the_same_distances(name, discard_fraction):
    skdim = pytest.importorskip("skdim")  # the dev extra installs it
    _, X = manifolds()[name]
    distances, _ = knn_distances(X, 2)
    reference = skdim.id.TwoNN(discard_fraction=discard_fraction, dist=True).fit(distances).dimension_
    assert abs(twonn(distances, discard_fraction) - reference) <= 1e-10


def test_twonn_without_discard_leaves_out_the_infinite_ordinate():
    _, X = manifolds()["sphere"]
    distances, _ = knn_distances(X, 2)
    mu = np.sort(distances[:, 1] / distances[:, 0])
    n = len(mu)
    x, y = np.log(mu[:-1]), -np.log(1 - np.arange(1, n) / n)
    assert twonn(distances, 0.0) == pytest.approx((x @ y) / (x @ x), rel=1e-12)


def test_pca_count():
    assert pca_count([4.0, 3.0, 2.0, 1.0], 0.75) == 3  # 0.4, 0.7, 0.9
    assert pca_count([1.0, 2.0, 3.0, 4.0], 0.7) == 2  # order does not matter
    assert pca_count([1.0, 1.0, 0.0], 1.0) == 2
    with pytest.raises(ConfigError, match="threshold"):
        pca_count([1.0], 0.0)


def test_pca_count_sees_the_linear_span_not_the_manifold():
    _, X = manifolds()["swiss_roll"]
    assert estimate_intrinsic_dimension(X, threshold=0.99).pca_count == 3


def test_duplicates_are_skipped_not_nan():
    _, X = manifolds()["sphere"]
    X = np.r_[X, X[:50]]
    distances, _ = knn_distances(X, 20)
    assert np.isnan(mle_pointwise(distances, 20)[:50]).all()
    assert np.isfinite(twonn(distances)) and np.isfinite(mle_levina_bickel(distances, 20))
    assert twonn(distances) == pytest.approx(2, rel=0.12)


def test_estimate_subsamples_with_a_seed():
    _, X = manifolds()["gaussian"]
    first = estimate_intrinsic_dimension(X, max_points=500, random_state=3)
    again = estimate_intrinsic_dimension(X, max_points=500, random_state=3)
    assert first == again and first.n_points == 500
    assert set(first.as_dict()) == {"pca_count", "twonn", "mle_levina_bickel", "n_points"}


def test_too_few_points_is_a_data_error():
    with pytest.raises(DataError, match="mle_k = 20"):
        estimate_intrinsic_dimension(np.random.default_rng(0).random((15, 3)))
