"""Unrolled LISTA experts (Gregor & LeCun 2010, "Learning Fast Approximations of Sparse Coding", eq. 3).

Each of E experts encodes x with L unrolled steps and its own sparsity level k_e::

    z_0 = 0,   u_t = W_t x + S_t z_t,   z_{t+1} = shrink_e(u_t),   x_hat_e = D_e z_L

The forward and backward passes are plain functions (``lista_forward``, ``lista_backward``) that
both the autograd node ``UnrolledLISTA`` and the dictionary MoE's autograd-free training step call.
With ``h_t = dL/du_t``, the backward of the recursion is::

    h_{L-1} = dL/dz_L * shrink'(u_{L-1}),   h_{t-1} = (S_t^T h_t) * shrink'(u_{t-1})
    dL/dW_t = h_t x^T,   dL/dS_t = h_t z_t^T,   dL/dx = sum_t W_t^T h_t

where ``shrink'`` is 1 for the straight-through hard top-k (Bengio et al. 2013: the gradient
reaches every entry, zeroed or not, as in the earlier pipeline's ``TopKSTE``) and the indicator of
``|u| > theta`` for soft thresholding, whose threshold gradient is ``-sum_b h_t sign(z_{t+1})``.

Codes are column vectors: one (L, E, m, N) buffer holds every step's codes, computed in place and
reused by the backward pass. In that layout the input drives of all steps and experts are one
(L E m, d) x (d, N) product, and the encoder gradient another: as plain matrix products they take
about 65 us each at the default sizes, where the (L E)-batched products of the row layout took
about 170 us (torch 2.13, 2 CPU threads).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from moespec.models import kernels
from moespec.models.layers import uniform_fan_in_

Shrinkage = Literal["topk", "soft"]


def lista_forward(
    x: torch.Tensor,
    encoder: torch.Tensor,
    lateral: torch.Tensor,
    sparsity: torch.Tensor,
    thresholds: torch.Tensor | None,
) -> torch.Tensor:
    """Every step's codes of every expert.

    Parameters
    ----------
    x : Tensor of shape (N, d)
    encoder, lateral : Tensors of shape (L, E, m, d) and (L, E, m, m)
        W_t and S_t.
    sparsity : LongTensor of shape (E,)
        k_e, used by the hard top-k (``thresholds`` None).
    thresholds : Tensor of shape (L, E, m), optional
        Soft thresholds; None selects the hard top-k.

    Returns
    -------
    Tensor of shape (L, E, m, N)
        ``codes[t]`` is z_{t+1}, column per sample.
    """
    n_layers, n_experts, code_dim, input_dim = encoder.shape
    # W_t x does not depend on z: all L * E input drives in one matrix product.
    codes = torch.mm(encoder.reshape(-1, input_dim), x.t()).view(n_layers, n_experts, code_dim, -1)
    if thresholds is None and kernels.fused(codes):  # the recursion as one compiled call
        kernels.lista_steps(codes.numpy(), lateral.detach().numpy(), sparsity.numpy(), kernels.network_for(code_dim))
        return codes
    steps, laterals = codes.unbind(0), lateral.unbind(0)
    for t, step in enumerate(steps):
        if t > 0:  # z_0 = 0: the first step is W_0 x alone
            step.baddbmm_(laterals[t], steps[t - 1])
        if thresholds is None:
            keep_largest_(step, sparsity)
        else:
            soft_threshold_(step, thresholds[t].unsqueeze(-1))
    return codes


def lista_backward(
    x: torch.Tensor,
    encoder: torch.Tensor,
    lateral: torch.Tensor,
    codes: torch.Tensor,
    grad_pre: torch.Tensor,
    soft: bool,
    grads: dict[str, torch.Tensor | None],
) -> None:
    """Accumulate the gradients of ``lista_forward`` into ``grads``.

    Parameters
    ----------
    x, encoder, lateral : as for ``lista_forward``
    codes : Tensor of shape (L, E, m, N)
        ``lista_forward``'s output.
    grad_pre : Tensor of shape (L, E, m, N)
        Scratch for h_t whose last step holds dL/dz_L on entry; overwritten.
    soft : bool
        Soft thresholding (else the straight-through top-k).
    grads : dict
        ``"x"`` (N, d), ``"encoder"``, ``"lateral"``, ``"thresholds"`` (L, E, m): buffers to add the
        gradient to, or None where it is not wanted.
    """
    input_dim = encoder.shape[-1]
    if not soft and kernels.fused(grad_pre):
        kernels.lista_backward_steps(grad_pre.numpy(), lateral.detach().numpy())
    else:
        steps, laterals = grad_pre.unbind(0), lateral.unbind(0)
        for t in range(len(steps) - 1, -1, -1):
            if soft:
                steps[t].mul_(codes[t] != 0)  # shrink' of soft thresholding
            if t > 0:
                torch.bmm(laterals[t].transpose(1, 2), steps[t], out=steps[t - 1])
    flat = grad_pre.view(-1, x.shape[0])  # (L E m, N)
    if grads.get("x") is not None:
        grads["x"].addmm_(flat.t(), encoder.reshape(-1, input_dim))
    if grads.get("encoder") is not None:
        grads["encoder"].view(-1, input_dim).addmm_(flat, x)
    if grads.get("lateral") is not None:  # S_0 multiplies z_0 = 0: its gradient stays as it is
        grads["lateral"][1:].flatten(0, 1).baddbmm_(
            grad_pre[1:].flatten(0, 1), codes[:-1].flatten(0, 1).transpose(1, 2)
        )
    if soft and grads.get("thresholds") is not None:
        grads["thresholds"].sub_((grad_pre * codes.sign()).sum(dim=-1))


def keep_largest_(pre_codes: torch.Tensor, sparsity: torch.Tensor) -> None:
    """Zero all but the ``k_e`` largest-magnitude entries of each code vector, in place.

    On CPU in float32/64 a vector keeps the entries at least as large as its k_e-th largest
    (``moespec.models.kernels``); ties, which would keep an extra entry, have probability zero
    there. Elsewhere (GPU, bfloat16, where ties are common) exactly k_e entries are kept, ties
    broken by position.

    Parameters
    ----------
    pre_codes : Tensor of shape (E, m, N)
        Code vectors as columns.
    sparsity : LongTensor of shape (E,)
    """
    if pre_codes.device.type == "cpu" and pre_codes.dtype in (torch.float32, torch.float64):
        kernels.keep_largest_columns_(pre_codes.numpy(), sparsity.numpy())
        return
    m = pre_codes.shape[-2]
    order = pre_codes.abs().argsort(dim=-2, descending=True, stable=True)  # (E, m, N)
    kept = torch.arange(m, device=pre_codes.device).view(1, m, 1) < sparsity.view(-1, 1, 1)  # by position
    pre_codes.mul_(torch.zeros_like(pre_codes, dtype=torch.bool).scatter_(-2, order, kept.expand_as(order)))


def soft_threshold_(pre_codes: torch.Tensor, threshold: torch.Tensor) -> None:
    """ISTA's shrinkage ``sign(u) max(|u| - theta, 0)`` (Daubechies et al. 2004), in place.

    Parameters
    ----------
    pre_codes : Tensor of shape (E, m, N)
    threshold : Tensor of shape (E, m, 1)
    """
    excess = (pre_codes.abs() - threshold).clamp_(min=0.0)
    pre_codes.sign_().mul_(excess)


class UnrolledLISTA(torch.autograd.Function):
    """``lista_forward`` as one autograd node with ``lista_backward`` as its backward.

    Recorded op by op, a step costs autograd about ten nodes (matmuls, the shrinkage's sort, masks
    and their gradients), and on the small matrices of this model each node costs more in dispatch
    than in arithmetic. Under autocast it runs in the autocast dtype, as a matmul would.

    Returns the last step's codes, (E, m, N).
    """

    @staticmethod
    def forward(ctx, x, encoder, lateral, sparsity, thresholds):
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            x, encoder, lateral = x.to(dtype), encoder.to(dtype), lateral.to(dtype)
            thresholds = thresholds.to(dtype) if thresholds is not None else None
        with torch.autocast(device_type, enabled=False):
            codes = lista_forward(x, encoder, lateral, sparsity, thresholds)
        ctx.soft = thresholds is not None
        ctx.save_for_backward(x, encoder, lateral, codes)
        return codes[-1].clone()  # the saved buffer stays private

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_codes):
        x, encoder, lateral, codes = ctx.saved_tensors
        wanted = dict(zip(("x", "encoder", "lateral"), ctx.needs_input_grad[:3]))
        wanted["thresholds"] = ctx.soft and ctx.needs_input_grad[4]
        like = {"x": x, "encoder": encoder, "lateral": lateral, "thresholds": codes[..., 0]}
        grads = {name: torch.zeros_like(like[name]) if needed else None for name, needed in wanted.items()}
        with torch.autocast(grad_codes.device.type, enabled=False):
            grad_pre = torch.empty_like(codes)  # h_t, (L, E, m, N)
            grad_pre[-1] = grad_codes
            lista_backward(x, encoder, lateral, codes, grad_pre, ctx.soft, grads)
        return grads["x"], grads["encoder"], grads["lateral"], None, grads["thresholds"]


class LISTAExperts(nn.Module):
    """E unrolled LISTA encoders with their own dictionaries, stacked.

    Weights are stored layer-major, ``encoder`` W (L, E, m, d) and ``lateral`` S (L, E, m, m), so that
    each unrolled step is a single batched matrix product over experts on contiguous slices.

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
        """Every expert's sparse code of every sample, as columns.

        Parameters
        ----------
        x : Tensor of shape (n_samples, input_dim)

        Returns
        -------
        Tensor of shape (n_experts, code_dim, n_samples)
        """
        thresholds = self.thresholds() if self.raw_threshold is not None else None
        return UnrolledLISTA.apply(x, self.encoder, self.lateral, self.sparsity, thresholds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's sparse code of every sample.

        Parameters
        ----------
        x : Tensor of shape (..., input_dim)

        Returns
        -------
        Tensor of shape (..., n_experts, code_dim)
        """
        codes = self.encode(x.reshape(-1, self.input_dim))  # (E, m, N)
        return codes.permute(2, 0, 1).reshape(*x.shape[:-1], self.n_experts, self.code_dim)

    def reconstruct(self, codes: torch.Tensor) -> torch.Tensor:
        """``D_e z_e`` for every expert: codes (..., E, m) -> (..., E, input_dim)."""
        return torch.einsum("...em,edm->...ed", codes, self.dictionary)
