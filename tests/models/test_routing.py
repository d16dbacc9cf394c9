"""The one collapse definition shared by the train and ablate stages."""

from __future__ import annotations

import numpy as np
import pytest

from moespec.specialisation.metrics import collapse_report, dead_expert_mask


def test_dead_experts_collapse_routing_even_when_no_expert_dominates():
    load = np.array([0.0, 0.0, 0.002, 0.18, 0.21, 0.29, 0.318])  # issue #18: 3 of 7 experts unused
    collapsed, reasons = collapse_report(load)
    assert collapsed
    assert reasons == ["layer 0: experts [0, 1, 2] dead (load < 0.01429)"]


def test_one_dominant_expert_collapses_routing():
    collapsed, reasons = collapse_report(np.array([[0.25, 0.25, 0.25, 0.25], [0.91, 0.03, 0.03, 0.03]]), max_share=0.9)
    assert collapsed and reasons == ["layer 1: expert 0 takes 91.0% of the rows (> 90%)"]


def test_balanced_routing_is_not_collapsed():
    assert collapse_report(np.full(7, 1 / 7)) == (False, [])
    assert collapse_report(np.array([0.05, 0.95]), max_share=0.96) == (False, [])


def test_dead_threshold_is_a_fraction_of_the_balanced_share():
    load = np.array([0.024, 0.026, 0.95])
    assert dead_expert_mask(load, 0.075).tolist() == [True, False, False]  # 0.075 / 3 = 0.025
    assert dead_expert_mask(np.stack([load, load[::-1]]), 0.075).tolist() == [
        [True, False, False],
        [False, False, True],
    ]


def test_bad_thresholds_are_rejected():
    with pytest.raises(ValueError, match="dead_threshold"):
        collapse_report(np.full(3, 1 / 3), dead_threshold=0.0)
