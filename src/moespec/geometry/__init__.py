"""Geometry of point clouds: streaming PCA, exact neighbour radii, intrinsic dimension, the
manifold / fiber-bundle test of Robinson, Dey & Chiang, and strata (clusters).

Pure numpy / torch (+ scipy and scikit-learn), usable outside the pipeline::

    from moespec.geometry import fiber_bundle_test
    result = fiber_bundle_test(X, vol_min=10, vol_max=100, window=10, alpha=1e-3, max_strata=2)
    result.summary()["rejection_rate"]

Names are loaded on first use, so that importing ``moespec.geometry.params`` (what stage configs
validate with) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> submodule that defines it.
_EXPORTS = {
    "StreamingPCA": "pca",
    "iter_row_chunks": "pca",
    "knn_distances": "knn",
    "default_device": "knn",
    "IntrinsicDimension": "intrinsic_dim",
    "covariance_spectrum": "intrinsic_dim",
    "estimate_intrinsic_dimension": "intrinsic_dim",
    "mle_levina_bickel": "intrinsic_dim",
    "mle_pointwise": "intrinsic_dim",
    "pca_count": "intrinsic_dim",
    "twonn": "intrinsic_dim",
    "FiberBundleResult": "fiber_bundle",
    "NullCalibration": "fiber_bundle",
    "NULL_KINDS": "fiber_bundle",
    "fiber_bundle_test": "fiber_bundle",
    "fiber_bundle_test_from_radii": "fiber_bundle",
    "null_calibration": "fiber_bundle",
    "null_sample": "fiber_bundle",
    "CORRECTIONS": "params",
    "check_parameters": "params",
    "Stratifier": "strata",
    "cluster_scores": "strata",
    "contingency_table": "strata",
    "silhouette": "strata",
    "stratum_dimensions": "strata",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moespec.geometry' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"moespec.geometry.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
