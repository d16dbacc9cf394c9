"""Dense baselines with the active parameters of an MoE, and the count of active parameters.

An MoE is judged against a dense model that spends the same parameters on each input (Fedus et al.
2021, arXiv 2101.03961, section 2: "FLOP-matched" dense baselines; the count here is of parameters
that can change a given input's output). The dense twin of a config is the same model kind with one
expert (:meth:`~moespec.models.config.TopKMoEConfig.dense_twin`,
:meth:`~moespec.models.config.DictionaryMoEConfig.dense_twin`), so it has the MoE's ``forward`` /
``loss_terms`` contract and the train stage's step trains it unchanged; a one-expert router is a
constant (softmax of one logit is 1) and its weights are not counted as active.

Active parameters of a built model (:func:`active_parameters`):

* top-k classifier: everything except, in each MoE layer, the ``E - k`` experts a token does not
  use; a one-expert layer's router is not counted;
* dictionary MoE: with ``routing="soft"`` every expert's code enters the mixture, so all parameters
  are active; with ``"straight_through"`` only the arg-max expert's (``E - 1`` experts are not);
  a one-expert gate is not counted.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def active_parameters(model: nn.Module) -> int:
    """Parameters that can change the output for one input (see the module docstring).

    Parameters
    ----------
    model : TopKMoEClassifier or DictionaryMoE

    Returns
    -------
    int
    """
    from moespec.models.dictionary import DictionaryMoE
    from moespec.models.topk import TopKMoEClassifier

    total = sum(p.numel() for p in model.parameters())
    if isinstance(model, TopKMoEClassifier):
        for layer in model.moe_layers:
            per_expert = sum(p.numel() for p in layer.experts.parameters()) // layer.n_experts
            total -= (layer.n_experts - layer.top_k) * per_expert
            if layer.n_experts == 1:
                total -= layer.router.weight.numel()
        return total
    if isinstance(model, DictionaryMoE):
        if model.n_experts == 1:
            return total - sum(p.numel() for p in model.gate.parameters())
        if model.routing == "straight_through":
            per_expert = sum(p.numel() for p in model.experts.parameters()) // model.n_experts
            total -= (model.n_experts - 1) * per_expert
        return total
    raise TypeError(f"active_parameters: expected a TopKMoEClassifier or DictionaryMoE, got {type(model).__name__}")


def dense_baseline(cfg: Any, *, input_dim: int, n_classes: int | None = None, seed: int = 0) -> nn.Module:
    """Build the dense twin of ``cfg`` (one expert, the MoE's active parameters; see the module docstring).

    Parameters
    ----------
    cfg : TopKMoEConfig or DictionaryMoEConfig
    input_dim : int
    n_classes : int, optional
        For the classifier.
    seed : int

    Returns
    -------
    nn.Module
        Same class, ``forward`` and ``loss_terms`` as ``cfg.build(...)``.
    """
    return cfg.dense_twin(input_dim).build(input_dim=input_dim, n_classes=n_classes, seed=seed)
