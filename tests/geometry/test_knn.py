"""Exact neighbour radii: against a dense float64 reference, with duplicates, offsets and blocks."""

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from moespec.errors import ConfigError, DataError
from moespec.geometry import knn_distances


def dense_reference(X, k, queries=None):
    rows = np.arange(len(X)) if queries is None else np.asarray(queries)
    dist = cdist(X[rows], X)
    dist[np.arange(len(rows)), rows] = np.inf  # self, but not its duplicates
    return np.sort(dist, axis=1)[:, :k]


@pytest.fixture
def cloud():
    rng = np.random.default_rng(0)
    return rng.standard_normal((600, 12)) * np.linspace(3, 0.1, 12)


def test_matches_dense_float64_distances(cloud):
    distances, indices = knn_distances(cloud, 25, block_size=97)
    np.testing.assert_allclose(distances, dense_reference(cloud, 25), rtol=1e-12, atol=1e-12)
    recomputed = np.linalg.norm(cloud[indices] - cloud[:, None, :], axis=2)
    np.testing.assert_allclose(recomputed, distances, rtol=1e-12)
    assert (np.diff(distances, axis=1) >= 0).all()


def test_large_offset_keeps_float64_radii(cloud):
    # float32 ranking of ||x||^2 - 2 q.x would lose everything at this offset; centring and the
    # float64 recomputation keep the radii exact.
    shifted = cloud + 1e6
    distances, _ = knn_distances(shifted, 10)
    np.testing.assert_allclose(distances, dense_reference(shifted, 10), rtol=1e-9)


def test_duplicates_give_zero_radii_and_self_is_excluded(cloud):
    X = cloud.copy()
    X[[5, 6, 7]] = X[4]
    distances, indices = knn_distances(X, 5)
    assert distances[4, :3].tolist() == [0.0, 0.0, 0.0]
    assert set(indices[4, :3]) == {5, 6, 7}
    assert (indices != np.arange(len(X))[:, None]).all()


def test_queries_subset_and_float32_input(cloud):
    queries = [3, 99, 598]
    distances, _ = knn_distances(cloud.astype(np.float32), 7, queries=queries)
    expected = dense_reference(cloud.astype(np.float32).astype(np.float64), 7, queries)
    np.testing.assert_allclose(distances, expected, rtol=1e-12)


def test_k_all_other_points(cloud):
    small = cloud[:40]
    distances, _ = knn_distances(small, 39)
    np.testing.assert_allclose(distances, dense_reference(small, 39), rtol=1e-12)


def test_bad_inputs_are_named():
    X = np.zeros((10, 3))
    with pytest.raises(ConfigError, match="k: need 1 <= k <= 9 for 10 points, got 10"):
        knn_distances(X, 10)
    X[4, 1] = np.nan
    with pytest.raises(DataError, match="rows 4"):
        knn_distances(X, 3)


@pytest.mark.gpu
def test_gpu_matches_cpu(cloud):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    on_gpu, _ = knn_distances(cloud, 25, device="cuda")
    on_cpu, _ = knn_distances(cloud, 25, device="cpu")
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-12)


def test_two_stage_selection_on_clustered_sorted_points_with_duplicates():
    # Enough points for the grouped selection (groups >= 4 x candidates), N not a multiple of the
    # group width, rows sorted by cluster (neighbours crowd into neighbouring columns), duplicates.
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((5, 8)) * 10
    X = np.concatenate([c + rng.standard_normal((601, 8)) * 0.3 for c in centres]).astype(np.float32)
    X[[10, 11, 12]] = X[9]
    distances, indices = knn_distances(X, 20, block_size=256)
    np.testing.assert_allclose(distances, dense_reference(X.astype(np.float64), 20), rtol=1e-12)
    assert distances[9, :3].tolist() == [0.0, 0.0, 0.0] and set(indices[9, :3]) == {10, 11, 12}


def test_smallest_equals_topk():
    import torch

    from moespec.geometry.knn import _GROUP, _smallest

    generator = torch.Generator().manual_seed(0)
    scores = torch.full((7, 160 * _GROUP), torch.inf)
    scores[:, : 160 * _GROUP - 5] = torch.randn(7, 160 * _GROUP - 5, generator=generator)
    expected = torch.topk(scores, 30, dim=1, largest=False).indices.sort(dim=1).values
    assert torch.equal(_smallest(scores, 30).sort(dim=1).values, expected)
