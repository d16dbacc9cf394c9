"""Loss functions of the MoE models, as pure functions of tensors.

Every function here is differentiable where the paper's loss is, keeps no state, and works on any
leading batch dimensions (the ablation pass adds one), so the models and the train stage share them.
"""

from __future__ import annotations

from typing import Any

import torch

#: Distances below sqrt(MIN_SQUARED_DISTANCE) are clamped before the square root: the derivative of
#: sqrt at 0 is infinite, and two identical embeddings of different keys happen (e.g. duplicate texts).
MIN_SQUARED_DISTANCE = 1e-12


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Router arithmetic precision: half types become float32, float32 and float64 stay as they are."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def switch_load_balancing_loss(router_probs: torch.Tensor, expert_index: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch Transformer load-balancing loss, generalised to top-k as in transformers' Mixtral.

    ``E * sum_i f_i * P_i`` (Fedus et al. 2021, arXiv 2101.03961, eqs. 4-6), where ``f_i`` is the
    fraction of tokens whose selected set contains expert ``i`` (not differentiable) and ``P_i`` the
    mean router probability of ``i`` (differentiable: the only path by which the loss moves the router).
    With top-k selection ``sum_i f_i = k``, so the loss is ``k`` under perfect balance and approaches
    ``E`` under collapse, exactly as ``transformers.models.mixtral.modeling_mixtral.load_balancing_loss_func``
    for a single layer without attention mask.

    Parameters
    ----------
    router_probs : Tensor of shape (..., n_experts)
        Softmax router probabilities of every token (all leading dimensions are tokens).
    expert_index : LongTensor of shape (..., k)
        The experts selected for each token, same leading dimensions as ``router_probs``.
    n_experts : int
        Number of experts E.

    Returns
    -------
    Tensor of shape ()
    """
    probs = at_least_float32(router_probs.reshape(-1, n_experts))  # (T, E)
    selected = expert_index.reshape(probs.shape[0], -1)  # (T, k)
    # scatter_add instead of bincount: bincount reads its maximum back to the host.
    counts = torch.zeros(n_experts, dtype=probs.dtype, device=probs.device)
    counts = counts.scatter_add(0, selected.reshape(-1), torch.ones_like(selected, dtype=probs.dtype).reshape(-1))
    dispatch_fraction = counts / probs.shape[0]  # (E,) f_i
    mean_probability = probs.mean(dim=0)  # (E,) P_i
    return n_experts * torch.sum(dispatch_fraction * mean_probability)


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss of ST-MoE (Zoph et al. 2022, arXiv 2202.08906, eq. 5).

    ``mean_t (log sum_j exp l_{t,j})^2``: keeps router logits small so the softmax stays in the range
    where fp32 (and bf16) rounding does not change the routing.

    Parameters
    ----------
    router_logits : Tensor of shape (..., n_experts)
        Logits of every token; entries of -inf (masked experts) are allowed while one stays finite.

    Returns
    -------
    Tensor of shape ()
    """
    log_partition = torch.logsumexp(at_least_float32(router_logits), dim=-1)  # (...,)
    return torch.mean(log_partition**2)


def positive_pair_mask(keys: torch.Tensor) -> torch.Tensor:
    """Which pairs of a batch are positives: those whose keys agree in every column.

    Passing ``(domain, label)`` as two columns makes label 0 of one dataset and label 0 of another a
    negative pair; the earlier pipeline compared raw labels and silently merged them.

    Parameters
    ----------
    keys : LongTensor of shape (batch,) or (batch, n_key_columns)

    Returns
    -------
    BoolTensor of shape (batch, batch)
    """
    if keys.dim() == 1:
        keys = keys.unsqueeze(-1)
    return (keys.unsqueeze(1) == keys.unsqueeze(0)).all(dim=-1)  # (B, B)


def contrastive_margin_loss(embeddings: torch.Tensor, positive: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Margin contrastive loss over all ordered pairs of a batch (Hadsell, Chopra & LeCun 2006, eq. 4).

    ``mean_{i != j} [ s_ij d_ij^2 + (1 - s_ij) max(0, margin - d_ij)^2 ]`` with ``d_ij`` the Euclidean
    distance. The diagonal (always a positive at distance 0) is left out of the mean; the earlier
    pipeline included it, which only rescales the loss by (B - 1) / B.

    Parameters
    ----------
    embeddings : Tensor of shape (..., batch, dim)
        Leading dimensions (e.g. one per ablation) are independent batches sharing ``positive``.
    positive : BoolTensor of shape (batch, batch)
        ``positive_pair_mask`` of the batch's keys.
    margin : float
        Negatives farther apart than this cost nothing.

    Returns
    -------
    Tensor of shape ()
        Mean over leading dimensions and off-diagonal pairs.
    """
    batch = embeddings.shape[-2]
    if batch < 2:
        raise ValueError(f"contrastive loss needs at least 2 samples in a batch, got {batch}")
    return _ContrastiveMarginLoss.apply(embeddings, positive, margin)


def contrastive_forward(
    embeddings: torch.Tensor, positive: torch.Tensor, margin: float
) -> tuple[torch.Tensor, tuple[Any, ...]]:
    """``contrastive_margin_loss`` without autograd, and what ``contrastive_backward`` needs.

    With ``l_ij`` the pair loss, its slope ``dl/d(d_ij^2)`` is 1 for a positive and
    ``-max(0, margin - d) / d`` for a negative; it is computed here, beside the loss. Negatives
    closer than ``sqrt(MIN_SQUARED_DISTANCE)`` get no gradient (sqrt's pole; the loss is flat in
    the direction that separates two identical points anyway).

    Returns
    -------
    loss : Tensor of shape ()
    saved : tuple
        For ``contrastive_backward``.
    """
    embeddings = at_least_float32(embeddings)  # a loss: float32 at least, outside autocast
    pairs = embeddings.numel() // embeddings.shape[-1] * (embeddings.shape[-2] - 1)  # ordered off-diagonal pairs
    # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b: (B, B) work instead of a (B, B, dim) difference tensor.
    if torch.is_autocast_enabled(embeddings.device.type):
        with torch.autocast(embeddings.device.type, enabled=False):
            gram = embeddings @ embeddings.transpose(-1, -2)  # (..., B, B)
    else:  # entering the context costs more than the product at training batch sizes
        gram = embeddings @ embeddings.transpose(-1, -2)
    loss, slope, slope_sum = _contrastive_pairs(gram, positive, margin)
    return loss / pairs, (embeddings.detach(), slope, slope_sum, 1.0 / pairs)


def _contrastive_pairs(
    gram: torch.Tensor, positive: torch.Tensor, margin: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum of the pair losses, their slopes dl/d(d^2) and the slopes' row sums, from ``e e^T``."""
    squared_norm = gram.diagonal(dim1=-2, dim2=-1)  # (..., B)
    # The clamp removes the small negative values cancellation can leave.
    squared_distance = (gram * -2.0).add_(squared_norm.unsqueeze(-1)).add_(squared_norm.unsqueeze(-2)).clamp_min_(0.0)
    distance = squared_distance.clamp_min(MIN_SQUARED_DISTANCE).sqrt_()
    shortfall = distance.neg().add_(margin).relu_()  # max(0, margin - d)
    pair_loss = torch.where(positive, squared_distance, shortfall.square())  # (..., B, B)
    pair_loss.diagonal(dim1=-2, dim2=-1).zero_()
    negative_slope = (shortfall / distance).masked_fill_(squared_distance < MIN_SQUARED_DISTANCE, 0.0)
    slope = torch.where(positive, 1.0, negative_slope.neg_())
    slope.diagonal(dim1=-2, dim2=-1).zero_()
    return pair_loss.sum(), slope, slope.sum(dim=-1)


def contrastive_backward(saved: tuple[Any, ...], grad_loss: torch.Tensor | float) -> torch.Tensor:
    """Gradient of ``contrastive_margin_loss`` with respect to the embeddings.

    ``d(d_ij^2)/de_i = 2 (e_i - e_j)``; summed over both orders of each pair, the gradient is
    ``4 c (rowsum(C) e - C e)`` with ``C`` the slopes and ``c`` the mean's scale.

    Parameters
    ----------
    saved : tuple
        From ``contrastive_forward``.
    grad_loss : float or Tensor of shape ()
        dL/d(loss).
    """
    embeddings, slope, slope_sum, scale = saved
    grad = torch.matmul(slope, embeddings).sub_(slope_sum.unsqueeze(-1) * embeddings)
    return grad.mul_(grad_loss * (-4.0 * scale))


class _ContrastiveMarginLoss(torch.autograd.Function):
    """``contrastive_margin_loss`` as one autograd node (about thirty op by op)."""

    @staticmethod
    def forward(ctx, embeddings, positive, margin):
        loss, saved = contrastive_forward(embeddings, positive, margin)
        ctx.save_for_backward(*saved[:-1])
        ctx.scale = saved[-1]
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        saved = (*ctx.saved_tensors, ctx.scale)
        return contrastive_backward(saved, grad_loss.to(saved[0].dtype)), None, None
