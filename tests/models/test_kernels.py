"""The CPU kernels of the dictionary MoE: the sorting network and the top-k shrinkage against NumPy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moespec.models import kernels


@pytest.mark.parametrize("size", [1, 2, 4, 8, 16])
def test_sorting_network_sorts_every_zero_one_input(size):
    """Knuth's 0-1 principle: a comparator network sorts every input iff it sorts every 0-1 input."""
    network = kernels.sorting_network(size)
    values = np.array(list(itertools.product([0, 1], repeat=size)), dtype=np.int8).T.copy()  # (size, 2^size)
    for low, high in network:
        values[low], values[high] = np.minimum(values[low], values[high]), np.maximum(values[low], values[high])
    assert (np.diff(values, axis=0) >= 0).all()


def test_sorting_network_of_32_sorts_random_inputs_with_batchers_comparator_count():
    network = kernels.sorting_network(32)
    assert len(network) == 191  # Batcher's odd-even merge sort, Knuth TAOCP 5.3.4
    values = np.random.default_rng(0).standard_normal((32, 5000))
    expected = np.sort(values, axis=0)
    for low, high in network:
        values[low], values[high] = np.minimum(values[low], values[high]), np.maximum(values[low], values[high])
    np.testing.assert_array_equal(values, expected)
    with pytest.raises(ValueError, match="power of two"):
        kernels.sorting_network(12)


@pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba is not installed")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("code_dim", "n_columns"), [(32, 64), (20, 7), (1, 3), (32, 1500)])
def test_compiled_top_k_equals_numpys_sort(dtype, code_dim, n_columns):
    rng = np.random.default_rng(code_dim)
    codes = rng.standard_normal((5, code_dim, n_columns)).astype(dtype)
    keep = np.array([1, code_dim // 2 + 1, code_dim, code_dim + 3, max(code_dim - 1, 1)], dtype=np.int64)
    ours, reference = codes.copy(), codes.copy()
    kernels.keep_largest_columns_(ours, keep)
    kernels.keep_largest_columns_numpy_(reference, keep)
    np.testing.assert_array_equal(ours, reference)
    kept = (ours != 0).sum(axis=1)  # (E, N)
    np.testing.assert_array_equal(kept, np.minimum(keep, code_dim)[:, None].repeat(n_columns, axis=1))
    magnitude = np.abs(codes)
    smallest_kept = np.where(ours != 0, magnitude, np.inf).min(axis=1)
    largest_dropped = np.where(ours == 0, magnitude, -np.inf).max(axis=1)
    assert (smallest_kept > largest_dropped).all()


def test_top_k_without_numba_uses_numpys_sort(monkeypatch):
    monkeypatch.setattr(kernels, "HAVE_NUMBA", False)
    codes = np.random.default_rng(1).standard_normal((3, 8, 10))
    reference = codes.copy()
    kernels.keep_largest_columns_(codes, np.array([2, 4, 8]))
    kernels.keep_largest_columns_numpy_(reference, np.array([2, 4, 8]))
    np.testing.assert_array_equal(codes, reference)
    assert not kernels.fused(__import__("torch").zeros(1))
