"""Dictionary-expert MoE: the stratified-manifold model of Li & Sarwate (arXiv 2502.13577), made trainable.

Each expert e is an unrolled LISTA encoder (Gregor & LeCun 2010, "Learning Fast Approximations of
Sparse Coding", eq. 3) with its own dictionary D_e and sparsity level k_e::

    z_0 = 0,   z_{t+1} = shrink_e(W_t x + S_t z_t),   x_hat_e = D_e z_L

An attention-style gate scores the experts, ``p = softmax(W_q x K^T / sqrt(q))``; the combined code
``sum_e w_e z_e`` goes through a projection head trained with a margin contrastive loss.

Differences from the earlier public implementation (research/moe.md sections 0.2 and 1.7), which
gave the gate and the dictionaries no gradient:

* routing is differentiable (soft mixture, or straight-through hard selection) and a Switch
  load-balancing term keeps it from collapsing;
* the reconstruction loss ``sum_e w_e ||x - D_e z_e||^2`` trains every dictionary it routes to;
* positives of the contrastive loss are chosen by key (label, domain or both), never raw label ids.

All experts are stored as stacked tensors and run together: no loop over experts or samples.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moespec.models.layers import init_linear_, new_linear, uniform_fan_in_
from moespec.models.losses import contrastive_margin_loss, positive_pair_mask, switch_load_balancing_loss
from moespec.models.routing import Ablation, expert_counts, route_dictionary

Shrinkage = Literal["topk", "soft"]


class _UnrolledLISTA(torch.autograd.Function):
    """All unrolled LISTA steps of all experts, with a hand-written backward pass.

    Recorded op by op, a step costs autograd about ten nodes (matmuls, the shrinkage's sort, masks
    and their gradients), and on the small matrices of this model each node costs more in dispatch
    than in arithmetic. The backward of the recursion is short enough to write out. With pre-codes
    ``u_t = W_t x + S_t z_t`` (``z_0 = 0``), codes ``z_{t+1} = shrink(u_t)`` and ``h_t = dL/du_t``::

        h_{L-1} = dL/dz_L * shrink'(u_{L-1}),   h_{t-1} = (S_t^T h_t) * shrink'(u_{t-1})
        dL/dW_t = h_t x^T,   dL/dS_t = h_t z_t^T,   dL/dx = sum_t W_t^T h_t

    where ``shrink'`` is 1 for the straight-through hard top-k (Bengio et al. 2013: the gradient
    reaches every entry, zeroed or not, as in the earlier pipeline's ``TopKSTE``) and the indicator
    of ``|u| > theta`` for soft thresholding, whose threshold gradient is ``-sum_b h_t sign(z_{t+1})``.

    Codes are column vectors here: one (L, E, m, N) buffer holds every step's codes, computed in
    place and reused by backward. In that layout the input drives of all steps and experts are one
    (L E m, d) x (d, N) product, and the encoder gradient another: as plain matrix products they take
    about 65 us each at the default sizes, where the (L E)-batched products of the row layout took
    about 170 us (torch 2.13, 2 CPU threads).
    """

    @staticmethod
    def forward(ctx, x, encoder, lateral, sparsity, thresholds):
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):  # run in the autocast dtype, as a matmul would
            dtype = torch.get_autocast_dtype(device_type)
            x, encoder, lateral = x.to(dtype), encoder.to(dtype), lateral.to(dtype)
            thresholds = thresholds.to(dtype) if thresholds is not None else None
        n_layers, n_experts, code_dim, input_dim = encoder.shape
        with torch.autocast(device_type, enabled=False):
            # W_t x does not depend on z: all L * E input drives in one matrix product.
            codes = torch.mm(encoder.reshape(-1, input_dim), x.t()).view(n_layers, n_experts, code_dim, -1)
            rank = (code_dim - sparsity) if thresholds is None else None  # (E,) order statistic kept from
            for t in range(n_layers):
                if t > 0:  # z_0 = 0: the first step is W_0 x alone
                    codes[t].baddbmm_(lateral[t], codes[t - 1])
                if thresholds is None:
                    _keep_largest_(codes[t], rank)
                else:
                    _soft_threshold_(codes[t], thresholds[t].unsqueeze(-1))
        ctx.soft = thresholds is not None
        ctx.save_for_backward(x, encoder, lateral, codes)
        return codes[-1].transpose(1, 2).contiguous()  # (E, N, m); the saved buffer stays private

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_codes):
        x, encoder, lateral, codes = ctx.saved_tensors
        n_layers, n_experts, code_dim, input_dim = encoder.shape
        with torch.autocast(grad_codes.device.type, enabled=False):
            grad_pre = torch.empty_like(codes)  # h_t, (L, E, m, N)
            grad_pre[-1] = grad_codes.transpose(1, 2)
            for t in range(n_layers - 1, -1, -1):
                if ctx.soft:
                    grad_pre[t].mul_(codes[t] != 0)  # shrink' of soft thresholding
                if t > 0:
                    torch.bmm(lateral[t].transpose(1, 2), grad_pre[t], out=grad_pre[t - 1])
            flat = grad_pre.view(-1, x.shape[0])  # (L E m, N)
            grad_x = grad_encoder = grad_lateral = grad_thresholds = None
            if ctx.needs_input_grad[0]:
                grad_x = torch.mm(flat.t(), encoder.reshape(-1, input_dim))  # (N, d)
            if ctx.needs_input_grad[1]:
                grad_encoder = torch.mm(flat, x).view_as(encoder)  # (L, E, m, d)
            if ctx.needs_input_grad[2]:
                grad_lateral = torch.zeros_like(lateral)  # S_0 multiplies z_0 = 0
                torch.bmm(grad_pre[1:].flatten(0, 1), codes[:-1].flatten(0, 1).transpose(1, 2),
                          out=grad_lateral[1:].flatten(0, 1))
            if ctx.soft and ctx.needs_input_grad[4]:
                grad_thresholds = -(grad_pre * codes.sign()).sum(dim=-1)  # (L, E, m)
        return grad_x, grad_encoder, grad_lateral, None, grad_thresholds


def _keep_largest_(pre_codes: torch.Tensor, rank: torch.Tensor) -> None:
    """Zero all but the ``m - rank_e`` largest-magnitude entries of each code vector, in place.

    On CPU in float32/64, a vector keeps the entries at least as large as its ``rank_e``-th order
    statistic (ascending); ties, which would keep an extra entry, have probability zero there.
    NumPy's vectorised sort of many short rows is several times faster than ``torch.sort`` on CPU
    (torch 2.13, 448 vectors of 32 float32: 29 us with the transposing copy, against 77 us).

    Parameters
    ----------
    pre_codes : Tensor of shape (E, m, N)
        Code vectors as columns.
    rank : LongTensor of shape (E,)
        ``m - k_e``, 0 <= rank_e < m.
    """
    if pre_codes.device.type == "cpu" and pre_codes.dtype in (torch.float32, torch.float64):
        values = pre_codes.numpy()
        magnitude = np.abs(values)  # (E, m, N)
        order_statistics = np.ascontiguousarray(magnitude.transpose(0, 2, 1))  # (E, N, m)
        order_statistics.sort(axis=-1)
        threshold = order_statistics[np.arange(len(values)), :, rank.numpy()]  # (E, N)
        np.multiply(values, magnitude >= threshold[:, None, :], out=values)
        return
    # Elsewhere (GPU, bfloat16, where ties are common): exactly k entries, ties broken by position.
    m = pre_codes.shape[-2]
    order = pre_codes.abs().argsort(dim=-2, descending=True, stable=True)  # (E, m, N)
    kept = torch.arange(m, device=pre_codes.device).view(1, m, 1) < (m - rank).view(-1, 1, 1)  # by position
    pre_codes.mul_(torch.zeros_like(pre_codes, dtype=torch.bool).scatter_(-2, order, kept.expand_as(order)))


def _soft_threshold_(pre_codes: torch.Tensor, threshold: torch.Tensor) -> None:
    """ISTA's shrinkage ``sign(u) max(|u| - theta, 0)`` (Daubechies et al. 2004), in place.

    Parameters
    ----------
    pre_codes : Tensor of shape (E, m, N)
    threshold : Tensor of shape (E, m, 1)
    """
    excess = (pre_codes.abs() - threshold).clamp_(min=0.0)
    pre_codes.sign_().mul_(excess)


class _GatedDictionaryHead(torch.autograd.Function):
    """Everything after the experts' codes, with a hand-written backward: gate, routing, mixture,
    projection head, reconstruction and load-balancing losses.

    The same computation as ``DictionaryMoE._forward_autograd`` (tested to agree, gradients included)
    in one autograd node instead of some fifty, each of which costs more in dispatch than in
    arithmetic on this model's small matrices. Forward, with ``w`` the combine weights (``p`` for
    soft routing, ``onehot(argmax p)`` for straight-through)::

        p = softmax(s (x Wq^T + bq) K^T),   c_b = sum_e w_be z_eb,   y = W2 relu(W1 c + b1) + b2
        r_eb = D_e z_eb - x_b,   recon = mean_b sum_e w_be |r_eb|^2,   balance = E sum_e f_e mean_b p_be

    Backward: the straight-through gradient of ``w`` is that of ``p`` (``onehot + p - stopgrad(p)``),
    so both routings share ``dL/dp_be = dL/dw_be (+ the balance term)``; ``f`` (the share of rows
    whose arg-max is e) has no gradient, as in Switch.

    Differentiable outputs: ``embedding``, ``reconstruction_loss``, ``balance_loss``, ``aux_loss``.
    The routing tensors returned beside them are not differentiable.
    """

    @staticmethod
    def forward(ctx, x, codes, query_weight, query_bias, keys, dictionary, w1, b1, w2, b2,
                straight_through, reconstruction_weight, balance_weight):
        ctx.set_materialize_grads(False)
        if torch.is_autocast_enabled(x.device.type):  # the experts ran in low precision; this part is small
            x, codes = x.float(), codes.float()
        with torch.autocast(x.device.type, enabled=False):
            n_experts, batch = codes.shape[0], x.shape[0]
            scale = 1.0 / math.sqrt(keys.shape[1])
            query = torch.addmm(query_bias, x, query_weight.t())  # (B, q)
            logits = torch.mm(query, keys.t()).mul_(scale)  # (B, E)
            probs = torch.softmax(logits, dim=-1)
            expert_index = probs.argmax(dim=-1, keepdim=True)  # (B, 1)
            selected = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, expert_index, True)
            weights = selected.to(probs.dtype) if straight_through else probs  # (B, E)
            weights_t = weights.t().unsqueeze(-1)  # (E, B, 1)
            code = (weights_t * codes).sum(0)  # (B, m)
            hidden = torch.addmm(b1, code, w1.t()).relu_()  # (B, H)
            embedding = torch.addmm(b2, hidden, w2.t())  # (B, P)
            residual = torch.bmm(codes, dictionary.transpose(1, 2)).sub_(x)  # (E, B, d) D_e z_e - x
            error = residual.square().sum(-1)  # (E, B)
            reconstruction_loss = torch.mul(weights.t(), error).sum() / batch
            dispatch_fraction = selected.sum(0, dtype=probs.dtype) / batch  # (E,) f_e
            balance_loss = n_experts * torch.dot(dispatch_fraction, probs.mean(0))
            aux_loss = reconstruction_weight * reconstruction_loss + balance_weight * balance_loss
        ctx.save_for_backward(x, codes, query_weight, keys, dictionary, w1, w2, query, probs, weights_t,
                              code, hidden, residual, error, dispatch_fraction)
        ctx.weights = (scale, reconstruction_weight, balance_weight)
        ctx.mark_non_differentiable(logits, probs, weights, expert_index, selected, code, error)
        return (embedding, reconstruction_loss, balance_loss, aux_loss,
                logits, probs, weights, expert_index, selected, code, error.t())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_embedding, grad_reconstruction, grad_balance, grad_aux, *_):
        (x, codes, query_weight, keys, dictionary, w1, w2, query, probs, weights_t, code, hidden, residual,
         error, dispatch_fraction) = ctx.saved_tensors
        scale, reconstruction_weight, balance_weight = ctx.weights
        n_experts, batch = codes.shape[0], x.shape[0]
        # Total weight of each loss in the objective (None: that output was not used).
        recon = _sum_grads(grad_reconstruction, grad_aux, reconstruction_weight)
        balance = _sum_grads(grad_balance, grad_aux, balance_weight)
        grads = dict.fromkeys(("x", "codes", "wq", "bq", "keys", "dictionary", "w1", "b1", "w2", "b2"))
        grad_code = grad_weights = grad_residual = None
        if grad_embedding is not None:
            grads["w2"], grads["b2"] = grad_embedding.t() @ hidden, grad_embedding.sum(0)
            grad_hidden = (grad_embedding @ w2).mul_(hidden > 0)
            grads["w1"], grads["b1"] = grad_hidden.t() @ code, grad_hidden.sum(0)
            grad_code = grad_hidden @ w1  # (B, m)
            grads["codes"] = weights_t * grad_code  # (E, B, m)
            grad_weights = (codes * grad_code).sum(-1)  # (E, B)
        if recon is not None:
            grad_residual = residual * (weights_t * (2.0 / batch) * recon)  # (E, B, d)
            grads["dictionary"] = torch.bmm(grad_residual.transpose(1, 2), codes)  # (E, d, m)
            from_recon = torch.bmm(grad_residual, dictionary)
            grads["codes"] = from_recon if grads["codes"] is None else grads["codes"].add_(from_recon)
            from_error = error * (recon / batch)
            grad_weights = from_error if grad_weights is None else grad_weights.add_(from_error)
        grad_probs = grad_weights.t() if grad_weights is not None else None  # (B, E); straight-through too
        if balance is not None:
            from_balance = dispatch_fraction * (balance * n_experts / batch)
            grad_probs = from_balance.expand_as(probs) if grad_probs is None else grad_probs + from_balance
        if grad_probs is not None:
            grad_logits = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype).mul_(scale)
            grads["keys"] = grad_logits.t() @ query  # (E, q)
            grad_query = grad_logits @ keys  # (B, q)
            grads["wq"], grads["bq"] = grad_query.t() @ x, grad_query.sum(0)
            if ctx.needs_input_grad[0]:
                grads["x"] = grad_query @ query_weight
        if ctx.needs_input_grad[0] and grad_residual is not None:
            grads["x"] = -grad_residual.sum(0) if grads["x"] is None else grads["x"].sub_(grad_residual.sum(0))
        return (*grads.values(), None, None, None)


def _sum_grads(direct, through_aux, weight: float):
    """Gradient reaching one loss: directly and through ``aux_loss = ... + weight * loss``."""
    if through_aux is None:
        return direct
    return through_aux * weight if direct is None else direct + through_aux * weight


class LISTAExperts(nn.Module):
    """E unrolled LISTA encoders with their own dictionaries, stacked.

    Weights are stored layer-major, ``encoder`` W (L, E, m, d) and ``lateral`` S (L, E, m, m), and
    codes are computed expert-major (E, N, m), so that each unrolled step is a single batched
    matrix product over experts on contiguous slices.

    Parameters
    ----------
    input_dim : int
        d, the width of x.
    code_dim : int
        m, the code width (number of atoms per dictionary).
    n_layers : int
        L, unrolled iterations.
    sparsity_levels : list of int
        k_e per expert (used by the "topk" shrinkage).
    shrinkage : {"topk", "soft"}
        Hard top-k with a straight-through gradient, or soft thresholding with learned thresholds
        (one per layer, expert and atom, kept positive by a softplus).
    soft_threshold_init : float
        Initial threshold of the "soft" shrinkage.
    """

    def __init__(
        self,
        input_dim: int,
        code_dim: int,
        n_layers: int,
        sparsity_levels: list[int],
        shrinkage: Shrinkage = "topk",
        soft_threshold_init: float = 0.1,
    ):
        super().__init__()
        n_experts = len(sparsity_levels)
        self.input_dim, self.code_dim, self.n_layers, self.n_experts = input_dim, code_dim, n_layers, n_experts
        self.shrinkage, self.soft_threshold_init = shrinkage, soft_threshold_init
        self.register_buffer("sparsity", torch.tensor(sparsity_levels, dtype=torch.long))
        self.encoder = nn.Parameter(torch.empty(n_layers, n_experts, code_dim, input_dim))  # W_t
        self.lateral = nn.Parameter(torch.empty(n_layers, n_experts, code_dim, code_dim))  # S_t
        self.dictionary = nn.Parameter(torch.empty(n_experts, input_dim, code_dim))  # D_e, atoms are columns
        self.raw_threshold = nn.Parameter(torch.empty(n_layers, n_experts, code_dim)) if shrinkage == "soft" else None

    def reset_parameters(self, generator: torch.Generator) -> None:
        # W_t, S_t: nn.Linear's default, as the earlier pipeline; D_e: 0.01 N(0, 1), as it too.
        uniform_fan_in_(self.encoder, self.input_dim, generator)
        uniform_fan_in_(self.lateral, self.code_dim, generator)
        with torch.no_grad():
            self.dictionary.normal_(0.0, 0.01, generator=generator)
            if self.raw_threshold is not None:
                # softplus^-1(theta_0), so that the initial threshold is theta_0.
                self.raw_threshold.fill_(math.log(math.expm1(self.soft_threshold_init)))

    def thresholds(self) -> torch.Tensor:
        """Soft thresholds of shape (n_layers, n_experts, code_dim)."""
        if self.raw_threshold is None:
            raise ValueError("thresholds exist only for the 'soft' shrinkage")
        return F.softplus(self.raw_threshold)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's sparse code of every sample, expert-major.

        Parameters
        ----------
        x : Tensor of shape (n_samples, input_dim)

        Returns
        -------
        Tensor of shape (n_experts, n_samples, code_dim)
        """
        thresholds = self.thresholds() if self.raw_threshold is not None else None
        return _UnrolledLISTA.apply(x, self.encoder, self.lateral, self.sparsity, thresholds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's sparse code of every sample.

        Parameters
        ----------
        x : Tensor of shape (..., input_dim)

        Returns
        -------
        Tensor of shape (..., n_experts, code_dim)
        """
        codes = self.encode(x.reshape(-1, self.input_dim))  # (E, N, m)
        return codes.transpose(0, 1).reshape(*x.shape[:-1], self.n_experts, self.code_dim)

    def reconstruct(self, codes: torch.Tensor) -> torch.Tensor:
        """``D_e z_e`` for every expert: codes (..., E, m) -> (..., E, input_dim)."""
        return torch.einsum("...em,edm->...ed", codes, self.dictionary)


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
            (``_GatedDictionaryHead``): the embedding and the three losses are differentiable, the
            routing tensors (logits, probabilities, weights, ``code``) are not. With one, every
            output is computed op by op under autograd.
        """
        if x.shape[-1] != self.input_dim:
            raise ValueError(f"input has dimension {x.shape[-1]}, the model was built for {self.input_dim}")
        if ablation is not None:
            return self._forward_autograd(x, ablation)
        codes = self.experts.encode(x)  # (E, B, m), expert-major
        gate, projection = self.gate, self.projection
        (embedding, reconstruction_loss, balance_loss, aux_loss, logits, probs, weights, expert_index, selected,
         code, reconstruction_error) = _GatedDictionaryHead.apply(
            x, codes, gate.query.weight, gate.query.bias, gate.keys, self.experts.dictionary,
            projection[0].weight, projection[0].bias, projection[2].weight, projection[2].bias,
            self.routing == "straight_through", self.reconstruction_weight, self.balance_loss_weight)
        return embedding, _aux_outputs(
            router_logits=logits, router_probs=probs, combine_weights=weights, expert_index=expert_index,
            selected=selected, codes=codes, code=code, reconstruction_error=reconstruction_error,
            reconstruction_loss=reconstruction_loss, balance_loss=balance_loss, aux_loss=aux_loss)

    def _forward_autograd(
        self, x: torch.Tensor, ablation: Ablation | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``forward`` op by op under autograd: the reference of the fused head, and the ablation path."""
        router_logits = self.gate(x)  # (B, E)
        routing = route_dictionary(router_logits, self.routing, ablation)  # (..., B, E)
        weights = routing.combine_weights.to(x.dtype)
        codes = self.experts.encode(x)  # (E, B, m), expert-major
        code = torch.einsum("...be,ebm->...bm", weights, codes)  # (..., B, m)
        embedding = self.projection(code)  # (..., B, P)
        reconstruction = torch.bmm(codes, self.experts.dictionary.transpose(1, 2))  # (E, B, d)
        reconstruction_error = (x - reconstruction).pow(2).sum(-1).T  # (B, E)
        # Weighting by the routing makes the gate prefer experts that reconstruct x well (soft: through
        # p; straight-through: through the surrogate gradient) and trains each routed dictionary.
        reconstruction_loss = (weights * reconstruction_error).sum(-1).mean()
        balance_loss = switch_load_balancing_loss(routing.probs, routing.expert_index, self.n_experts)
        aux_loss = self.reconstruction_weight * reconstruction_loss + self.balance_loss_weight * balance_loss
        return embedding, _aux_outputs(
            router_logits=routing.logits, router_probs=routing.probs, combine_weights=routing.combine_weights,
            expert_index=routing.expert_index, selected=routing.selected, codes=codes, code=code,
            reconstruction_error=reconstruction_error, reconstruction_loss=reconstruction_loss,
            balance_loss=balance_loss, aux_loss=aux_loss)

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


def _aux_outputs(*, selected: torch.Tensor, codes: torch.Tensor, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ``aux`` dict of ``DictionaryMoE.forward`` (both paths): ``tensors`` as given, plus the
    per-expert counts of ``selected`` and the expert-major ``codes`` (E, B, m) as (B, E, m)."""
    return {**tensors, "expert_counts": expert_counts(selected), "codes": codes.transpose(0, 1)}
