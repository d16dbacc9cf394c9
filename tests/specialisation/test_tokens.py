"""Token-level specialisation: information measures against scikit-learn and known answers."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import mutual_info_score, normalized_mutual_info_score

from moespec.specialisation import tokens


def test_mutual_information_matches_scikit_learn():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 500)
    b = (a + rng.integers(0, 3, 500)) % 7
    assert tokens.mutual_information(a, b) == pytest.approx(mutual_info_score(a, b), abs=1e-12)
    assert tokens.normalized_mutual_information(a, b) == pytest.approx(normalized_mutual_info_score(a, b), abs=1e-12)


def synthetic(follow: str, n: int = 6000, seed: int = 0):
    """Tokens whose ids depend on the domain; experts that follow the token id or the domain."""
    rng = np.random.default_rng(seed)
    domain = rng.integers(0, 3, n)
    token = np.where(rng.random(n) < 0.6, domain * 4 + rng.integers(0, 4, n), 12 + rng.integers(0, 4, n))
    expert = token // 4 if follow == "token" else (domain + (rng.random(n) < 0.1)) % 4
    return expert, token, domain


def test_experts_that_follow_token_ids_carry_no_domain_information_beyond_them():
    expert, token, domain = synthetic("token")
    result = tokens.layer_specialisation(
        expert, token, domain, n_shuffles=20, min_count=5, rng=np.random.default_rng(1)
    )
    assert result.cmi_domain_given_token == pytest.approx(0.0, abs=1e-12)  # E is a function of V
    assert result.mi_domain > 0.01  # ... yet the experts look domain-specific: tokens differ by domain
    assert result.vocab_specialisation == pytest.approx(1.0)
    assert result.vocab_specialisation_null < 0.6
    assert result.cmi_p_value == 1.0


def test_experts_that_follow_domains_beat_the_shuffled_null():
    expert, token, domain = synthetic("domain")
    result = tokens.layer_specialisation(
        expert, token, domain, n_shuffles=20, min_count=5, rng=np.random.default_rng(1)
    )
    assert result.cmi_domain_given_token > 10 * result.cmi_null_mean
    assert result.cmi_p_value == pytest.approx(1 / 21)
    assert result.nmi_domain > result.nmi_token


def test_conditional_mutual_information_known_answer():
    # A and B independent fair bits given C; C ignored: I(A; B | C) = 0. With A = B: I = H(A | C) = ln 2.
    rng = np.random.default_rng(0)
    c = rng.integers(0, 3, 20000)
    a = rng.integers(0, 2, 20000)
    assert tokens.conditional_mutual_information(a, a, c) == pytest.approx(np.log(2), abs=1e-3)
    assert tokens.conditional_mutual_information(a, rng.integers(0, 2, 20000), c) < 1e-3


def test_shuffling_within_groups_keeps_each_group_multiset():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 5, 200)
    values = rng.integers(0, 9, 200)
    shuffled = tokens.shuffle_within_groups(values, groups, rng)
    assert not np.array_equal(shuffled, values)
    for g in range(5):
        assert sorted(shuffled[groups == g]) == sorted(values[groups == g])


def test_coactivation_router_saturation_and_domain_share():
    index = np.array([[0, 1], [0, 2], [1, 0], [3, 2]])
    co = tokens.coactivation(index, 4)
    assert co[0].tolist() == pytest.approx([0, 2 / 3, 1 / 3, 0])
    assert co[3].tolist() == pytest.approx([0, 0, 1, 0])
    assert tokens.router_saturation(index, index[:, ::-1]) == 1.0
    assert tokens.router_saturation(index, np.array([[0, 3], [1, 3], [2, 3], [0, 1]])) == pytest.approx(1 / 8)
    share = tokens.domain_expert_share(index, np.array([0, 0, 1, 1]), 2, 4)
    np.testing.assert_allclose(share, [[0.5, 0.25, 0.25, 0], [0.25, 0.25, 0.25, 0.25]])
