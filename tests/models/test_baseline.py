"""Dense twins of the MoE configs: same kind, one expert, the MoE's active parameter count."""

from __future__ import annotations

import pytest
import torch

from moespec.models import DictionaryMoEConfig, TopKMoEConfig
from moespec.models.baseline import active_parameters, dense_baseline

INPUT_DIM, N_CLASSES = 24, 5

TOPK_CONFIGS = [
    {},
    {"n_experts": 8, "top_k": 1, "activation": "gelu"},
    {"n_experts": 6, "top_k": 3, "n_layers": 2, "shared_expert": True, "shared_expert_dim": 16},
]
DICTIONARY_CONFIGS = [{}, {"routing": "straight_through"}, {"shrinkage": "soft", "n_experts": 3, "code_dim": 12}]


@pytest.mark.parametrize("settings", TOPK_CONFIGS)
def test_topk_active_count_matches_the_built_model_and_its_dense_twin(settings):
    cfg = TopKMoEConfig(**settings)
    moe = cfg.build(input_dim=INPUT_DIM, n_classes=N_CLASSES)
    assert active_parameters(moe) == cfg.active_parameter_count(INPUT_DIM, N_CLASSES)
    twin = dense_baseline(cfg, input_dim=INPUT_DIM, n_classes=N_CLASSES)
    assert twin.moe_layers[0].n_experts == 1
    unit = (3 if cfg.activation == "swiglu" else 2) * cfg.hidden_dim  # parameters of one unit of FFN width
    assert abs(active_parameters(twin) - active_parameters(moe)) <= cfg.n_layers * unit / 2


@pytest.mark.parametrize("settings", DICTIONARY_CONFIGS)
def test_dictionary_active_count_matches_the_built_model_and_its_dense_twin(settings):
    cfg = DictionaryMoEConfig(**settings)
    moe = cfg.build(input_dim=INPUT_DIM)
    assert active_parameters(moe) == cfg.active_parameter_count(INPUT_DIM)
    twin_cfg = cfg.dense_twin(INPUT_DIM)
    twin = dense_baseline(cfg, input_dim=INPUT_DIM)
    assert twin.n_experts == 1 and active_parameters(twin) == twin_cfg.active_parameter_count(INPUT_DIM)
    # The nearest code width: one more or one fewer code unit would be further from the MoE's count.
    step = max(
        twin_cfg.active_parameter_count(INPUT_DIM)
        - DictionaryMoEConfig(
            **{
                **settings,
                "n_experts": 1,
                "code_dim": twin_cfg.code_dim - 1,
                "sparsity_levels": [min(twin_cfg.sparsity_levels[0], twin_cfg.code_dim - 1)],
            }
        ).active_parameter_count(INPUT_DIM),
        1,
    )
    assert abs(active_parameters(twin) - active_parameters(moe)) <= step


def test_straight_through_counts_one_expert_soft_routing_all():
    soft = DictionaryMoEConfig()
    hard = DictionaryMoEConfig(routing="straight_through")
    assert soft.active_parameter_count(64) > hard.active_parameter_count(64)
    assert sum(p.numel() for p in soft.build(input_dim=64).parameters()) == soft.active_parameter_count(64)


@pytest.mark.parametrize("cfg, n_classes", [(TopKMoEConfig(), N_CLASSES), (DictionaryMoEConfig(n_experts=3), None)])
def test_dense_twin_trains_with_the_same_step(cfg, n_classes):
    from moespec.models.rows import train_batch

    twin = dense_baseline(cfg, input_dim=INPUT_DIM, n_classes=n_classes, seed=1)
    x = torch.randn(16, INPUT_DIM, generator=torch.Generator().manual_seed(0))
    targets = torch.arange(16) % (n_classes or 4)
    if cfg.kind == "dictionary":
        targets = torch.stack([targets % 2, targets], dim=1)  # (domain, label) keys
    terms = train_batch(twin, x, targets, 1.0)
    assert torch.isfinite(torch.tensor(terms["total"]))
    grads = [p.grad for p in twin.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
