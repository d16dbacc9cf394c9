"""Model configs: defaults, tagged-union parsing, validation messages, and no torch at import."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError

from moespec.models import DEFAULT_SPARSITY_LEVELS, DictionaryMoEConfig, ModelConfig, TopKMoEConfig

MODEL = TypeAdapter(ModelConfig)


def test_defaults_follow_the_earlier_pipeline_and_the_issue():
    dictionary = DictionaryMoEConfig()
    assert (dictionary.n_experts, dictionary.query_dim, dictionary.code_dim, dictionary.n_layers) == (7, 128, 32, 5)
    assert tuple(dictionary.sparsity_levels) == DEFAULT_SPARSITY_LEVELS == (8, 12, 16, 20, 24, 28, 32)
    assert dictionary.margin == 1.0 and dictionary.positive_pairs == "domain_label"
    topk = TopKMoEConfig()
    assert (topk.n_experts, topk.top_k, topk.hidden_dim, topk.renormalizes) == (4, 2, 64, True)
    assert TopKMoEConfig(top_k=1).renormalizes is False  # Switch-style top-1


def test_tagged_union_picks_the_model_by_kind():
    assert isinstance(MODEL.validate_python({"kind": "dictionary", "n_experts": 3}), DictionaryMoEConfig)
    assert isinstance(MODEL.validate_python({"kind": "topk", "top_k": 1}), TopKMoEConfig)
    with pytest.raises(ValidationError, match="kind"):
        MODEL.validate_python({"kind": "dense"})


def test_default_sparsity_levels_adapt_to_experts_and_code_dim_and_are_stored():
    assert DictionaryMoEConfig(n_experts=3, code_dim=16).sparsity_levels == [8, 12, 16]
    assert DictionaryMoEConfig(n_experts=2, code_dim=4).sparsity_levels == [4, 4]
    assert DictionaryMoEConfig(n_experts=1).sparsity_levels == [32]
    assert "sparsity_levels" in DictionaryMoEConfig(n_experts=3).model_dump()


@pytest.mark.parametrize(
    ("kind", "settings", "message"),
    [
        ("topk", {"top_k": 0}, "greater than or equal to 1"),
        ("topk", {"top_k": 5, "n_experts": 4}, "top_k must be <= n_experts=4, got 5"),
        ("topk", {"top_k": 1, "renormalize": True}, "no gradient"),
        ("topk", {"shared_expert_dim": 8}, "shared_expert is false"),
        ("topk", {"activation": "tanh"}, "swiglu"),
        ("topk", {"target": "topic"}, "domain_label"),
        ("dictionary", {"sparsity_levels": [4, 8]}, "must have n_experts=7 entries, got 2"),
        ("dictionary", {"n_experts": 2, "sparsity_levels": [4, 40]}, "<= code_dim=32, got \\[40\\]"),
        ("dictionary", {"margin": 0}, "greater than 0"),
        ("dictionary", {"n_experts": 0}, "greater than or equal to 1"),
        ("dictionary", {"routing": "threshold"}, "straight_through"),
        ("dictionary", {"lista_layers": 5}, "Extra inputs are not permitted"),
    ],
)
def test_bad_values_fail_with_clear_messages(kind, settings, message):
    with pytest.raises(ValidationError, match=message):
        MODEL.validate_python({"kind": kind, **settings})


def test_configs_are_frozen_and_nest_in_a_stage_config():
    class Section(BaseModel):
        model: ModelConfig

    section = Section.model_validate({"model": {"kind": "topk", "n_experts": 8, "top_k": 2}})
    with pytest.raises(ValidationError):
        section.model.top_k = 3
    with pytest.raises(ValidationError) as info:
        Section.model_validate({"model": {"kind": "topk", "top_k": 9}})
    assert info.value.errors()[0]["loc"][:2] == ("model", "topk")


def test_build_checks_its_arguments():
    with pytest.raises(ValueError, match="n_classes >= 2"):
        TopKMoEConfig().build(input_dim=8)
    with pytest.raises(ValueError, match="expects input dimension 16, the data has 8"):
        TopKMoEConfig(input_dim=16).build(input_dim=8, n_classes=2)


def test_importing_the_configs_does_not_import_torch():
    code = "import sys, moespec.models; moespec.models.TopKMoEConfig(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
