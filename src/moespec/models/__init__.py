"""MoE models and how they are trained: the dictionary-expert (LISTA) MoE, the top-k MoE classifier, the loop.

Modules: ``config`` (pydantic configs that build the models), ``dictionary`` and ``lista`` (the
dictionary-expert MoE and its LISTA experts), ``topk`` and ``layers`` (the top-k classifier and
its FFN experts), ``routing`` (top-k and dictionary routing, ablation masks), ``losses``
(load-balancing, z-loss, contrastive), ``kernels`` (compiled CPU kernels of the dictionary MoE's
training step), ``optim`` (fused Adam over one flat buffer), ``training`` (the one training loop:
fit, evaluation, checkpoints, resume), ``rows`` (training on embedding rows: data, objective,
evaluation, saved models).

Configs (``DictionaryMoEConfig``, ``TopKMoEConfig``, the tagged union ``ModelConfig``) import without
torch; the model classes, routing and losses are imported on first use, so that validating a config
on a laptop does not need the compute extra.

Every model's ``forward(x, ablation=None)`` returns ``(output, aux)``; ``aux`` is a dict of tensors
(router logits and probabilities, combine weights, per-expert counts, the balance loss, ``aux_loss``)
and no module keeps state between calls. ``model.loss_terms(output, aux, targets)`` gives the
training objective term by term, with ``"total"`` the one to minimise.
"""

from __future__ import annotations

import importlib
from typing import Any

from moespec.models.config import (
    DEFAULT_SPARSITY_LEVELS,
    DictionaryMoEConfig,
    ModelConfig,
    TargetKey,
    TopKMoEConfig,
)

_LAZY = {
    "Ablation": "moespec.models.routing",
    "Routing": "moespec.models.routing",
    "route_topk": "moespec.models.routing",
    "route_dictionary": "moespec.models.routing",
    "expert_counts": "moespec.models.routing",
    "routing_entropy": "moespec.models.routing",
    "switch_load_balancing_loss": "moespec.models.losses",
    "router_z_loss": "moespec.models.losses",
    "positive_pair_mask": "moespec.models.losses",
    "contrastive_margin_loss": "moespec.models.losses",
    "FeedForward": "moespec.models.layers",
    "ExpertFFN": "moespec.models.layers",
    "TopKMoELayer": "moespec.models.topk",
    "TopKMoEClassifier": "moespec.models.topk",
    "DictionaryMoE": "moespec.models.dictionary",
    "LISTAExperts": "moespec.models.dictionary",
    "AttentionGate": "moespec.models.dictionary",
}

__all__ = [
    "DEFAULT_SPARSITY_LEVELS",
    "DictionaryMoEConfig",
    "ModelConfig",
    "TargetKey",
    "TopKMoEConfig",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moespec.models' has no attribute {name!r}")
