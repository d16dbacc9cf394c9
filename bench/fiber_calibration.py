"""Calibration of the fiber-bundle test's per-point p-values on smooth manifolds (issue #18 item 1).

For each smooth point cloud (no planted singularity, so every rejection is a false alarm) and each
of ``--datasets`` independent draws, the test runs on all points with the paper's parameters and
the script prints:

* ``P(p < alpha)``: the share of testable points whose per-point p-value is below alpha (a uniform
  p-value would give alpha);
* ``FWER bonferroni_nominal`` / ``FWER bh_nominal``: the share of data sets in which the nominal
  correction at ``alpha`` rejected at least one point (a valid correction keeps this <= alpha).

Run::

    python bench/fiber_calibration.py                 # 30 data sets of 2000 points each
    python bench/fiber_calibration.py --datasets 10 --points 1000
"""

from __future__ import annotations

import argparse

import numpy as np

from moespec.geometry import fiber_bundle_test


def smooth_clouds(n_points: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    sphere = rng.standard_normal((n_points, 3))
    return {
        "gaussian R3": rng.standard_normal((n_points, 3)),
        "gaussian R5": rng.standard_normal((n_points, 5)),
        "sphere S2": sphere / np.linalg.norm(sphere, axis=1, keepdims=True),
        "unit cube": rng.random((n_points, 3)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", type=int, default=30)
    parser.add_argument("--points", type=int, default=2000)
    parser.add_argument("--alpha", type=float, default=1e-3)
    args = parser.parse_args()
    params = dict(vol_min=10, vol_max=100, window=10, alpha=args.alpha, max_strata=2)
    rows: dict[str, dict[str, list[float]]] = {}
    for draw in range(args.datasets):
        for name, X in smooth_clouds(args.points, np.random.default_rng([draw, 18])).items():
            row = rows.setdefault(name, {"below": [], "bonferroni": [], "bh": []})
            plain = fiber_bundle_test(X, **params)
            row["below"].append(float(np.mean(plain.pvalue[plain.testable] < args.alpha)))
            for correction, key in (("bonferroni_nominal", "bonferroni"), ("bh_nominal", "bh")):
                result = fiber_bundle_test(X, correction=correction, **params)
                row[key].append(float(result.reject_manifold.any()))
    print(f"{args.datasets} data sets of {args.points} points, alpha = {args.alpha}, paper parameters {params}")
    print(f"{'cloud':12s} {'P(p < alpha)':>12s} {'FWER bonferroni_nominal':>24s} {'FWER bh_nominal':>16s}")
    for name, row in rows.items():
        print(f"{name:12s} {np.mean(row['below']):12.4f} {np.mean(row['bonferroni']):24.3f} {np.mean(row['bh']):16.3f}")


if __name__ == "__main__":
    main()
