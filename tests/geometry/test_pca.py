"""Streaming PCA against scikit-learn and against exact float64 references."""

import tracemalloc

import h5py
import numpy as np
import pytest
from sklearn.decomposition import PCA

from moespec.errors import ConfigError, DataError
from moespec.geometry import StreamingPCA


def embedding_like(n=3000, d=60, seed=0, offset=20.0):
    """Decaying spectrum, random rotation and a large common mean, like LM embeddings."""
    rng = np.random.default_rng(seed)
    rotation = np.linalg.qr(rng.standard_normal((d, d)))[0]
    return (rng.standard_normal((n, d)) / np.sqrt(np.arange(1, d + 1))) @ rotation + offset


def test_matches_sklearn_covariance_eigh():
    X = embedding_like()
    ours = StreamingPCA(12, chunk_rows=701).fit(X)
    ref = PCA(12, svd_solver="covariance_eigh").fit(X)
    np.testing.assert_allclose(ours.explained_variance_ratio_, ref.explained_variance_ratio_, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours.explained_variance_, ref.explained_variance_, rtol=1e-9)
    signs = np.sign((ours.components_ * ref.components_).sum(axis=1))
    np.testing.assert_allclose(ours.components_ * signs[:, None], ref.components_, atol=1e-8)
    np.testing.assert_allclose(ours.mean_, ref.mean_, rtol=1e-12)
    np.testing.assert_allclose(ours.transform(X), ref.transform(X) * signs, atol=1e-8)
    assert ours.variance_retained_ == pytest.approx(ref.explained_variance_ratio_.sum(), abs=1e-6)


def test_matches_numpy_svd_spectrum():
    X = embedding_like(800, 30, seed=1)
    singular = np.linalg.svd(X - X.mean(axis=0), compute_uv=False)
    pca = StreamingPCA(30, chunk_rows=128).fit(X)
    np.testing.assert_allclose(pca.spectrum_, singular**2 / (len(X) - 1), rtol=1e-9)


def test_hdf5_stream_equals_memory_and_is_chunk_independent(tmp_path):
    X = embedding_like(2500, 40, seed=2).astype(np.float32)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("x", data=X, chunks=(100, 40))
    with h5py.File(tmp_path / "x.h5", "r") as f:
        streamed = StreamingPCA(8, chunk_rows=333).fit(f["x"])
        out = np.empty((len(X), 8))
        streamed.transform(f["x"], out)
    in_memory = StreamingPCA(8, chunk_rows=5000).fit(X)
    np.testing.assert_allclose(streamed.explained_variance_ratio_, in_memory.explained_variance_ratio_, rtol=1e-6)
    np.testing.assert_allclose(out, in_memory.transform(X), atol=1e-4)


def test_float32_with_large_mean_stays_accurate():
    # The provisional-mean shift avoids the cancellation of X^T X - n mu mu^T (docs/performance.md, "PCA").
    X = embedding_like(4000, 50, seed=3, offset=300.0)
    X32 = X.astype(np.float32)
    exact = np.linalg.eigvalsh(np.cov(X32.astype(np.float64), rowvar=False))[::-1]
    pca = StreamingPCA(10, chunk_rows=1000).fit(X32)
    np.testing.assert_allclose(pca.explained_variance_, exact[:10], rtol=1e-5)


def test_variance_target_picks_smallest_k():
    X = embedding_like()
    full = StreamingPCA(60).fit(X)
    target = 0.6
    k = int(np.argmax(np.cumsum(full.explained_variance_ratio_) >= target)) + 1
    pca = StreamingPCA(variance_target=target).fit(X)
    assert pca.n_components_ == k
    assert pca.variance_retained_ >= target > pca.variance_retained_ - pca.explained_variance_ratio_[-1]


def test_randomized_solver_agrees_on_a_gapped_spectrum():
    rng = np.random.default_rng(4)
    signal = rng.standard_normal((3000, 6)) * np.array([10, 8, 6, 5, 4, 3.0])
    X = signal @ np.linalg.qr(rng.standard_normal((200, 6)))[0].T + 0.1 * rng.standard_normal((3000, 200))
    exact = StreamingPCA(6).fit(X)
    randomized = StreamingPCA(6, solver="randomized", random_state=0, chunk_rows=512).fit(X)
    np.testing.assert_allclose(randomized.explained_variance_ratio_, exact.explained_variance_ratio_, atol=1e-6)
    np.testing.assert_allclose(np.abs((randomized.components_ * exact.components_).sum(axis=1)), 1.0, atol=1e-6)
    assert randomized.spectrum_ is None


def _slowly_decaying(seed, n_samples=3000, n_features=300):
    """Rows with covariance eigenvalues ``1 / i`` (scales ``1 / sqrt(i)``), rotated and offset."""
    rng = np.random.default_rng(seed)
    rotation = np.linalg.qr(rng.standard_normal((n_features, n_features)))[0]
    scales = 1.0 / np.sqrt(np.arange(1, n_features + 1))
    return (rng.standard_normal((n_samples, n_features)) * scales) @ rotation + 5.0


def test_randomized_default_reaches_sklearns_default_accuracy_on_an_anisotropic_spectrum():
    from sklearn.decomposition import PCA

    ours, theirs = [], []
    for seed in range(3):
        X = _slowly_decaying(seed)
        exact = StreamingPCA(20).fit(X).explained_variance_
        randomized = StreamingPCA(20, solver="randomized", random_state=seed).fit(X).explained_variance_
        reference = PCA(20, svd_solver="randomized", random_state=seed).fit(X).explained_variance_
        ours.append(np.max(np.abs(randomized - exact) / exact))
        theirs.append(np.max(np.abs(reference - exact) / exact))
    assert all(a <= b for a, b in zip(ours, theirs)), (ours, theirs)


def test_whitening_gives_unit_variance():
    X = embedding_like(2000, 20, seed=5)
    reduced = StreamingPCA(5, whiten=True).fit_transform(X)
    np.testing.assert_allclose(reduced.var(axis=0, ddof=1), 1.0, rtol=1e-9)


def test_memory_does_not_grow_with_n(tmp_path):
    rng = np.random.default_rng(6)
    with h5py.File(tmp_path / "big.h5", "w") as f:
        data = f.create_dataset("x", shape=(200_000, 16), dtype="f4", chunks=(1000, 16))
        for start in range(0, 200_000, 50_000):
            data[start : start + 50_000] = rng.standard_normal((50_000, 16))
    with h5py.File(tmp_path / "big.h5", "r") as f:
        tracemalloc.start()
        StreamingPCA(4, chunk_rows=1000).fit(f["x"])
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 1_000_000  # one 1000 x 16 chunk and a few copies; the data are 12.8 MB


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"n_components": 61},
            r"n_components: must be between 1 and min\(n_samples, n_features\) = min\(3000, 60\), got 61",
        ),
        ({}, "exactly one of n_components and variance_target"),
        ({"n_components": 3, "variance_target": 0.5}, "exactly one"),
        ({"variance_target": 1.5}, r"variance_target: must be in \(0, 1\], got 1.5"),
        ({"variance_target": 0.5, "solver": "randomized"}, "needs solver='covariance'"),
    ],
)
def test_bad_parameters_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        StreamingPCA(**kwargs).fit(embedding_like())


def test_nan_row_is_a_data_error_naming_the_row():
    X = embedding_like(500, 10)
    X[321, 4] = np.nan
    with pytest.raises(DataError, match="first at row 321"):
        StreamingPCA(3, chunk_rows=100).fit(X)
