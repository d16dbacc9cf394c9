"""Top-k MoE layer and the small MoE classifier ("TinyMoE") of the specialisation study.

The layer is a dropless top-k MoE of FFN experts: a linear router, Mixtral-style renormalised or
Switch-style raw combine weights, an optional always-on shared expert (DeepSeekMoE, Dai et al. 2024,
arXiv 2401.06066, eq. 9), and the Switch load-balancing and ST-MoE z auxiliary losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moespec.models.layers import Activation, ExpertFFN, FeedForward, init_linear_, new_linear
from moespec.models.losses import router_z_loss, switch_load_balancing_loss
from moespec.models.routing import Ablation, Routing, expert_counts, route_topk

#: Keys of the ``aux`` dict of a top-k MoE layer.
LAYER_AUX_KEYS = (
    "router_logits",
    "router_probs",
    "expert_index",
    "combine_weights",
    "expert_counts",
    "balance_loss",
    "z_loss",
)


class TopKMoELayer(nn.Module):
    """A top-k mixture of FFN experts.

    Parameters
    ----------
    d_model : int
        Token width (input and output).
    d_ff : int
        Hidden width of each expert.
    n_experts : int
    top_k : int
        Experts per token, 1 <= top_k <= n_experts.
    renormalize : bool
        Mixtral weights (selected probabilities divided by their sum) if True, Switch weights (the
        probabilities themselves) if False.
    activation : {"swiglu", "gelu", "relu"}
    shared_expert_dim : int or None
        Hidden width of an always-on shared expert added to every token's output; None for none.
    router_init_std : float
        Standard deviation of the router's normal initialisation (Mixtral's ``initializer_range``).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        n_experts: int,
        top_k: int,
        renormalize: bool,
        activation: Activation = "swiglu",
        shared_expert_dim: int | None = None,
        router_init_std: float = 0.02,
    ):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={n_experts}], got {top_k}")
        self.n_experts, self.top_k, self.renormalize = n_experts, top_k, renormalize
        self.router_init_std = router_init_std
        self.router = new_linear(d_model, n_experts, bias=False)  # weight (E, H), as MixtralTopKRouter
        self.experts = ExpertFFN(n_experts, d_model, d_ff, activation)
        self.shared_expert = FeedForward(d_model, shared_expert_dim, activation) if shared_expert_dim else None

    def reset_parameters(self, generator: torch.Generator) -> None:
        with torch.no_grad():
            self.router.weight.normal_(0.0, self.router_init_std, generator=generator)
        self.experts.reset_parameters(generator)
        if self.shared_expert is not None:
            self.shared_expert.reset_parameters(generator)

    def forward(
        self, x: torch.Tensor, ablation: Ablation | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Route every token to its top-k experts and combine their outputs.

        Parameters
        ----------
        x : Tensor of shape (..., batch, d_model)
        ablation : Ablation, optional
            Experts to ablate (the shared expert is never ablated). Leading dimensions of the
            ablation mask become leading dimensions of the output.

        Returns
        -------
        output : Tensor of shape (..., d_model)
        aux : dict
            ``router_logits`` (..., E) after any mask ablation; ``router_probs`` (..., E);
            ``expert_index`` (..., k); ``combine_weights`` (..., E); ``expert_counts`` (..., E) samples
            selected per expert; ``balance_loss`` () Switch loss; ``z_loss`` () router z-loss.
        """
        router_logits = self.router(x)  # (..., E)
        routing = route_topk(router_logits, self.top_k, self.renormalize, ablation)
        output = self.combine_experts(x, routing)  # (..., H)
        if self.shared_expert is not None:
            output = output + self.shared_expert(x)
        aux = {
            "router_logits": routing.logits,
            "router_probs": routing.probs,
            "expert_index": routing.expert_index,
            "combine_weights": routing.combine_weights,
            "expert_counts": expert_counts(routing.selected),
            "balance_loss": switch_load_balancing_loss(routing.probs, routing.expert_index, self.n_experts),
            "z_loss": router_z_loss(routing.logits),
        }
        return output, aux

    def combine_experts(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Dense dispatch: every expert on every token, summed with the combine weights.

        Parameters
        ----------
        x : Tensor of shape (..., batch, d_model)
        routing : Routing
            Its leading dimensions may add ablation axes in front of x's.

        Returns
        -------
        Tensor of shape (..., batch, d_model)
        """
        expert_outputs = self.experts(x)  # (..., B, E, H)
        weights = routing.combine_weights.to(expert_outputs.dtype)  # (..., B, E), maybe ablation axes in front
        # einsum contracts E without materialising expert_outputs broadcast over the ablation axes,
        # which a broadcasting matmul copies on every batched ablation pass.
        return torch.einsum("...be,...beh->...bh", weights, expert_outputs)  # (..., B, H)

    @classmethod
    def from_dense(
        cls, ffn: FeedForward, n_experts: int = 1, top_k: int = 1, renormalize: bool = False
    ) -> TopKMoELayer:
        """An MoE whose experts are all copies of ``ffn`` (the MegaBlocks 1-expert reference check)."""
        d_ff = ffn.out_proj.in_features
        layer = cls(ffn.out_proj.out_features, d_ff, n_experts, top_k, renormalize, ffn.activation)
        layer.reset_parameters(torch.Generator().manual_seed(0))
        with torch.no_grad():
            layer.experts.gate_up_proj.copy_(ffn.in_proj.weight.expand(n_experts, -1, -1))
            layer.experts.down_proj.copy_(ffn.out_proj.weight.expand(n_experts, -1, -1))
        return layer


class TopKMoEClassifier(nn.Module):
    """Embedding classifier with top-k MoE blocks ("TinyMoE").

    ``h = in_proj(x)``; each block adds ``MoE(LayerNorm(h))`` to ``h`` (pre-norm residual);
    ``logits = head(LayerNorm(h))``.

    Parameters
    ----------
    input_dim : int
        Width of the input vectors (e.g. the reduced embeddings).
    n_classes : int
    hidden_dim : int
        Residual width.
    ffn_dim : int
        Hidden width of each expert.
    n_layers : int
        Number of MoE blocks.
    n_experts, top_k, renormalize, activation, shared_expert_dim, router_init_std
        As ``TopKMoELayer``.
    balance_loss_weight, z_loss_weight : float
        Weights of the auxiliary losses in ``aux["aux_loss"]``.
    """

    #: How the train stage scores held-out rows (``moespec.models.rows.ACCURACY``).
    accuracy_kind = "argmax"

    @property
    def n_moe_layers(self) -> int:
        return len(self.moe_layers)

    def __init__(
        self,
        input_dim: int,
        n_classes: int,
        hidden_dim: int = 64,
        ffn_dim: int = 128,
        n_layers: int = 1,
        n_experts: int = 4,
        top_k: int = 2,
        renormalize: bool = True,
        activation: Activation = "swiglu",
        shared_expert_dim: int | None = None,
        router_init_std: float = 0.02,
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 0.001,
    ):
        super().__init__()
        self.input_dim, self.n_classes, self.n_experts = input_dim, n_classes, n_experts
        self.balance_loss_weight, self.z_loss_weight = balance_loss_weight, z_loss_weight
        self.in_proj = new_linear(input_dim, hidden_dim)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_dim) for _ in range(n_layers))
        self.moe_layers = nn.ModuleList(
            TopKMoELayer(
                hidden_dim, ffn_dim, n_experts, top_k, renormalize, activation, shared_expert_dim, router_init_std
            )
            for _ in range(n_layers)
        )
        self.final_norm = nn.LayerNorm(hidden_dim)
        self.head = new_linear(hidden_dim, n_classes)

    def reset_parameters(self, generator: torch.Generator) -> None:
        init_linear_(self.in_proj, generator)
        for norm in [*self.norms, self.final_norm]:
            norm.reset_parameters()
        for layer in self.moe_layers:
            layer.reset_parameters(generator)
        init_linear_(self.head, generator)

    def forward(
        self, x: torch.Tensor, ablation: Ablation | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Class logits and routing information.

        Parameters
        ----------
        x : Tensor of shape (batch, input_dim)
        ablation : Ablation, optional
            Applied to every layer, or to ``ablation.layer`` only.

        Returns
        -------
        logits : Tensor of shape (..., batch, n_classes)
            Leading dimensions come from the ablation mask (none without one).
        aux : dict
            The layer keys (see ``TopKMoELayer.forward``) stacked over layers: ``router_logits``,
            ``router_probs``, ``combine_weights`` (L, ..., batch, E); ``expert_index``
            (L, ..., batch, k); ``expert_counts`` (L, ..., E). ``balance_loss`` and ``z_loss`` () are
            means over layers; ``aux_loss`` () is their weighted sum, to add to the task loss.
        """
        if x.shape[-1] != self.input_dim:
            raise ValueError(f"input has dimension {x.shape[-1]}, the model was built for {self.input_dim}")
        hidden = self.in_proj(x)  # (B, H)
        layer_aux = []
        for index, (norm, layer) in enumerate(zip(self.norms, self.moe_layers)):
            layer_ablation = ablation if ablation is not None and ablation.applies_to(index) else None
            update, aux = layer(norm(hidden), layer_ablation)  # (..., B, H)
            hidden = hidden + update
            layer_aux.append(aux)
        logits = self.head(self.final_norm(hidden))  # (..., B, C)
        return logits, self._stack_aux(layer_aux)

    def _stack_aux(self, layer_aux: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack per-layer aux over a leading layer axis (layers before an ablation lack its axes)."""
        stacked = {}
        for key in LAYER_AUX_KEYS:
            tensors = torch.broadcast_tensors(*(aux[key] for aux in layer_aux))
            stacked[key] = torch.stack(tensors)
        stacked["balance_loss"] = stacked["balance_loss"].mean()
        stacked["z_loss"] = stacked["z_loss"].mean()
        stacked["aux_loss"] = (
            self.balance_loss_weight * stacked["balance_loss"] + self.z_loss_weight * stacked["z_loss"]
        )
        return stacked

    def loss_terms(
        self, output: torch.Tensor, aux: dict[str, torch.Tensor], targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The training objective, term by term.

        Parameters
        ----------
        output : Tensor of shape (..., batch, n_classes)
            Logits from ``forward``.
        aux : dict
            From ``forward``.
        targets : LongTensor of shape (batch,)
            Class ids in ``[0, n_classes)``.

        Returns
        -------
        dict
            ``classification`` (cross-entropy), ``balance``, ``z`` and ``total`` (the weighted sum),
            all of shape ().
        """
        targets = targets.expand(output.shape[:-1])  # broadcast over ablation axes
        classification = F.cross_entropy(output.reshape(-1, self.n_classes), targets.reshape(-1))
        return {
            "classification": classification,
            "balance": aux["balance_loss"],
            "z": aux["z_loss"],
            "total": classification + aux["aux_loss"],
        }
