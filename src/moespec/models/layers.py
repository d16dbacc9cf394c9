"""Building blocks shared by the MoE models: seeded initialisation and feed-forward experts.

Parameters are created uninitialised and filled by ``reset_parameters(generator)`` from an explicit
``torch.Generator``, so building a model neither reads nor advances the global RNG and two builds
with the same seed are identical.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moespec.models.config import Activation


def new_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    """An ``nn.Linear`` whose constructor draws nothing from the global RNG (fill it with ``init_linear_``)."""
    return torch.nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias)


def uniform_fan_in_(tensor: torch.Tensor, fan_in: int, generator: torch.Generator) -> torch.Tensor:
    """Fill with U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    This is PyTorch's default ``nn.Linear`` init (Kaiming-uniform with a = sqrt(5)); written with an
    explicit fan-in because stacked expert tensors (E, out, in) would fool ``nn.init``'s fan computation.
    """
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


def init_linear_(layer: nn.Linear, generator: torch.Generator) -> None:
    """PyTorch's default ``nn.Linear`` initialisation, drawn from ``generator``."""
    uniform_fan_in_(layer.weight, layer.in_features, generator)
    if layer.bias is not None:
        uniform_fan_in_(layer.bias, layer.in_features, generator)


def _activate(hidden: torch.Tensor, activation: Activation) -> torch.Tensor:
    """Apply the FFN non-linearity; SwiGLU (Shazeer 2020, arXiv 2002.05202) splits [gate; up] in halves."""
    if activation == "swiglu":
        gate, up = hidden.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(hidden)
    return F.relu(hidden)


class FeedForward(nn.Module):
    """A dense two-matrix FFN without biases: ``down(act(in(x)))``.

    The weight layout is Mixtral's (``in_proj`` holds [gate; up] stacked for SwiGLU), so a
    one-expert MoE can be loaded from it and compared (see ``TopKMoELayer.from_dense``).

    Parameters
    ----------
    d_model, d_ff : int
        Input/output width and hidden width.
    activation : {"swiglu", "gelu", "relu"}
    """

    def __init__(self, d_model: int, d_ff: int, activation: Activation = "swiglu"):
        super().__init__()
        self.activation = activation
        self.in_proj = new_linear(d_model, (2 if activation == "swiglu" else 1) * d_ff, bias=False)
        self.out_proj = new_linear(d_ff, d_model, bias=False)

    def reset_parameters(self, generator: torch.Generator) -> None:
        init_linear_(self.in_proj, generator)
        init_linear_(self.out_proj, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (..., d_model) -> (..., d_model)."""
        return self.out_proj(_activate(self.in_proj(x), self.activation))


class ExpertFFN(nn.Module):
    """E independent FFN experts stored as stacked tensors and evaluated together.

    Layout as transformers' ``MixtralExperts`` (v5): ``gate_up_proj`` (E, 2F, H) for SwiGLU or
    (E, F, H) otherwise, ``down_proj`` (E, H, F). All experts run on all tokens (one batched matmul
    per projection); at the sizes of this project (E <= 16, H <= 512) that wastes at most E/k FLOPs
    and beats any gather/scatter dispatch, which is launch-bound (docs/moe.md, "Efficient implementation").

    Parameters
    ----------
    n_experts, d_model, d_ff : int
    activation : {"swiglu", "gelu", "relu"}
    """

    def __init__(self, n_experts: int, d_model: int, d_ff: int, activation: Activation = "swiglu"):
        super().__init__()
        self.n_experts, self.d_model, self.d_ff = n_experts, d_model, d_ff
        self.activation = activation
        width = (2 if activation == "swiglu" else 1) * d_ff
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, width, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, d_ff))

    def reset_parameters(self, generator: torch.Generator) -> None:
        uniform_fan_in_(self.gate_up_proj, self.d_model, generator)
        uniform_fan_in_(self.down_proj, self.d_ff, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's output for every token.

        Parameters
        ----------
        x : Tensor of shape (..., d_model)

        Returns
        -------
        Tensor of shape (..., n_experts, d_model)
        """
        lead = x.shape[:-1]
        tokens = x.reshape(1, -1, self.d_model)  # (1, T, H) broadcast over experts
        hidden = torch.matmul(tokens, self.gate_up_proj.transpose(1, 2))  # (E, T, F')
        hidden = _activate(hidden, self.activation)  # (E, T, F)
        out = torch.matmul(hidden, self.down_proj.transpose(1, 2))  # (E, T, H)
        return out.transpose(0, 1).reshape(*lead, self.n_experts, self.d_model)  # (..., E, H)
