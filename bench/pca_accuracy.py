"""Accuracy of the randomized PCA solver against the exact one and sklearn's randomized PCA (issue #18 item 3).

Rows with covariance eigenvalues ``1 / i^(2 decay)`` in D = 300, rotated and offset (N = 3000). For
each decay and seed the script prints the largest relative error of the top-20 eigenvalues of
sklearn's ``PCA(svd_solver="randomized")`` with its defaults and of ``StreamingPCA(solver="randomized")``
with ``n_iter`` covariance passes (the default is 12; it was 4).

Run::

    python bench/pca_accuracy.py
"""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA

from moespec.geometry import StreamingPCA

N_ITER = (4, 7, 8, 10, 12)


def anisotropic(seed: int, decay: float, n_samples: int = 3000, n_features: int = 300) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rotation = np.linalg.qr(rng.standard_normal((n_features, n_features)))[0]
    scales = 1.0 / np.arange(1, n_features + 1) ** decay
    return (rng.standard_normal((n_samples, n_features)) * scales) @ rotation + 5.0


def main() -> None:
    k = 20
    print(f"{'decay':>5s} {'seed':>4s} {'sklearn':>9s} " + " ".join(f"{'n_iter=' + str(n):>10s}" for n in N_ITER))
    for decay in (0.25, 0.5, 1.0):
        for seed in range(3):
            X = anisotropic(seed, decay)
            exact = StreamingPCA(k).fit(X).explained_variance_
            reference = PCA(k, svd_solver="randomized", random_state=seed).fit(X).explained_variance_
            errors = [
                np.max(
                    np.abs(
                        StreamingPCA(k, solver="randomized", n_iter=n, random_state=seed).fit(X).explained_variance_
                        - exact
                    )
                    / exact
                )
                for n in N_ITER
            ]
            print(
                f"{decay:5.2f} {seed:4d} {np.max(np.abs(reference - exact) / exact):9.2e} "
                + " ".join(f"{e:10.2e}" for e in errors)
            )


if __name__ == "__main__":
    main()
