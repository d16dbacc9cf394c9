"""Routing: from router logits to per-expert combine weights, with the ablation hook point.

Routing is computed densely: every function returns a ``(..., E)`` weight per token and expert, zero
for experts that are not used, so a layer combines all experts with one matrix product and no
per-sample Python or data-dependent indexing (no host synchronisation, compile friendly).

Ablations follow docs/moe.md, "Ablation interventions" (A, B, C):

``"mask"``  (A) the expert's router logit is set to -inf before the softmax and top-k: tokens re-route.
``"zero"``  (B) routing is unchanged; the ablated expert's contribution is multiplied by 0.
``"drop"``  (C) the ablated expert leaves the selected set without re-routing; the remaining selected
            experts are re-weighted the way the router weights them (renormalised over what is left
            when the router renormalises, unchanged otherwise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F

from moespec.models.losses import at_least_float32

AblationMode = Literal["mask", "zero", "drop"]

#: Guards the renormalising division when every selected expert of a token was dropped (weights -> 0).
_TINY = 1e-20


@dataclass(frozen=True)
class Ablation:
    """Experts to ablate in one forward pass, and how.

    Parameters
    ----------
    experts : BoolTensor of shape (..., n_experts)
        True marks an ablated expert. It broadcasts against the router logits ``(batch, n_experts)``:
        shape ``(n_experts,)`` ablates the same experts for every sample; shape
        ``(n_ablations, 1, n_experts)`` runs ``n_ablations`` ablations in one batched pass and gives
        outputs with a leading ``n_ablations`` dimension (see ``each_expert``).
    mode : {"mask", "zero", "drop"}
        The intervention; see the module docstring.
    layer : int or None
        For models with several MoE layers, the only layer ablated (None: every layer).
    """

    experts: torch.Tensor
    mode: AblationMode = "mask"
    layer: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in get_args(AblationMode):
            raise ValueError(f"ablation mode must be one of {get_args(AblationMode)}, got {self.mode!r}")
        if self.experts.dtype != torch.bool or self.experts.dim() == 0:
            raise ValueError(
                f"ablation experts must be a bool tensor of shape (..., n_experts), "
                f"got dtype {self.experts.dtype} and shape {tuple(self.experts.shape)}"
            )
        # Checked here, on the caller's side, so that the forward pass never reads values back.
        if self.mode == "mask" and bool(self.experts.all(dim=-1).any()):
            raise ValueError("a 'mask' ablation must leave at least one expert for every row")

    @property
    def n_experts(self) -> int:
        """Number of experts the mask is written for."""
        return int(self.experts.shape[-1])

    @classmethod
    def of(cls, experts: list[int], n_experts: int, mode: AblationMode = "mask", layer: int | None = None) -> Ablation:
        """Ablate the listed experts for every sample (outputs keep their shape)."""
        mask = torch.zeros(n_experts, dtype=torch.bool)
        mask[list(experts)] = True
        return cls(mask, mode, layer)

    @classmethod
    def each_expert(cls, n_experts: int, mode: AblationMode = "mask", layer: int | None = None) -> Ablation:
        """All ``n_experts`` single-expert ablations in one pass: outputs gain a leading (n_experts,) axis."""
        return cls(torch.eye(n_experts, dtype=torch.bool).unsqueeze(1), mode, layer)  # (E, 1, E)

    def applies_to(self, layer: int) -> bool:
        """Whether this ablation acts on MoE layer ``layer``."""
        return self.layer is None or self.layer == layer


class Routing(NamedTuple):
    """The routing decision of a batch of tokens (every field has the same leading dimensions)."""

    logits: torch.Tensor  #: (..., E) router logits after any mask ablation (-inf for masked experts)
    probs: torch.Tensor  #: (..., E) softmax of ``logits``
    expert_index: torch.Tensor  #: (..., k) experts the router selected, best first
    selected: torch.Tensor  #: (..., E) bool, the router's selection (before zero/drop ablations)
    combine_weights: torch.Tensor  #: (..., E) weight of each expert's output, 0 if unused


def _broadcast_ablation(logits: torch.Tensor, ablation: Ablation) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand logits and ablation mask to their common shape (the ablation adds leading axes)."""
    if ablation.n_experts != logits.shape[-1]:
        raise ValueError(f"ablation is written for {ablation.n_experts} experts, the router has {logits.shape[-1]}")
    ablated = ablation.experts.to(logits.device, non_blocking=True)
    shape = torch.broadcast_shapes(logits.shape, ablated.shape)
    return logits.expand(shape), ablated.expand(shape)


def _ablated_logits(router_logits: torch.Tensor, ablation: Ablation | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits in at least float32 (softmax in fp32, as Switch's "selective precision" and Mixtral do;
    float64 stays float64), broadcast against the ablation, with masked experts at -inf; and the
    ablated-expert mask (None without one)."""
    logits = at_least_float32(router_logits)
    if ablation is None:
        return logits, None
    logits, ablated = _broadcast_ablation(logits, ablation)
    if ablation.mode == "mask":
        logits = logits.masked_fill(ablated, float("-inf"))
    return logits, ablated


def route_topk(
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    ablation: Ablation | None = None,
) -> Routing:
    """Top-k routing: Mixtral (renormalised) or Switch (raw probability) combine weights.

    Mixtral (Jiang et al. 2024, arXiv 2401.04088, eq. 2): softmax over all E, top-k, weights divided
    by their sum, which equals a softmax over the k selected logits. Switch (Fedus et al. 2021,
    eq. 2): weight ``p_i`` itself, not renormalised; with k = 1 renormalising would make every weight
    1 and the router would receive no gradient from the task loss.

    Parameters
    ----------
    router_logits : Tensor of shape (..., n_experts)
    top_k : int
        Experts per token.
    renormalize : bool
        Divide the selected probabilities by their sum (Mixtral) or not (Switch).
    ablation : Ablation, optional
        Experts to ablate; its leading dimensions broadcast against the logits'.

    Returns
    -------
    Routing
        Fields of shape (..., E) or (..., k); the leading shape is the broadcast of logits and ablation.
    """
    logits, ablated = _ablated_logits(router_logits, ablation)
    probs = F.softmax(logits, dim=-1)  # (..., E)
    top_probs, expert_index = probs.topk(top_k, dim=-1)  # (..., k)
    selected = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, expert_index, True)
    selected = selected & torch.isfinite(logits)  # with k > experts left, masked ones fill the top-k at p = 0
    if ablated is not None and ablation.mode != "mask":
        hit = ablated.gather(-1, expert_index)  # (..., k) selected slots holding an ablated expert
        kept_probs = top_probs.masked_fill(hit, 0.0)
        if ablation.mode == "zero":
            weights = top_probs / top_probs.sum(-1, keepdim=True) if renormalize else top_probs
            weights = weights.masked_fill(hit, 0.0)
        else:  # drop: re-weight what is left of the selected set
            weights = kept_probs / kept_probs.sum(-1, keepdim=True).clamp_min(_TINY) if renormalize else kept_probs
    else:
        weights = top_probs / top_probs.sum(-1, keepdim=True) if renormalize else top_probs  # (..., k)
    combine_weights = torch.zeros_like(probs).scatter(-1, expert_index, weights)  # (..., E)
    return Routing(logits, probs, expert_index, selected, combine_weights)


def route_dictionary(
    router_logits: torch.Tensor,
    mode: Literal["soft", "straight_through"],
    ablation: Ablation | None = None,
) -> Routing:
    """Routing of the dictionary MoE, built so that the gate is trained (docs/moe.md, "What moespec changed").

    ``"soft"``: the mixture weights are the probabilities themselves (every expert contributes).
    ``"straight_through"``: the forward pass uses the arg-max expert alone (weight 1); the backward
    pass uses the gradient of the probabilities, ``onehot + p - stopgrad(p)`` (Bengio et al. 2013,
    arXiv 1308.3432). The earlier pipeline chose its expert by Python indexing, so the gate got no
    gradient at all.

    Parameters
    ----------
    router_logits : Tensor of shape (..., n_experts)
    mode : {"soft", "straight_through"}
    ablation : Ablation, optional

    Returns
    -------
    Routing
        ``expert_index`` (..., 1) is the arg-max expert (the hard assignment in both modes).
    """
    logits, ablated = _ablated_logits(router_logits, ablation)
    probs = F.softmax(logits, dim=-1)  # (..., E)
    expert_index = probs.argmax(dim=-1, keepdim=True)  # (..., 1)
    selected = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, expert_index, True)
    if mode == "soft":
        weights = probs
    else:
        weights = selected.to(probs.dtype) + probs - probs.detach()
    if ablated is not None and ablation.mode != "mask":
        weights = weights.masked_fill(ablated, 0.0)
        if ablation.mode == "drop" and mode == "soft":
            # Renormalise the surviving mixture; a hard selection whose expert is dropped is left empty.
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(_TINY)
    return Routing(logits, probs, expert_index, selected, weights)


def expert_counts(selected: torch.Tensor) -> torch.Tensor:
    """Samples routed to each expert: the selection summed over the batch axis.

    Parameters
    ----------
    selected : BoolTensor of shape (..., batch, n_experts)
        Leading dimensions (one per ablation) are kept.

    Returns
    -------
    Tensor of shape (..., n_experts), float (a count kept on device; float so it sums without casts)
    """
    return selected.sum(dim=-2, dtype=torch.float32)


def routing_entropy(router_probs: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Per-token entropy of the routing distribution, ``-sum_e p_e log p_e`` (docs/moe.md, "Specialisation metrics").

    Parameters
    ----------
    router_probs : Tensor of shape (..., n_experts)
    normalize : bool
        Divide by ``log E`` so that 1 is uniform routing and 0 a one-hot choice.

    Returns
    -------
    Tensor of shape (...)
    """
    entropy = -torch.special.xlogy(router_probs, router_probs).sum(dim=-1)  # xlogy: 0 log 0 = 0
    n_experts = router_probs.shape[-1]
    if normalize and n_experts > 1:
        entropy = entropy / math.log(n_experts)
    return entropy
