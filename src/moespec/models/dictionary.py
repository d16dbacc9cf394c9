"""Dictionary-expert MoE: the stratified-manifold model of Li & Sarwate (arXiv 2502.13577), made trainable.

Each expert e is an unrolled LISTA encoder (Gregor & LeCun 2010, "Learning Fast Approximations of
Sparse Coding", eq. 3) with its own dictionary D_e and sparsity level k_e::

    z_0 = 0,   z_{t+1} = shrink_e(W_t x + S_t z_t),   x_hat_e = D_e z_L

An attention-style gate scores the experts, ``p = softmax(W_q x K^T / sqrt(q))``; the combined code
``sum_e w_e z_e`` goes through a projection head trained with a margin contrastive loss.

Differences from the earlier public implementation (docs/moe.md, "Defects of the earlier pipeline"
and "What moespec changed"), which gave the gate and the dictionaries no gradient:

* routing is differentiable (soft mixture, or straight-through hard selection) and a Switch
  load-balancing term keeps it from collapsing;
* the reconstruction loss ``sum_e w_e ||x - D_e z_e||^2`` trains every dictionary it routes to;
* positives of the contrastive loss are chosen by key (label, domain or both), never raw label ids.

All experts are stored as stacked tensors and run together: no loop over experts or samples.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moespec.models import kernels
from moespec.models.layers import init_linear_, new_linear
from moespec.models.lista import LISTAExperts, Shrinkage, lista_backward, lista_forward
from moespec.models.losses import (
    MIN_SQUARED_DISTANCE,
    contrastive_backward,
    contrastive_forward,
    contrastive_margin_loss,
    positive_pair_mask,
    switch_load_balancing_loss,
)
from moespec.models.routing import Ablation, expert_counts, route_dictionary


class HeadWeights(NamedTuple):
    """The parameters after the experts: gate query and keys, dictionaries, projection head."""

    query_weight: torch.Tensor  # (q, d)
    query_bias: torch.Tensor  # (q,)
    keys: torch.Tensor  # (E, q)
    dictionary: torch.Tensor  # (E, d, m)
    w1: torch.Tensor  # (H, m)
    b1: torch.Tensor  # (H,)
    w2: torch.Tensor  # (P, H)
    b2: torch.Tensor  # (P,)


class HeadState(NamedTuple):
    """``head_forward``'s outputs, kept for ``head_backward``. Samples are columns (N last)."""

    query: torch.Tensor  # (q, N)
    logits: torch.Tensor  # (E, N)
    probs: torch.Tensor  # (E, N)
    expert_index: torch.Tensor  # (N,)
    selected: torch.Tensor  # (E, N) bool, one-hot of expert_index
    weights: torch.Tensor  # (E, N) combine weights
    code: torch.Tensor  # (m, N)
    hidden: torch.Tensor  # (H, N)
    embedding: torch.Tensor  # (N, P)
    residual: torch.Tensor  # (E, d, N) D_e z_e - x
    error: torch.Tensor  # (E, N) ||x - D_e z_e||^2
    dispatch_fraction: torch.Tensor  # (E,) f_e
    reconstruction_loss: torch.Tensor  # ()
    balance_loss: torch.Tensor  # ()


def head_forward(x: torch.Tensor, codes: torch.Tensor, weights: HeadWeights, straight_through: bool) -> HeadState:
    """Everything after the experts' codes: gate, routing, mixture, projection, reconstruction, balance.

    With ``w`` the combine weights (``p`` for soft routing, ``onehot(argmax p)`` for straight-through)::

        p = softmax(s K (Wq x + bq)),   c = sum_e w_e z_e,   y = W2 relu(W1 c + b1) + b2
        r_e = D_e z_e - x,   recon = mean_b sum_e w_be |r_eb|^2,   balance = E sum_e f_e mean_b p_be

    Parameters
    ----------
    x : Tensor of shape (N, d)
    codes : Tensor of shape (E, m, N)
        The experts' last codes, as columns.
    weights : HeadWeights
    straight_through : bool
        Hard arg-max combine weights (else the soft mixture).
    """
    xt = x.t()  # (d, N)
    query = torch.addmm(weights.query_bias.unsqueeze(-1), weights.query_weight, xt)  # (q, N)
    logits = torch.mm(weights.keys, query).mul_(1.0 / math.sqrt(weights.keys.shape[1]))  # (E, N)
    probs, expert_index, selected, combine, code, dispatch_fraction, balance_loss = _route(
        logits, codes, straight_through
    )
    hidden = torch.addmm(weights.b1.unsqueeze(-1), weights.w1, code).relu_()  # (H, N)
    embedding = torch.addmm(weights.b2, hidden.t(), weights.w2.t())  # (N, P)
    residual = torch.bmm(weights.dictionary, codes)  # (E, d, N) D_e z_e, minus x below
    error, reconstruction_loss = _reconstruction_error_(residual, xt, combine)
    return HeadState(
        query,
        logits,
        probs,
        expert_index,
        selected,
        combine,
        code,
        hidden,
        embedding,
        residual,
        error,
        dispatch_fraction,
        reconstruction_loss,
        balance_loss,
    )


def _route(logits: torch.Tensor, codes: torch.Tensor, straight_through: bool) -> tuple[torch.Tensor, ...]:
    """Probabilities, arg-max, its one-hot, combine weights, mixed code (m, N), f_e and balance loss."""
    n_experts, batch = logits.shape
    probs = torch.softmax(logits, dim=0)
    expert_index = probs.argmax(dim=0)  # (N,)
    selected = torch.zeros_like(probs, dtype=torch.bool).scatter_(0, expert_index.unsqueeze(0), True)
    combine = selected.to(probs.dtype) if straight_through else probs  # (E, N)
    code = (codes * combine.unsqueeze(1)).sum(0)  # (m, N)
    dispatch_fraction = selected.sum(1, dtype=probs.dtype) / batch  # (E,)
    balance_loss = n_experts * torch.dot(dispatch_fraction, probs.mean(1))
    return probs, expert_index, selected, combine, code, dispatch_fraction, balance_loss


def _reconstruction_error_(
    residual: torch.Tensor, xt: torch.Tensor, combine: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Subtract x from ``residual`` (E, d, N) in place; return ``|residual|^2`` (E, N) and its
    combine-weighted mean over samples."""
    batch = xt.shape[1]
    error = residual.sub_(xt).square().sum(1)
    return error, torch.mul(combine, error).sum() / batch


def head_backward(
    x: torch.Tensor,
    codes: torch.Tensor,
    weights: HeadWeights,
    state: HeadState,
    grad_embedding: torch.Tensor | None,
    reconstruction: Any,
    balance: Any,
    grads: dict[str, torch.Tensor | None],
    grad_codes: torch.Tensor,
) -> None:
    """Accumulate the gradients of ``head_forward`` into ``grads`` and write dL/dcodes.

    The straight-through gradient of the combine weights is that of ``p`` (``onehot + p -
    stopgrad(p)``), so both routings share ``dL/dp_be = dL/dw_be (+ the balance term)``; ``f`` (the
    share of rows whose arg-max is e) has no gradient, as in Switch. ``state.residual`` is
    overwritten.

    Parameters
    ----------
    x, codes, weights : as for ``head_forward``
    state : HeadState
    grad_embedding : Tensor of shape (N, P), or None
    reconstruction, balance : float, Tensor of shape (), or None
        dL/d(reconstruction_loss) and dL/d(balance_loss); None where the loss is not used.
    grads : dict
        Buffers to add to, keyed by the ``HeadWeights`` field names and ``"x"`` (N, d); a missing
        key or None skips that gradient.
    grad_codes : Tensor of shape (E, m, N)
        Receives dL/dcodes (overwritten).
    """
    grad_code = None if grad_embedding is None else _projection_backward(weights, state, grad_embedding, grads)
    grad_residual, grad_logits = _route_backward(codes, weights, state, grad_code, reconstruction, balance, grad_codes)
    if grad_residual is not None:
        if grads.get("dictionary") is not None:
            grads["dictionary"].baddbmm_(grad_residual, codes.transpose(1, 2))  # (E, d, m)
        grad_codes.baddbmm_(weights.dictionary.transpose(1, 2), grad_residual)
    if grad_logits is not None:
        _add_matmul(grads.get("keys"), grad_logits, state.query.t())
        grad_query = torch.mm(weights.keys.t(), grad_logits)  # (q, N)
        _add_matmul(grads.get("query_weight"), grad_query, x)
        _add_sum(grads.get("query_bias"), grad_query, 1)
        _add_matmul(grads.get("x"), grad_query.t(), weights.query_weight)
    if grads.get("x") is not None and grad_residual is not None:
        grads["x"].sub_(grad_residual.sum(0).t())


def _projection_backward(
    weights: HeadWeights, state: HeadState, grad_embedding: torch.Tensor, grads: dict[str, torch.Tensor | None]
) -> torch.Tensor:
    """Accumulate the projection head's gradients; return dL/dcode (m, N)."""
    _add_matmul(grads.get("w2"), grad_embedding.t(), state.hidden.t())
    _add_sum(grads.get("b2"), grad_embedding, 0)
    grad_hidden = torch.mm(weights.w2.t(), grad_embedding.t()).mul_(state.hidden > 0)  # (H, N)
    _add_matmul(grads.get("w1"), grad_hidden, state.code.t())
    _add_sum(grads.get("b1"), grad_hidden, 1)
    return torch.mm(weights.w1.t(), grad_hidden)


def _route_backward(
    codes: torch.Tensor,
    weights: HeadWeights,
    state: HeadState,
    grad_code: torch.Tensor | None,
    reconstruction: Any,
    balance: Any,
    grad_codes: torch.Tensor,
) -> tuple[torch.Tensor | None, ...]:
    """Routing backward: dL/dcodes from the mixture, dL/dresidual, dL/dlogits; any term may be absent (None).

    Returns dL/dresidual (E, d, N) and dL/dlogits (E, N), each None when nothing reaches it.
    """
    n_experts, batch = state.probs.shape
    grad_weights = grad_residual = None
    if grad_code is not None:
        torch.mul(state.weights.unsqueeze(1), grad_code, out=grad_codes)  # (E, m, N)
        grad_weights = (codes * grad_code).sum(1)  # (E, N)
    else:
        grad_codes.zero_()
    if reconstruction is not None:
        grad_residual = state.residual.mul_(state.weights.unsqueeze(1) * (2.0 / batch * reconstruction))
        from_error = state.error * (reconstruction / batch)
        grad_weights = from_error if grad_weights is None else grad_weights.add_(from_error)
    if balance is not None:
        from_balance = (state.dispatch_fraction * (balance * n_experts / batch)).unsqueeze(1)  # (E, 1)
        grad_weights = from_balance.expand_as(state.probs) if grad_weights is None else grad_weights.add_(from_balance)
    if grad_weights is None:
        return grad_residual, None
    grad_logits = torch._softmax_backward_data(grad_weights, state.probs, 0, state.probs.dtype)
    return grad_residual, grad_logits.mul_(1.0 / math.sqrt(weights.keys.shape[1]))


def _add_matmul(into: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> None:
    if into is not None:
        into.addmm_(a, b)


def _add_sum(into: torch.Tensor | None, values: torch.Tensor, dim: int) -> None:
    if into is not None:
        into.add_(values.sum(dim))


class GatedDictionaryHead(torch.autograd.Function):
    """``head_forward`` as one autograd node with ``head_backward`` as its backward (about fifty
    nodes op by op, each costing more in dispatch than in arithmetic on this model's small matrices).

    Differentiable outputs: ``embedding`` (N, P), ``reconstruction_loss``, ``balance_loss``,
    ``aux_loss``. The routing tensors returned beside them, samples first, are not differentiable.
    """

    @staticmethod
    def forward(ctx, x, codes, straight_through, reconstruction_weight, balance_weight, *head_weights):
        ctx.set_materialize_grads(False)
        if torch.is_autocast_enabled(x.device.type):  # the experts ran in low precision; this part is small
            x, codes = x.float(), codes.float()
        weights = HeadWeights(*head_weights)
        with torch.autocast(x.device.type, enabled=False):
            state = head_forward(x, codes, weights, straight_through)
            aux_loss = reconstruction_weight * state.reconstruction_loss + balance_weight * state.balance_loss
        ctx.save_for_backward(x, codes, *weights, *state)
        ctx.loss_weights = (reconstruction_weight, balance_weight)
        routing = (
            state.logits.t(),
            state.probs.t(),
            state.weights.t(),
            state.expert_index.unsqueeze(-1),
            state.selected.t(),
            state.code.t(),
            state.error.t(),
        )
        ctx.mark_non_differentiable(*routing)
        return (state.embedding, state.reconstruction_loss, state.balance_loss, aux_loss, *routing)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_embedding, grad_reconstruction, grad_balance, grad_aux, *_):
        x, codes, *saved = ctx.saved_tensors
        weights, state = HeadWeights(*saved[: len(HeadWeights._fields)]), HeadState(*saved[len(HeadWeights._fields) :])
        reconstruction_weight, balance_weight = ctx.loss_weights
        needed = ctx.needs_input_grad[:1] + ctx.needs_input_grad[5:]  # x and the head weights
        grads = {
            name: torch.zeros_like(value) if need else None
            for name, value, need in zip(("x", *HeadWeights._fields), (x, *weights), needed)
        }
        grad_codes = torch.empty_like(codes)
        with torch.autocast(x.device.type, enabled=False):
            head_backward(
                x,
                codes,
                weights,
                state,
                grad_embedding,
                _sum_grads(grad_reconstruction, grad_aux, reconstruction_weight),
                _sum_grads(grad_balance, grad_aux, balance_weight),
                grads,
                grad_codes,
            )
        return (grads["x"], grad_codes, None, None, None, *(grads[name] for name in HeadWeights._fields))


def _sum_grads(direct, through_aux, weight: float):
    """Gradient reaching one loss: directly and through ``aux_loss = ... + weight * loss``."""
    if through_aux is None:
        return direct
    return through_aux * weight if direct is None else direct + through_aux * weight


class AttentionGate(nn.Module):
    """Attention-style gate: query ``W_q x + b`` against E learned keys, scaled by sqrt(q).

    Parameters
    ----------
    input_dim, query_dim, n_experts : int
    """

    def __init__(self, input_dim: int, query_dim: int, n_experts: int):
        super().__init__()
        self.query_dim = query_dim
        self.query = new_linear(input_dim, query_dim)
        self.keys = nn.Parameter(torch.empty(n_experts, query_dim))

    def reset_parameters(self, generator: torch.Generator) -> None:
        init_linear_(self.query, generator)
        nn.init.xavier_uniform_(self.keys, generator=generator)  # as the earlier pipeline

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits: x (..., input_dim) -> (..., n_experts)."""
        return F.linear(self.query(x), self.keys) * (1.0 / math.sqrt(self.query_dim))


class DictionaryMoE(nn.Module):
    """Mixture of LISTA dictionary experts with an attention gate and a contrastive projection head.

    Parameters
    ----------
    input_dim : int
    sparsity_levels : list of int
        k_e per expert; its length is the number of experts E.
    query_dim, code_dim, n_layers : int
        Gate query width q, code width m, unrolled LISTA layers L.
    shrinkage : {"topk", "soft"}
    soft_threshold_init : float
    routing : {"soft", "straight_through"}
        See ``route_dictionary``.
    projection_hidden, projection_dim : int
        Widths of the projection head ``m -> hidden -> ReLU -> projection_dim``.
    margin : float
        Margin of the contrastive loss.
    contrastive_weight, reconstruction_weight, balance_loss_weight : float
        Weights of the loss terms.
    """

    #: How the train stage scores held-out rows (``moespec.models.rows.ACCURACY``).
    accuracy_kind = "nearest_train_centroid"
    #: One routing decision per input.
    n_moe_layers = 1

    def __init__(
        self,
        input_dim: int,
        sparsity_levels: list[int],
        query_dim: int = 128,
        code_dim: int = 32,
        n_layers: int = 5,
        shrinkage: Shrinkage = "topk",
        soft_threshold_init: float = 0.1,
        routing: Literal["soft", "straight_through"] = "soft",
        projection_hidden: int = 32,
        projection_dim: int = 64,
        margin: float = 1.0,
        contrastive_weight: float = 1.0,
        reconstruction_weight: float = 1.0,
        balance_loss_weight: float = 0.01,
    ):
        super().__init__()
        self.input_dim, self.n_experts, self.routing = input_dim, len(sparsity_levels), routing
        self.margin = margin
        self.contrastive_weight = contrastive_weight
        self.reconstruction_weight = reconstruction_weight
        self.balance_loss_weight = balance_loss_weight
        self.gate = AttentionGate(input_dim, query_dim, self.n_experts)
        self.experts = LISTAExperts(input_dim, code_dim, n_layers, sparsity_levels, shrinkage, soft_threshold_init)
        self.projection = nn.Sequential(
            new_linear(code_dim, projection_hidden), nn.ReLU(), new_linear(projection_hidden, projection_dim)
        )

    def reset_parameters(self, generator: torch.Generator) -> None:
        self.gate.reset_parameters(generator)
        self.experts.reset_parameters(generator)
        init_linear_(self.projection[0], generator)
        init_linear_(self.projection[2], generator)

    def forward(
        self, x: torch.Tensor, ablation: Ablation | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Embed, route and reconstruct a batch.

        Parameters
        ----------
        x : Tensor of shape (batch, input_dim)
        ablation : Ablation, optional
            Leading dimensions of its mask become leading dimensions of every routed output.

        Returns
        -------
        embedding : Tensor of shape (..., batch, projection_dim)
            Projection of the combined code; the input of the contrastive loss.
        aux : dict
            ``router_logits``, ``router_probs``, ``combine_weights`` (..., batch, E);
            ``expert_index`` (..., batch, 1) the arg-max (hard) assignment; ``expert_counts`` (..., E);
            ``codes`` (batch, E, m) every expert's code; ``code`` (..., batch, m) the combined code;
            ``reconstruction_error`` (batch, E) ``||x - D_e z_e||^2``; ``reconstruction_loss`` ()
            its mean under the combine weights; ``balance_loss`` () the Switch loss of the arg-max
            assignment; ``aux_loss`` () the weighted sum of those two.

            Without an ablation, everything after the experts runs as one fused autograd node
            (``GatedDictionaryHead``): the embedding and the three losses are differentiable, the
            routing tensors (logits, probabilities, weights, ``code``) are not. With one, every
            output is computed op by op under autograd.
        """
        self._check_input(x)
        if ablation is not None:
            return self._forward_autograd(x, ablation)
        codes = self.experts.encode(x)  # (E, m, B)
        (
            embedding,
            reconstruction_loss,
            balance_loss,
            aux_loss,
            logits,
            probs,
            weights,
            expert_index,
            selected,
            code,
            reconstruction_error,
        ) = GatedDictionaryHead.apply(
            x,
            codes,
            self.routing == "straight_through",
            self.reconstruction_weight,
            self.balance_loss_weight,
            *self._head_weights(),
        )
        return embedding, _aux_outputs(
            router_logits=logits,
            router_probs=probs,
            combine_weights=weights,
            expert_index=expert_index,
            selected=selected,
            codes=codes,
            code=code,
            reconstruction_error=reconstruction_error,
            reconstruction_loss=reconstruction_loss,
            balance_loss=balance_loss,
            aux_loss=aux_loss,
        )

    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.input_dim:
            raise ValueError(f"input has dimension {x.shape[-1]}, the model was built for {self.input_dim}")

    def _head_weights(self) -> HeadWeights:
        query, hidden, output = self.gate.query, self.projection[0], self.projection[2]
        return HeadWeights(
            query.weight,
            query.bias,
            self.gate.keys,
            self.experts.dictionary,
            hidden.weight,
            hidden.bias,
            output.weight,
            output.bias,
        )

    def _forward_autograd(
        self, x: torch.Tensor, ablation: Ablation | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``forward`` op by op under autograd: the reference of the fused head, and the ablation path."""
        router_logits = self.gate(x)  # (B, E)
        routing = route_dictionary(router_logits, self.routing, ablation)  # (..., B, E)
        weights = routing.combine_weights.to(x.dtype)
        codes = self.experts.encode(x)  # (E, m, B)
        code = torch.einsum("...be,emb->...bm", weights, codes)  # (..., B, m)
        embedding = self.projection(code)  # (..., B, P)
        reconstruction = torch.bmm(self.experts.dictionary, codes)  # (E, d, B)
        reconstruction_error = (x.t() - reconstruction).pow(2).sum(1).t()  # (B, E)
        # Weighting by the routing makes the gate prefer experts that reconstruct x well (soft: through
        # p; straight-through: through the surrogate gradient) and trains each routed dictionary.
        reconstruction_loss = (weights * reconstruction_error).sum(-1).mean()
        balance_loss = switch_load_balancing_loss(routing.probs, routing.expert_index, self.n_experts)
        aux_loss = self.reconstruction_weight * reconstruction_loss + self.balance_loss_weight * balance_loss
        return embedding, _aux_outputs(
            router_logits=routing.logits,
            router_probs=routing.probs,
            combine_weights=routing.combine_weights,
            expert_index=routing.expert_index,
            selected=routing.selected,
            codes=codes,
            code=code,
            reconstruction_error=reconstruction_error,
            reconstruction_loss=reconstruction_loss,
            balance_loss=balance_loss,
            aux_loss=aux_loss,
        )

    def loss_terms(
        self, output: torch.Tensor, aux: dict[str, torch.Tensor], targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The training objective, term by term.

        Parameters
        ----------
        output : Tensor of shape (..., batch, projection_dim)
            Embeddings from ``forward``.
        aux : dict
            From ``forward``.
        targets : LongTensor of shape (batch,) or (batch, n_key_columns)
            Contrastive keys: pairs whose keys agree in every column are positives.

        Returns
        -------
        dict
            ``contrastive``, ``reconstruction``, ``balance`` and ``total`` (weighted sum), shape ().
        """
        contrastive = contrastive_margin_loss(output, positive_pair_mask(targets), self.margin)
        return {
            "contrastive": contrastive,
            "reconstruction": aux["reconstruction_loss"],
            "balance": aux["balance_loss"],
            "total": self.contrastive_weight * contrastive + aux["aux_loss"],
        }

    def accumulate_gradients(
        self, x: torch.Tensor, targets: torch.Tensor, scale: float = 1.0
    ) -> dict[str, torch.Tensor]:
        """One training batch without autograd: the loss terms, and ``scale`` times the gradient of
        ``total`` added to every parameter's ``.grad`` (created as zeros where it is None).

        The same computation as ``forward`` + ``loss_terms`` + ``backward`` (tested to agree), minus
        the autograd graph. On CPU in float32/64 the LISTA recursion, its backward, and the whole
        head forward and backward are three compiled calls (``moespec.models.kernels``); elsewhere
        the torch functions the autograd nodes use. At the default sizes and batch 64 on a 2-core
        CPU a step's dispatch and bookkeeping had cost more than its arithmetic (about 400 us of
        overhead beside 410 us of matrix products). Not for autocast: the train stage takes this
        path only without it.

        Parameters
        ----------
        x : Tensor of shape (batch, input_dim)
        targets : LongTensor of shape (batch,) or (batch, n_key_columns)
            Contrastive keys, as for ``loss_terms``.
        scale : float
            Multiplies the gradient (1 / the number of accumulated batches).

        Returns
        -------
        dict
            As ``loss_terms``, detached.
        """
        self._check_input(x)
        experts, weights = self.experts, self._head_weights()
        soft = experts.raw_threshold is not None
        grads = {name: _grad_buffer(parameter) for name, parameter in zip(HeadWeights._fields, weights)}
        loss_weights = (
            self.contrastive_weight * scale,
            self.reconstruction_weight * scale,
            self.balance_loss_weight * scale,
        )
        with torch.no_grad():
            thresholds = experts.thresholds() if soft else None
            codes = lista_forward(x, experts.encoder, experts.lateral, experts.sparsity, thresholds)  # (L, E, m, B)
            grad_pre = torch.empty_like(codes)  # dL/du_t of every LISTA step; the last one from the head
            positive = positive_pair_mask(targets)
            # (`None in grads.values()` would compare tensors with None: 20 us each)
            if kernels.fused(codes) and all(grad is not None for grad in grads.values()):
                losses = self._head_step(x, codes[-1], positive, weights, grads, loss_weights, grad_pre[-1])
            else:
                losses = self._head_step_torch(x, codes[-1], positive, weights, grads, loss_weights, grad_pre[-1])
            lista_grads = {
                "encoder": _grad_buffer(experts.encoder),
                "lateral": _grad_buffer(experts.lateral),
                "thresholds": torch.zeros_like(thresholds) if soft else None,
            }
            lista_backward(x, experts.encoder, experts.lateral, codes, grad_pre, soft, lista_grads)
            if soft and experts.raw_threshold.requires_grad:  # through theta = softplus(raw)
                _grad_buffer(experts.raw_threshold).addcmul_(
                    lista_grads["thresholds"], torch.sigmoid(experts.raw_threshold)
                )
        return dict(zip(("contrastive", "reconstruction", "balance", "total"), losses))

    def _objective_weights(self) -> tuple[float, float, float]:
        return self.contrastive_weight, self.reconstruction_weight, self.balance_loss_weight

    def _head_step(self, x, codes, positive, weights, grads, loss_weights, grad_codes) -> tuple[torch.Tensor, ...]:
        """Head forward and backward as one compiled CPU call (``kernels.head_step``); the loss terms."""
        losses = codes.new_empty(4)
        kernels.head_step(
            x.contiguous().numpy(),
            codes.numpy(),
            positive.numpy(),
            *(weight.detach().numpy() for weight in weights),
            self.routing == "straight_through",
            self.margin,
            MIN_SQUARED_DISTANCE,
            np.array(loss_weights),
            np.array(self._objective_weights()),
            *(grads[name].numpy() for name in HeadWeights._fields),
            grad_codes.numpy(),
            losses.numpy(),
        )
        return losses.unbind()

    def _head_step_torch(
        self, x, codes, positive, weights, grads, loss_weights, grad_codes
    ) -> tuple[torch.Tensor, ...]:
        """``_head_step`` as torch operations (GPU, bfloat16, or numba missing)."""
        state = head_forward(x, codes, weights, self.routing == "straight_through")
        contrastive, saved = contrastive_forward(state.embedding, positive, self.margin)
        head_backward(
            x,
            codes,
            weights,
            state,
            contrastive_backward(saved, loss_weights[0]),
            loss_weights[1],
            loss_weights[2],
            grads,
            grad_codes,
        )
        losses = (contrastive, state.reconstruction_loss, state.balance_loss)
        return (*losses, sum(weight * loss for weight, loss in zip(self._objective_weights(), losses)))


def _grad_buffer(parameter: nn.Parameter) -> torch.Tensor | None:
    """The ``.grad`` to accumulate into (zeros if there is none yet); None for a frozen parameter."""
    if not parameter.requires_grad:
        return None
    if parameter.grad is None:
        parameter.grad = torch.zeros_like(parameter)
    return parameter.grad


def _aux_outputs(*, selected: torch.Tensor, codes: torch.Tensor, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ``aux`` dict of ``DictionaryMoE.forward`` (both paths): ``tensors`` as given, plus the
    per-expert counts of ``selected`` and the column ``codes`` (E, m, B) as (B, E, m)."""
    return {**tensors, "expert_counts": expert_counts(selected), "codes": codes.permute(2, 0, 1)}
