"""Loss functions against known answers and transformers' reference implementation."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from moespec.models.losses import (
    contrastive_margin_loss,
    positive_pair_mask,
    router_z_loss,
    switch_load_balancing_loss,
)


def _switch_loss_by_hand(probs: torch.Tensor, index: torch.Tensor, n_experts: int) -> float:
    tokens = probs.shape[0]
    total = 0.0
    for expert in range(n_experts):
        dispatch = sum(int(expert in row.tolist()) for row in index) / tokens
        total += dispatch * float(probs[:, expert].mean())
    return n_experts * total


def test_switch_loss_is_top_k_under_perfect_balance_and_near_e_under_collapse():
    n_experts, top_k = 4, 2
    uniform = torch.full((8, n_experts), 1 / n_experts)
    balanced_index = torch.tensor([[0, 1], [2, 3]] * 4)
    assert switch_load_balancing_loss(uniform, balanced_index, n_experts).item() == pytest.approx(top_k)
    collapsed = torch.tensor([[1 - 3e-6, 1e-6, 1e-6, 1e-6]]).repeat(8, 1)
    collapsed_index = torch.zeros(8, 1, dtype=torch.long)
    collapsed_loss = switch_load_balancing_loss(collapsed, collapsed_index, n_experts)
    assert collapsed_loss.item() == pytest.approx(n_experts, rel=1e-5)


def test_switch_loss_matches_the_formula_on_a_hand_example():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.1, 0.4]])
    index = probs.argmax(-1, keepdim=True)  # experts 0, 1, 0
    # f = (2/3, 1/3, 0); P = (13/30, 9/30, 8/30); 3 * (26/90 + 9/90) = 35/30
    assert switch_load_balancing_loss(probs, index, 3).item() == pytest.approx(35 / 30)
    assert switch_load_balancing_loss(probs, index, 3).item() == pytest.approx(_switch_loss_by_hand(probs, index, 3))


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_switch_loss_matches_transformers_load_balancing_loss_func(top_k):
    generator = torch.Generator().manual_seed(top_k)
    logits = torch.randn(37, 6, generator=generator) * 2
    probs = logits.softmax(-1)
    index = probs.topk(top_k, -1).indices
    ours = switch_load_balancing_loss(probs, index, 6)
    reference = load_balancing_loss_func((logits,), num_experts=6, top_k=top_k)
    torch.testing.assert_close(ours, reference.to(ours.dtype))


def test_switch_loss_gradient_reaches_only_the_probabilities():
    logits = torch.randn(10, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    probs = logits.softmax(-1)
    switch_load_balancing_loss(probs, probs.topk(2, -1).indices, 4).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_router_z_loss_known_answer_and_masked_logits():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected)
    masked = torch.tensor([[0.0, float("-inf")]])
    assert router_z_loss(masked).item() == pytest.approx(0.0)


def test_positive_pairs_by_domain_and_label_do_not_merge_label_ids_across_datasets():
    domain = torch.tensor([0, 0, 1, 1])
    label = torch.tensor([0, 1, 0, 1])
    by_label = positive_pair_mask(label)
    by_both = positive_pair_mask(torch.stack([domain, label], dim=1))
    assert by_label[0, 2]  # label 0 of dataset 0 and label 0 of dataset 1: merged by raw label ids
    assert not by_both[0, 2]
    assert torch.equal(by_both, torch.eye(4, dtype=torch.bool))
    assert torch.equal(positive_pair_mask(domain), domain[:, None] == domain[None, :])


def test_contrastive_margin_loss_known_answer():
    embeddings = torch.tensor([[0.0, 0.0], [0.3, 0.4], [3.0, 4.0]])  # d01 = 0.5, d02 = 5, d12 = 4.5
    positive = positive_pair_mask(torch.tensor([0, 0, 1]))
    margin = 1.0
    # ordered off-diagonal pairs: (0,1),(1,0) positive d^2 = 0.25; others negative beyond the margin -> 0
    expected = 2 * 0.25 / 6
    assert contrastive_margin_loss(embeddings, positive, margin).item() == pytest.approx(expected)
    close_negative = positive_pair_mask(torch.tensor([0, 1, 2]))
    expected_negative = 2 * (margin - 0.5) ** 2 / 6
    assert contrastive_margin_loss(embeddings, close_negative, margin).item() == pytest.approx(expected_negative)


def _contrastive_reference(embeddings, positive, margin):
    """The loss op by op, differentiated by autograd."""
    distance = torch.cdist(embeddings, embeddings)
    pair_loss = torch.where(positive, distance**2, torch.relu(margin - distance) ** 2)
    batch = embeddings.shape[-2]
    return (pair_loss * (1 - torch.eye(batch, dtype=embeddings.dtype))).sum() / (
        pair_loss.numel() / batch * (batch - 1)
    )


@pytest.mark.parametrize("shape", [(12, 5), (3, 12, 5)])
def test_contrastive_loss_gradient_equals_autograd_of_the_formula(shape):
    generator = torch.Generator().manual_seed(0)
    embeddings = (0.3 * torch.randn(*shape, generator=generator, dtype=torch.float64)).requires_grad_()
    positive = positive_pair_mask(torch.arange(12) % 3)
    loss = contrastive_margin_loss(embeddings, positive, 1.0)
    expected = _contrastive_reference(embeddings, positive, 1.0)
    torch.testing.assert_close(loss, expected)
    distance = torch.cdist(embeddings, embeddings)
    assert ((distance < 1.0) & ~positive).any() and ((distance > 1.0) & ~positive).any()  # both regimes
    (ours,) = torch.autograd.grad(loss, embeddings)
    (reference,) = torch.autograd.grad(expected, embeddings)
    torch.testing.assert_close(ours, reference)


def test_contrastive_loss_has_finite_gradients_for_identical_negatives_and_broadcasts():
    embeddings = torch.zeros(2, 4, 3, requires_grad=True)  # two "ablations", all points identical
    positive = positive_pair_mask(torch.tensor([0, 1, 2, 3]))
    loss = contrastive_margin_loss(embeddings, positive, 1.0)
    loss.backward()
    assert loss.item() == pytest.approx(1.0, rel=1e-5)
    assert torch.isfinite(embeddings.grad).all()
    with pytest.raises(ValueError, match="at least 2"):
        contrastive_margin_loss(torch.zeros(1, 3), torch.ones(1, 1, dtype=torch.bool))
