"""LMs over transformers' architectures: equivalences with dense models, transformers' own loss, the
sorted_mm experts implementation, masking vs removing an expert, parameter counts, config errors."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from moespec.models import experts
from moespec.models.lm import (
    LMModelConfig,
    add_dropout,
    build_model,
    dense_hf_config,
    hf_config,
    loss_terms,
    moe_hf_config,
    parameter_counts,
    skip_empty_shared_experts,
)
from tests.builders import one_torch_thread

VOCAB, POSITIONS, EOT = 64, 32, 0


def tiny(**overrides) -> LMModelConfig:
    settings = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_experts": 4, "top_k": 2}
    settings.update(overrides)
    return LMModelConfig(**settings)


def batch(seed: int = 0, size: tuple[int, int] = (3, 12)) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, size, generator=torch.Generator().manual_seed(seed))
    labels = torch.cat([ids[:, 1:], torch.full((size[0], 1), -100)], dim=1)
    return ids, labels


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("implementation", ["eager", "sorted_mm"])
def test_a_one_expert_top1_moe_with_the_dense_ffn_weights_is_the_dense_model(implementation):
    cfg = tiny(num_experts=1, top_k=1, expert_size=48)
    dense = build_model(dense_hf_config(cfg, VOCAB, POSITIONS, EOT, width=48), seed=0)
    moe = build_model(moe_hf_config(cfg, VOCAB, POSITIONS, EOT), seed=1)
    moe.set_experts_implementation(implementation)
    state = moe.state_dict()
    for name, value in dense.state_dict().items():
        if ".mlp." not in name:
            state[name] = value.clone()
    for i, layer in enumerate(dense.model.layers):
        prefix = f"model.layers.{i}.mlp."
        state[prefix + "experts.gate_up_proj"] = torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight])[None]
        state[prefix + "experts.down_proj"] = layer.mlp.down_proj.weight[None].clone()
    moe.load_state_dict(state)
    ids, labels = batch()
    with one_torch_thread():
        dense_terms, dense_out = loss_terms(dense, ids, labels, 0.0, 0.0)
        moe_terms, moe_out = loss_terms(moe, ids, labels, 0.0, 0.0)
        dense_terms["total"].backward()
        moe_terms["lm"].backward()
    torch.testing.assert_close(moe_out.logits, dense_out.logits, rtol=1e-5, atol=1e-6)
    dense_grads, moe_grads = grads(dense), grads(moe)
    for name, grad in dense_grads.items():
        if ".mlp." not in name:
            torch.testing.assert_close(moe_grads[name], grad, rtol=1e-4, atol=1e-7)
    for i in range(cfg.num_layers):
        prefix = f"model.layers.{i}.mlp."
        expected = torch.cat([dense_grads[prefix + "gate_proj.weight"], dense_grads[prefix + "up_proj.weight"]])
        torch.testing.assert_close(moe_grads[prefix + "experts.gate_up_proj"][0], expected, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(
            moe_grads[prefix + "experts.down_proj"][0], dense_grads[prefix + "down_proj.weight"], rtol=1e-4, atol=1e-7
        )


ARCHITECTURES = {"qwen2_moe": {}, "mixtral": {"norm_topk_prob": True}, "olmoe": {}}


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_the_loss_is_transformers_own_labels_loss(architecture):
    cfg = tiny(architecture=architecture, **ARCHITECTURES[architecture])
    model = build_model(hf_config(cfg, VOCAB, POSITIONS, EOT, aux_loss_coef=0.05), seed=0)
    assert model.config.model_type == architecture
    ids, labels = batch()
    with torch.no_grad():
        terms, _ = loss_terms(model, ids, labels, balance_weight=0.05, z_weight=0.0)
        reference_lm = model(input_ids=ids, labels=ids).loss
        reference_total = model(input_ids=ids, labels=ids, output_router_logits=True).loss
    torch.testing.assert_close(terms["lm"], reference_lm)
    torch.testing.assert_close(terms["total"], reference_total)
    assert float(terms["balance"]) >= 2.0 - 1e-4  # Switch loss: top_k under perfect balance, more otherwise
    z = torch.stack(
        [
            torch.logsumexp(logits, -1).square().mean()
            for logits in model(input_ids=ids, output_router_logits=True).router_logits
        ]
    ).mean()
    torch.testing.assert_close(terms["z"], z)


def test_skipping_the_empty_shared_expert_changes_no_output_or_gradient(tmp_path):
    import copy

    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference = AutoModelForCausalLM.from_config(hf_config(tiny(), VOCAB, POSITIONS, EOT))
    ours = copy.deepcopy(reference)
    assert skip_empty_shared_experts(ours) == 2  # both blocks of the tiny model are MoE blocks
    assert "forward" in vars(ours.model.layers[0].mlp) and "forward" not in vars(reference.model.layers[0].mlp)
    ids, labels = batch()
    with one_torch_thread():
        results = []
        for model in (ours, reference):
            terms, output = loss_terms(model, ids, labels, 0.01, 0.001)
            terms["total"].backward()
            results.append((output.logits, terms["total"], grads(model)))
        torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
        torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)
        routed = {name: g for name, g in results[1][2].items() if "shared_expert" not in name}
        assert set(results[0][2]) == set(routed)
        assert all(not g.any() for name, g in results[1][2].items() if "shared_expert" in name)  # it adds 0
        for name, gradient in routed.items():
            torch.testing.assert_close(results[0][2][name], gradient, rtol=0, atol=0)
        ours.save_pretrained(tmp_path)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
        torch.testing.assert_close(reloaded(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("n_experts,top_k,n_tokens", [(4, 2, 40), (16, 2, 6), (8, 3, 64)])
def test_sorted_mm_matches_the_eager_loop_forward_and_backward(n_experts, top_k, n_tokens):
    cfg = moe_hf_config(tiny(num_experts=n_experts, top_k=top_k, expert_size=24), VOCAB, POSITIONS, EOT)
    experts.register()
    results = []
    for implementation in ("eager", experts.SORTED_MM):
        cfg._experts_implementation = implementation
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts

        torch.manual_seed(0)
        layer = Qwen2MoeExperts(cfg)
        torch.nn.init.normal_(layer.gate_up_proj, std=0.3)
        torch.nn.init.normal_(layer.down_proj, std=0.3)
        generator = torch.Generator().manual_seed(1)
        hidden = torch.randn(n_tokens, 32, generator=generator, requires_grad=True)
        logits = torch.randn(n_tokens, n_experts, generator=generator, requires_grad=True)
        weights, index = logits.softmax(-1).topk(top_k, dim=-1)
        out = layer(hidden, index, weights)
        (out * torch.randn(out.shape, generator=generator)).sum().backward()
        results.append((out, hidden.grad, logits.grad, layer.gate_up_proj.grad, layer.down_proj.grad))
    for eager, ours in zip(*results):
        torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("architecture", ["mixtral", "olmoe"])
def test_sorted_mm_matches_the_eager_loop_in_the_other_architectures(architecture):
    cfg = tiny(architecture=architecture, **ARCHITECTURES[architecture])
    ids, labels = batch(size=(2, 16))
    results = []
    for implementation in ("eager", experts.SORTED_MM):
        model = build_model(hf_config(cfg, VOCAB, POSITIONS, EOT), seed=0)
        model.set_experts_implementation(implementation)
        with one_torch_thread():
            terms, output = loss_terms(model, ids, labels, 0.01, 0.001)
            terms["total"].backward()
        results.append((output.logits, grads(model)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    assert set(results[1][1]) == set(results[0][1])
    for name, gradient in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], gradient, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("architecture", ["mixtral", "olmoe"])
def test_every_block_of_the_other_architectures_is_an_moe_block_and_counts_match(architecture):
    cfg = tiny(architecture=architecture, num_layers=3, num_experts=8, expert_size=40, **ARCHITECTURES[architecture])
    moe = build_model(hf_config(cfg, VOCAB, POSITIONS, EOT), seed=0)
    total, active = parameter_counts(moe)
    assert cfg.moe_layers() == [0, 1, 2] and total == sum(p.numel() for p in moe.parameters())
    assert total - active == 3 * (8 - 2) * 3 * 32 * 40
    dense = build_model(hf_config(cfg.model_copy(update={"dense_twin": "active"}), VOCAB, POSITIONS, EOT), seed=0)
    assert abs(parameter_counts(dense)[0] - active) <= 3 * 32 * 3 / 2


def test_masking_an_expert_equals_removing_it():
    from moespec.embedding.hf_moe import RouterAblation, RouterHooks, find_routers

    cfg = tiny(num_experts=4, top_k=2)
    full = build_model(hf_config(cfg, VOCAB, POSITIONS, EOT), seed=0).eval()
    removed_expert = 1
    smaller = build_model(hf_config(tiny(num_experts=3, top_k=2), VOCAB, POSITIONS, EOT), seed=0).eval()
    kept = [e for e in range(4) if e != removed_expert]
    state = {name: value.clone() for name, value in full.state_dict().items()}
    for name in list(state):
        if name.endswith(("mlp.gate.weight", "experts.gate_up_proj", "experts.down_proj")):
            state[name] = state[name][kept]
    smaller.load_state_dict(state)
    ids, _ = batch(size=(2, 10))
    mask = torch.zeros(1, 4, dtype=torch.bool)
    mask[0, removed_expert] = True
    with torch.no_grad(), RouterHooks(find_routers(full)) as hooks:
        with hooks.ablating(RouterAblation(mask, "mask", None)):
            masked = full(input_ids=ids).logits
        unmasked = full(input_ids=ids).logits
    torch.testing.assert_close(masked, smaller(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(unmasked, masked)


def test_parameter_counts_and_matched_dense_twins():
    cfg = tiny(num_layers=4, decoder_sparse_step=2, num_experts=8, top_k=2, expert_size=40, intermediate_size=80)
    moe = build_model(hf_config(cfg, VOCAB, POSITIONS, EOT), seed=0)
    total, active = parameter_counts(moe)
    assert total == sum(p.numel() for p in moe.parameters())
    assert len(cfg.moe_layers()) == 2
    assert total - active == 2 * (8 - 2) * 3 * 32 * 40  # two MoE blocks, 6 unused experts of 3 d I each
    per_unit = 3 * 32 * cfg.num_layers  # parameters per unit of dense FFN width
    for twin, target in (("active", active), ("total", total)):
        dense = build_model(hf_config(cfg.model_copy(update={"dense_twin": twin}), VOCAB, POSITIONS, EOT), seed=0)
        dense_total, dense_active = parameter_counts(dense)
        assert type(dense).__name__ == "Qwen2ForCausalLM" and dense_total == dense_active
        assert abs(dense_total - target) <= per_unit / 2


def test_dropout_hooks_act_in_training_mode_only():
    model = build_model(hf_config(tiny(), VOCAB, POSITIONS, EOT), seed=0)
    ids, _ = batch()
    with torch.no_grad():
        before = model.eval()(input_ids=ids).logits
        handles = add_dropout(model, 0.5)
        assert len(handles) == 2 * model.config.num_hidden_layers
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, before)
        assert not torch.allclose(model.train()(input_ids=ids).logits, before)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"num_experts": 2, "top_k": 3}, "top_k 3 is above num_experts 2"),
        ({"num_layers": 2, "decoder_sparse_step": 3}, "decoder_sparse_step 3 is above num_layers 2"),
        ({"mlp_only_layers": [5]}, r"mlp_only_layers \[5\] are not blocks"),
        ({"num_layers": 2, "mlp_only_layers": [0, 1]}, "no MoE block"),
        ({"hidden_size": 30, "num_heads": 4}, "not a multiple of num_heads"),
        ({"architecture": "mixtral"}, "mixtral always renormalises the top-k routing weights"),
        ({"architecture": "olmoe", "decoder_sparse_step": 2}, "decoder_sparse_step needs architecture qwen2_moe"),
        ({"architecture": "olmoe", "shared_expert_size": 8}, "shared_expert_size needs architecture qwen2_moe"),
        ({"architecture": "olmoe", "mlp_only_layers": [0]}, "mlp_only_layers needs architecture qwen2_moe"),
        ({"architecture": "olmoe", "intermediate_size": 64}, "intermediate_size needs architecture qwen2_moe"),
        ({"architecture": "gpt"}, "architecture"),
    ],
)
def test_inconsistent_model_settings_are_rejected(overrides, message):
    with pytest.raises(ValidationError, match=message):
        tiny(**overrides)
