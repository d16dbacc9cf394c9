"""Router metrics against hand computations: domain losses, gain recovered, paired bootstrap, ECE, confusion."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix

from moespec.specialisation import adapter_routing as metrics


def _texts(seed=0, n=30):
    rng = np.random.default_rng(seed)
    domain = np.repeat(np.arange(2), n // 2)
    tokens = rng.integers(5, 20, size=n).astype(float)
    base = tokens * 3.0
    oracle = tokens * 2.0
    half = np.where(rng.random(n) < 0.5, oracle, base)  # right on about half of the texts
    return np.stack([base, oracle, half]), tokens, domain


def test_domain_losses_are_token_weighted_means():
    nll, tokens, domain = _texts()
    losses = metrics.domain_losses(nll, tokens, domain, 3)
    for d in range(2):
        inside = domain == d
        np.testing.assert_allclose(losses[:, d], nll[:, inside].sum(1) / tokens[inside].sum())
    assert np.isnan(losses[:, 2]).all()  # an empty domain


def test_gain_recovered_is_zero_for_the_base_one_for_the_oracle_and_paired_in_the_bootstrap():
    nll, tokens, domain = _texts()
    result = metrics.router_losses(
        nll, tokens, domain, 2, base_row=0, oracle_row=1, rng=np.random.default_rng(0), n_resamples=300
    )
    np.testing.assert_allclose(result.gain[:2], [0.0, 1.0])
    # Paired resamples: the oracle's gain is exactly 1 in every resample, so its interval is [1, 1].
    np.testing.assert_allclose([result.gain_low[1], result.gain_high[1]], [1.0, 1.0])
    loss = nll.sum(1) / tokens.sum()
    np.testing.assert_allclose(result.gain[2], (loss[0] - loss[2]) / (loss[0] - loss[1]))
    assert 0.0 < result.gain_low[2] <= result.gain[2] <= result.gain_high[2] < 1.0
    assert (result.domain_loss_low <= result.domain_loss).all()
    assert (result.domain_loss <= result.domain_loss_high).all()
    # The paired difference from the base: exactly 0 for the base, its interval excludes 0 for the oracle.
    np.testing.assert_array_equal(result.domain_delta[0], 0.0)
    assert (result.domain_delta_high[1] < 0).all()
    np.testing.assert_allclose(result.domain_delta, result.domain_loss - result.domain_loss[0])
    empty = metrics.router_losses(nll, tokens, domain, 2, 0, 1, rng=np.random.default_rng(0), n_resamples=0)
    assert np.isnan(empty.loss_low).all() and np.isfinite(empty.loss).all()


def test_expected_calibration_error_against_a_hand_computation():
    confidence = np.array([0.95, 0.95, 0.95, 0.95, 0.55, 0.55])
    correct = np.array([1, 1, 1, 0, 1, 0], dtype=bool)
    # two bins: (0.93.., 1.0] holds 4 texts (accuracy 0.75), (0.53.., 0.6] holds 2 (accuracy 0.5)
    expected = 4 / 6 * abs(0.75 - 0.95) + 2 / 6 * abs(0.5 - 0.55)
    assert np.isclose(metrics.expected_calibration_error(confidence, correct, 15), expected)
    assert metrics.expected_calibration_error(np.ones(4), np.array([1, 0, 1, 0], bool)) == 0.5
    assert np.isnan(metrics.expected_calibration_error(np.zeros(0), np.zeros(0, bool)))


def test_confusion_counts_match_scikit_learn():
    rng = np.random.default_rng(1)
    true, predicted = rng.integers(0, 4, 50), rng.integers(0, 4, 50)
    np.testing.assert_array_equal(
        metrics.confusion_counts(true, predicted, 4), confusion_matrix(true, predicted, labels=range(4))
    )
