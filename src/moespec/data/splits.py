"""Seeded splits of rows or texts into training and held-out sets, stratified by a group key."""

from __future__ import annotations

import numpy as np


def stratified_split(groups: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``fraction`` of each group's rows (at least one of two or more), seeded.

    Parameters
    ----------
    groups : ndarray of shape (n_samples,)
        Group of each row (a domain, a class); groups of one row stay in training.
    fraction : float
        Share of each group held out, rounded, then clipped to [1, size - 1].
    seed : int

    Returns
    -------
    train_index, val_index : ndarray of int64, sorted
    """
    rng = np.random.default_rng(seed)
    train, val = [], []
    for value in np.unique(groups):
        rows = rng.permutation(np.flatnonzero(groups == value))
        n_val = min(max(int(round(fraction * len(rows))), 1), len(rows) - 1) if len(rows) >= 2 else 0
        val.append(rows[:n_val])
        train.append(rows[n_val:])
    return np.sort(np.concatenate(train)).astype(np.int64), np.sort(np.concatenate(val)).astype(np.int64)
