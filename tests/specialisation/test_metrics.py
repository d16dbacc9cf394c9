"""Specialisation metrics on hand-computed examples, and against scikit-learn where it has them."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import mutual_info_score, normalized_mutual_info_score

from moespec.specialisation import metrics as spec


def test_load_importance_cv_and_dead_experts_by_hand():
    # Three tokens, top-2 of four experts: slots 0,1 | 0,2 | 0,1 -> counts 3, 2, 1, 0 of 6 slots.
    selected = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 0]], dtype=bool)
    load = spec.expert_load(selected)
    np.testing.assert_allclose(load, [3 / 6, 2 / 6, 1 / 6, 0])
    probs = np.array([[0.5, 0.3, 0.1, 0.1], [0.6, 0.1, 0.2, 0.1], [0.4, 0.4, 0.1, 0.1]])
    np.testing.assert_allclose(spec.expert_importance(probs), [0.5, 0.8 / 3, 0.4 / 3, 0.1])
    assert spec.coefficient_of_variation([0.25] * 4) == 0.0
    assert spec.coefficient_of_variation(load) == pytest.approx(np.std(load) / 0.25)
    # Dead: below 0.1 / E = 0.025.
    assert spec.dead_expert_mask(load).tolist() == [False, False, False, True]
    assert spec.dead_expert_mask(np.array([0.5, 0.49, 0.01])).tolist() == [False, False, True]


def test_routing_entropy_normalised_by_log_e():
    probs = np.array([[0.25] * 4, [1.0, 0, 0, 0], [0.5, 0.5, 0, 0]])
    np.testing.assert_allclose(spec.routing_entropy(probs), [1.0, 0.0, 0.5])
    np.testing.assert_allclose(spec.routing_entropy(probs, normalize=False), [math.log(4), 0.0, math.log(2)])
    counts, edges, quantiles = spec.entropy_distribution(np.array([0.0, 0.5, 1.0, 1.0]), n_bins=2)
    assert counts.tolist() == [1, 3] and edges.tolist() == [0.0, 0.5, 1.0]
    assert quantiles[2] == pytest.approx(0.75)
    # Router information: every token one-hot on a different expert -> log E; identical tokens -> 0.
    assert spec.router_information(np.eye(4)) == pytest.approx(math.log(4))
    assert spec.router_information(np.tile([0.7, 0.1, 0.1, 0.1], (5, 1))) == pytest.approx(0.0)
    top1 = np.eye(3, dtype=bool)[[0, 0, 2]]
    np.testing.assert_allclose(spec.mean_entropy_by_expert(np.array([0.2, 0.4, 0.9]), top1), [0.3, np.nan, 0.9])
    # Top-2: expert 1 is only ever a second choice and still gets the entropy of its inputs.
    top2 = top1 | np.eye(3, dtype=bool)[[1, 2, 1]]
    np.testing.assert_allclose(spec.mean_entropy_by_expert(np.array([0.2, 0.4, 0.9]), top2), [0.3, 0.55, 0.65])


def test_mutual_information_and_nmi_match_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=500)
    experts = np.where(rng.random(500) < 0.6, labels % 3, rng.integers(0, 3, size=500))
    table = spec.contingency_table(labels, spec.one_hot(experts, 3), 4)
    assert table.sum() == 500 and table[1, 1] == np.sum((labels == 1) & (experts == 1))
    assert spec.mutual_information(table) == pytest.approx(mutual_info_score(labels, experts))
    assert spec.mutual_information(table) == pytest.approx(mutual_info_score(None, None, contingency=table))
    assert spec.normalized_mutual_information(table) == pytest.approx(normalized_mutual_info_score(labels, experts))


def test_mutual_information_extremes():
    perfect = np.diag([10, 10, 10])  # every class has its own expert
    assert spec.mutual_information(perfect) == pytest.approx(math.log(3))
    assert spec.normalized_mutual_information(perfect) == pytest.approx(1.0)
    independent = np.full((3, 2), 7)
    assert spec.mutual_information(independent) == pytest.approx(0.0)
    assert spec.normalized_mutual_information(independent) == pytest.approx(0.0)
    assert spec.normalized_mutual_information(np.array([[5]])) == 1.0  # sklearn's convention for constants


def test_specialisation_share_and_lifts_by_hand():
    # Top-2 slots: class 0 sends 3 slots to e0 and 1 to e1 (2 inputs); class 1 sends 2 to e1, 2 to e2.
    table = np.array([[3, 1, 0], [0, 2, 2]])
    share = spec.specialisation_share(table)
    np.testing.assert_allclose(share, [[0.75, 0.25, 0.0], [0.0, 0.5, 0.5]])
    np.testing.assert_allclose(spec.lift_over_uniform(share), share * 3)
    load = table.sum(axis=0) / table.sum()  # [3/8, 3/8, 2/8]
    np.testing.assert_allclose(spec.lift_over_load(share, load), share / load)
    assert np.isnan(spec.specialisation_share(np.array([[0, 0]]))).all()


def test_token_consistency_against_a_shuffled_baseline():
    # Token 5 always goes to expert 1, token 7 to expert 0 twice and expert 2 once, token 9 seen once.
    tokens = np.array([5, 5, 5, 7, 7, 7, 9])
    top1 = np.array([1, 1, 1, 0, 0, 2, 2])
    vocab, occurrence, counted = spec.token_consistency(tokens, top1, 3, min_count=2)
    assert counted == 2
    assert vocab == pytest.approx((1.0 + 2 / 3) / 2)
    assert occurrence == pytest.approx(5 / 6)
    assert spec.token_consistency(tokens, top1, 3, min_count=1)[2] == 3
    assert math.isnan(spec.token_consistency(tokens, top1, 3, min_count=10)[0])
    assert spec.consecutive_repetition(np.array([0, 0, 1, 1, 1]), np.array([0, 0, 0, 1, 1])) == pytest.approx(2 / 3)


def test_group_means_weights_give_a_ratio_estimate():
    values = np.array([[1.0, 0.0, 1.0, 1.0]])
    groups = np.array([0, 0, 1, 1])
    np.testing.assert_allclose(spec.group_means(values, groups, 3), [[0.5, 1.0, np.nan]])
    # Per-text mean losses 2 and 4 over 1 and 3 tokens: the per-token mean is (2 + 12) / 4.
    weighted = spec.group_means(np.array([2.0, 4.0]), np.array([0, 0]), 1, weights=np.array([1.0, 3.0]))
    assert weighted[0] == pytest.approx(3.5)


def test_bootstrap_intervals_are_seeded_paired_and_cover_the_mean():
    rng_values = np.random.default_rng(1)
    baseline = rng_values.random(200)
    ablated = baseline[None, :] - np.array([[0.0], [0.3]])  # a constant shift: a zero-width paired interval
    groups = np.repeat([0, 1], 100)
    point, low, high = spec.bootstrap_group_means(
        ablated - baseline, groups, 2, rng=np.random.default_rng(0), n_resamples=200
    )
    np.testing.assert_allclose(point, [[0, 0], [-0.3, -0.3]], atol=1e-12)
    np.testing.assert_allclose(low, point, atol=1e-12)
    np.testing.assert_allclose(high, point, atol=1e-12)
    noisy = rng_values.normal(1.0, 1.0, size=(1, 400))
    first = spec.bootstrap_group_means(noisy, np.zeros(400, int), 1, rng=np.random.default_rng(5), n_resamples=300)
    again = spec.bootstrap_group_means(noisy, np.zeros(400, int), 1, rng=np.random.default_rng(5), n_resamples=300)
    np.testing.assert_array_equal(first[1], again[1])
    assert first[1][0, 0] < noisy.mean() < first[2][0, 0]
    assert 0.1 < first[2][0, 0] - first[1][0, 0] < 0.4  # ~ 2 * 1.96 / sqrt(400)
    empty = spec.bootstrap_group_means(noisy, np.zeros(400, int), 2, rng=np.random.default_rng(5), n_resamples=10)
    assert np.isnan(empty[1][0, 1])
    none = spec.bootstrap_group_means(noisy, np.zeros(400, int), 1, rng=np.random.default_rng(5), n_resamples=0)
    assert np.isnan(none[1]).all() and none[0][0, 0] == pytest.approx(noisy.mean())


def test_matched_load_sets_exclude_the_target_and_match_its_load():
    load = np.array([0.3, 0.1, 0.1, 0.2, 0.05, 0.05, 0.1, 0.1])
    sets = spec.matched_load_sets(load, 0, 20, np.random.default_rng(0))
    assert sets.shape == (20, 8) and not sets[:, 0].any() and sets.any(axis=1).all()
    np.testing.assert_array_less(np.abs(sets @ load - 0.3), 0.3 * 0.25 + 1e-12)
    assert len({tuple(row) for row in sets}) > 3  # random, not one fixed set
    # No subset within tolerance: the nearest one (expert 1, load 0, beats expert 2, load 0.89).
    nearest = spec.matched_load_sets(np.array([0.11, 0.0, 0.89]), 0, 3, np.random.default_rng(0))
    assert nearest.tolist() == [[False, True, False]] * 3
    assert not spec.matched_load_sets(np.array([1.0]), 0, 2, np.random.default_rng(0)).any()
    many = spec.matched_load_sets(np.full(20, 0.05), 3, 4, np.random.default_rng(0))  # permutation prefixes
    assert not many[:, 3].any() and (many.sum(axis=1) == 1).all()
