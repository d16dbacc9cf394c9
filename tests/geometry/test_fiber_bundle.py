"""The Robinson-Dey-Chiang test: the authors' algorithm, known answers, invariances, bad input."""

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from scipy.stats import false_discovery_control

from moespec.errors import ConfigError, DataError
from moespec.geometry import (
    fiber_bundle_test,
    fiber_bundle_test_from_radii,
    knn_distances,
    null_calibration,
    null_sample,
)

from .reference_fiber import estimate_point

PAPER = dict(vol_min=10, vol_max=100, window=10, alpha=1e-3, max_strata=2)  # docs/fiber_bundle.md


def sphere(n, seed=0):
    points = np.random.default_rng(seed).standard_normal((n, 3))
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def agree_with_reference(X, params, rows):
    result = fiber_bundle_test(X, **params)
    dists = np.sort(cdist(X, X), axis=1)
    for i in rows:
        changes, dims = estimate_point(
            dists[i], params["vol_min"], params["vol_max"], params["window"], params["alpha"], params["max_strata"]
        )
        assert result.n_changes[i] == len(changes), i
        assert result.change_volume[i, : len(changes)].tolist() == [v for v, _ in changes], i
        np.testing.assert_allclose(result.change_pvalue[i, : len(changes)], [p for _, p in changes], rtol=1e-8)
        np.testing.assert_allclose(result.segment_dimension[i, : len(dims)], dims, rtol=1e-9)
    return result


def rows_to_check(result, n_other=20):
    rejected = np.flatnonzero(result.reject_manifold)[:40]
    others = np.flatnonzero(~result.reject_manifold)[:n_other]
    return np.r_[rejected, others]


def test_matches_the_reference_algorithm_point_by_point():
    X = sphere(500)
    X[10] = X[11]  # a duplicate pair: its zero radius is skipped
    params = dict(vol_min=5, vol_max=80, window=6, alpha=1e-2, max_strata=3)
    result = fiber_bundle_test(X, **params)
    assert result.reject_manifold.sum() > 10  # the comparison covers points with changes
    agree_with_reference(X, params, np.r_[rows_to_check(result), 10, 11])


def test_matches_the_reference_on_a_lattice_with_tied_radii():
    # Exact ties give gradient(log r) = 0, i.e. infinite slopes, which the windows drop.
    grid = np.stack(np.meshgrid(np.arange(25.0), np.arange(25.0)), axis=-1).reshape(-1, 2)
    params = dict(vol_min=5, vol_max=80, window=6, alpha=1e-2, max_strata=2)
    result = fiber_bundle_test(grid, **params)
    assert np.isfinite(result.pvalue).all()
    agree_with_reference(grid, params, rows_to_check(result, 20))


@pytest.mark.parametrize(
    "name, make, dimension",
    [
        ("sphere S2", lambda rng: sphere(1000, 1), 2.0),
        ("unit square", lambda rng: np.c_[rng.random((1500, 2)), np.zeros(1500)], 2.0),
        ("unit cube", lambda rng: rng.random((2000, 3)), 3.0),
        ("gaussian R5", lambda rng: rng.standard_normal((1200, 5)), 5.0),
    ],
)
def test_smooth_manifolds_stay_near_the_null_level(name, make, dimension):
    result = fiber_bundle_test(make(np.random.default_rng(0)), **PAPER)
    summary = result.summary()
    # docs/fiber_bundle.md, "Synthetic validation cases": 3-4 % manifold and 1.3-1.8 % fiber-bundle rejections on these.
    assert summary["rejection_rate"] < 0.07, summary
    assert summary["fiber_rejection_rate"] < 0.035, summary
    # Boundaries and density bias the slope slightly downward (measured 1.94 / 1.86 / 2.73 / 4.60).
    assert 0.85 * dimension < summary["dimension_small_median"] < 1.05 * dimension


def test_thin_strip_rejects_the_manifold_not_the_fiber_bundle():
    rng = np.random.default_rng(0)
    strip = np.c_[rng.random(3000) * 10, rng.random(3000) * 0.05]
    result = fiber_bundle_test(strip, vol_min=5, vol_max=200, window=10, alpha=1e-3, max_strata=3)
    summary = result.summary()
    assert summary["rejection_rate"] > 0.07
    assert summary["fiber_rejection_rate"] < 0.035
    dims = result.segment_dimension[result.reject_manifold]
    assert np.mean(dims[:, 1] < dims[:, 0]) > 0.75  # slopes decrease: 2 below the width, 1 above
    assert summary["dimension_small_median"] < 1.5


def test_line_piercing_a_plane_is_rejected_near_the_plane():
    rng = np.random.default_rng(0)
    line = np.c_[np.zeros((900, 2)), rng.uniform(-3, 3, 900)]
    plane = np.c_[rng.uniform(-1, 1, (3000, 2)), np.zeros(3000)]
    result = fiber_bundle_test(np.r_[line, plane], vol_min=5, vol_max=200, window=10, alpha=1e-3, max_strata=2)
    height = np.abs(line[:, 2])
    # A line point at height h sees only the line (slope 1) until r = h, then the plane (slope
    # rising towards 2): a dimension increase, which a fiber bundle cannot have.
    near = (height > 0.1) & (height < 0.5)
    assert result.reject_fiber_small[:900][near].mean() > 0.5
    dims = result.segment_dimension[:900][near & result.reject_fiber_small[:900]]
    assert np.median(dims[:, 0]) < 1.3 and np.median(dims[:, 1]) > 2.0
    far_from_line = np.linalg.norm(plane[:, :2], axis=1) > 0.5
    assert result.reject_fiber[900:][far_from_line].mean() < 0.08


def test_invariant_to_scale_rotation_translation_and_order():
    rng = np.random.default_rng(2)
    X = np.c_[rng.standard_normal((700, 3)), 0.3 * rng.standard_normal((700, 2))]
    params = dict(vol_min=10, vol_max=100, window=10, alpha=1e-2, max_strata=2)
    base = fiber_bundle_test(X, **params)
    rotation = np.linalg.qr(rng.standard_normal((5, 5)))[0]
    order = rng.permutation(len(X))
    variants = {
        "x1e-3": (X * 1e-3, None),
        "x1e3": (X * 1e3, None),
        "rotated": (X @ rotation, None),
        "translated": (X + 1e3, None),
        "permuted": (X[order], order),
    }
    for name, (Y, perm) in variants.items():
        other = fiber_bundle_test(Y, **params)
        back = np.argsort(perm) if perm is not None else np.arange(len(X))
        for field in ("reject_manifold", "reject_fiber_small", "reject_fiber_large", "n_changes", "change_volume"):
            np.testing.assert_array_equal(getattr(other, field)[back], getattr(base, field), err_msg=name)
        np.testing.assert_allclose(other.segment_dimension[back], base.segment_dimension, rtol=1e-7, err_msg=name)
        np.testing.assert_allclose(other.pvalue[back], base.pvalue, rtol=1e-5, err_msg=name)
    assert base.reject_manifold.any()


def test_duplicates_are_skipped_never_nan():
    X = sphere(800, 3)
    X[1:4] = X[0]  # four copies: their first radii are 0
    X[100:230] = X[99]  # 131 copies: every radius up to vol_max is 0
    result = fiber_bundle_test(X, **PAPER)
    assert np.isfinite(result.pvalue).all() and np.isfinite(result.pvalue_adjusted).all()
    assert result.testable[:4].all() and not result.testable[99:230].any()
    assert np.isfinite(result.dimension_small[result.testable]).all()
    assert (result.pvalue[~result.testable] == 1.0).all() and not result.reject_manifold[~result.testable].any()
    # Points next to the big cluster see its 131 copies at one radius: no scale, so untestable too.
    others = np.setdiff1d(np.flatnonzero(~result.testable), np.arange(99, 230))
    radii, _ = knn_distances(X, PAPER["vol_max"] - 1, queries=others)
    assert (radii[:, PAPER["vol_min"] - 1 :] == radii[:, -1:]).all()
    assert result.summary()["n_testable"] == 800 - 131 - len(others)


def test_window_count_leaving_nothing_to_test_is_a_config_error():
    with pytest.raises(ConfigError, match=r"vol_max - vol_min = 50 - 10 = 40 must exceed 4 \* window = 40"):
        fiber_bundle_test(sphere(200), vol_min=10, vol_max=50, window=10)


def test_too_few_points_and_nan_rows_are_data_errors():
    with pytest.raises(DataError, match=r"vol_max = 100 needs at least vol_max \+ 1 = 101 points, got 100"):
        fiber_bundle_test(sphere(100), **PAPER)
    X = sphere(300)
    X[7, 0] = np.nan
    with pytest.raises(DataError, match="rows 7"):
        fiber_bundle_test(X, **PAPER)


def test_corrections_across_points():
    X = sphere(600, 4)
    params = dict(vol_min=10, vol_max=100, window=10, alpha=0.05, max_strata=2)
    plain = fiber_bundle_test(X, **params)
    bonferroni = fiber_bundle_test(X, correction="bonferroni_nominal", **params)
    bh = fiber_bundle_test(X, correction="bh_nominal", **params)
    np.testing.assert_array_equal(bonferroni.pvalue, plain.pvalue)
    np.testing.assert_allclose(bonferroni.pvalue_adjusted, np.minimum(1, plain.pvalue * 600))
    np.testing.assert_allclose(bh.pvalue_adjusted, false_discovery_control(plain.pvalue), rtol=1e-12)
    assert bonferroni.threshold == pytest.approx(0.05 / 600)
    for result in (plain, bonferroni, bh):
        np.testing.assert_array_equal(result.reject_manifold, result.pvalue_adjusted < 0.05)
        np.testing.assert_array_equal(result.reject_manifold, result.pvalue < result.threshold)
    assert bonferroni.reject_manifold.sum() <= bh.reject_manifold.sum() <= plain.reject_manifold.sum()
    assert plain.reject_manifold.sum() > 0


def test_from_radii_equals_the_full_test():
    X = sphere(400, 5)
    dists = np.sort(cdist(X, X), axis=1)[:, 1:]
    params = dict(vol_min=5, vol_max=60, window=5, alpha=1e-2, max_strata=2)
    direct, from_radii = fiber_bundle_test(X, **params), fiber_bundle_test_from_radii(dists, **params)
    for name, values in direct.arrays().items():
        np.testing.assert_allclose(values, getattr(from_radii, name), rtol=1e-9, err_msg=name)


def test_group_rates_and_subset_of_points():
    X = sphere(500, 6)
    points = np.arange(0, 500, 2)
    result = fiber_bundle_test(X, points=points, vol_min=10, vol_max=100, window=10, alpha=1e-2, max_strata=2)
    assert result.point_index.tolist() == points.tolist()
    groups = (points % 4 == 0).astype(int)
    rates = result.group_rates(groups, 3)
    assert rates["n_testable"].tolist() == [125, 125, 0]
    assert np.isnan(rates["rejection_rate"][2])
    overall = (rates["rejection_rate"][:2] * 125).sum() / 250
    assert overall == pytest.approx(result.summary()["rejection_rate"])


def test_null_samples_match_the_input_moments():
    rng = np.random.default_rng(7)
    X = rng.standard_normal((4000, 4)) @ rng.standard_normal((4, 4)) + 5.0
    for kind in ("gaussian", "resample"):
        sample = null_sample(X, kind, random_state=0)
        assert sample.shape == X.shape
        np.testing.assert_allclose(sample.mean(axis=0), X.mean(axis=0), atol=0.15)
        np.testing.assert_allclose(np.cov(sample, rowvar=False), np.cov(X, rowvar=False), rtol=0.1, atol=0.15)


def test_null_calibration_reports_false_alarm_rates():
    calibration = null_calibration(sphere(600, 8), kind="gaussian", n_repeats=2, n_points=300, random_state=0, **PAPER)
    assert calibration.rates["rejection_rate"].shape == (2,)
    summary = calibration.summary()
    assert 0.0 <= summary["null_rejection_rate"] < 0.08
    rates = ("rejection_rate", "fiber_rejection_rate", "fiber_small_rejection_rate", "fiber_large_rejection_rate")
    assert set(summary) == {f"null_{r}" for r in rates} | {f"null_{r}_std" for r in rates}
    assert summary["null_rejection_rate_std"] == pytest.approx(np.std(calibration.rates["rejection_rate"], ddof=1))
    with pytest.raises(ConfigError, match="kind"):
        null_sample(sphere(50), "uniform")


def test_snap_ties_joins_radii_within_the_relative_tolerance():
    from moespec.geometry.fiber_bundle import TIE_TOLERANCE, snap_ties

    radii = np.array([[1.0, 1.0 + 1e-12, 2.0, 2.0 * (1 + 0.5 * TIE_TOLERANCE), 3.0, 3.0 * (1 + 2 * TIE_TOLERANCE)]])
    np.testing.assert_array_equal(snap_ties(radii), [[1.0, 1.0, 2.0, 2.0, 3.0, 3.0 * (1 + 2 * TIE_TOLERANCE)]])


def test_radii_one_ulp_apart_decide_as_exact_ties():
    # A lattice has many exactly tied radii; the same distances summed in another order differ by an
    # ulp or two. Both must give the same p-values and decisions.
    grid = np.stack(np.meshgrid(np.arange(25.0), np.arange(25.0)), axis=-1).reshape(-1, 2)
    dists = np.sort(cdist(grid, grid), axis=1)[:, 1:80]
    jitter = np.random.default_rng(0).integers(0, 3, dists.shape)  # 0, 1 or 2 ulps up
    jittered = np.sort(np.where(jitter == 0, dists, np.nextafter(dists, np.inf)), axis=1)
    jittered = np.sort(np.where(jitter == 2, np.nextafter(jittered, np.inf), jittered), axis=1)
    assert (jittered != dists).any()
    params = dict(vol_min=5, vol_max=80, window=6, alpha=1e-2, max_strata=2)
    exact, perturbed = fiber_bundle_test_from_radii(dists, **params), fiber_bundle_test_from_radii(jittered, **params)
    assert exact.reject_manifold.any()
    np.testing.assert_array_equal(exact.reject_manifold, perturbed.reject_manifold)
    np.testing.assert_array_equal(exact.reject_fiber, perturbed.reject_fiber)
    np.testing.assert_allclose(exact.pvalue, perturbed.pvalue, rtol=1e-9)


def test_rates_over_all_points_count_untestable_points_as_not_rejected():
    X = sphere(400, 9)
    X[:60] = X[0]  # 60 copies of one point: their radii are all zero up to V = 59, so they are untestable
    result = fiber_bundle_test(X, vol_min=5, vol_max=60, window=5, alpha=1e-2, max_strata=2)
    summary = result.summary()
    assert summary["n_testable"] < summary["n_tested"] == 400
    assert summary["rejection_rate_all_points"] == pytest.approx(
        summary["rejection_rate"] * summary["n_testable"] / summary["n_tested"]
    )


def test_null_comparison_separates_planted_structure_from_smooth_data():
    rng = np.random.default_rng(3)
    line = np.c_[np.zeros((300, 2)), rng.uniform(-1, 1, 300)]
    plane = np.c_[rng.uniform(-1, 1, (1500, 2)), np.zeros(1500)]
    params = dict(vol_min=5, vol_max=100, window=10, alpha=1e-3, max_strata=2)
    pierced = np.r_[line, plane]
    calibration = null_calibration(pierced, n_repeats=3, random_state=0, **params)
    planted = calibration.compare(fiber_bundle_test(pierced, **params))
    assert planted["fiber_rejection_rate_null_pvalue"] < 0.05
    assert planted["fiber_rejection_rate_null_fisher_pvalue"] < 1e-6
    smooth = rng.standard_normal((1800, 3))
    calibration = null_calibration(smooth, n_repeats=3, random_state=1, **params)
    null_vs_null = calibration.compare(fiber_bundle_test(smooth, **params))
    assert null_vs_null["rejection_rate_null_fisher_pvalue"] > 0.01


def test_nominal_bonferroni_is_named_for_what_it_is():
    with pytest.raises(ConfigError, match="'bonferroni' is now 'bonferroni_nominal'"):
        fiber_bundle_test(sphere(200), correction="bonferroni", vol_min=5, vol_max=60, window=5)
