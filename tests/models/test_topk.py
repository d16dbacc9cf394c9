"""The top-k MoE layer and classifier: reference equivalences, routing conventions, ablations."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from moespec.models import Ablation, TopKMoEConfig
from moespec.models.layers import FeedForward
from moespec.models.topk import TopKMoELayer


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dense_ffn(activation: str, d_model: int = 8, d_ff: int = 16) -> FeedForward:
    ffn = FeedForward(d_model, d_ff, activation)
    ffn.reset_parameters(_generator(1))
    return ffn


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_one_expert_moe_equals_the_dense_ffn_it_wraps(activation, renormalize):
    ffn = _dense_ffn(activation)
    moe = TopKMoELayer.from_dense(ffn, n_experts=1, top_k=1, renormalize=renormalize)
    x = torch.randn(5, 8, generator=_generator(2))
    x_dense, x_moe = x.clone().requires_grad_(), x.clone().requires_grad_()
    dense_out = ffn(x_dense)
    moe_out, aux = moe(x_moe)
    torch.testing.assert_close(moe_out, dense_out)
    (dense_out.square().sum()).backward()
    (moe_out.square().sum()).backward()
    torch.testing.assert_close(x_moe.grad, x_dense.grad)
    torch.testing.assert_close(moe.experts.gate_up_proj.grad[0], ffn.in_proj.weight.grad)
    torch.testing.assert_close(moe.experts.down_proj.grad[0], ffn.out_proj.weight.grad)
    assert aux["expert_counts"].tolist() == [5.0]


def test_moe_of_identical_experts_with_renormalised_top2_equals_the_dense_ffn():
    ffn = _dense_ffn("swiglu")
    moe = TopKMoELayer.from_dense(ffn, n_experts=4, top_k=2, renormalize=True)
    x = torch.randn(6, 8, generator=_generator(3))
    torch.testing.assert_close(moe(x)[0], ffn(x))


def _mixtral_pair(n_experts: int = 4, top_k: int = 2, hidden: int = 16, intermediate: int = 24):
    config = MixtralConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_local_experts=n_experts,
        num_experts_per_tok=top_k,
        router_jitter_noise=0.0,
        hidden_act="silu",
    )
    block = MixtralSparseMoeBlock(config)
    generator = _generator(4)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    ours = TopKMoELayer(hidden, intermediate, n_experts, top_k, renormalize=True, activation="swiglu")
    with torch.no_grad():
        ours.router.weight.copy_(block.gate.weight)
        ours.experts.gate_up_proj.copy_(block.experts.gate_up_proj)
        ours.experts.down_proj.copy_(block.experts.down_proj)
    return block, ours


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_topk_router_and_experts_reproduce_transformers_mixtral_block(top_k):
    block, ours = _mixtral_pair(top_k=top_k)
    block.eval()
    x = torch.randn(3, 5, 16, generator=_generator(5))
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    reference = block(x_hf)
    router_logits_hf, _, index_hf = block.gate(x_hf.reshape(-1, 16))
    out, aux = ours(x_ours.reshape(-1, 16))
    torch.testing.assert_close(out.reshape(3, 5, 16), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux["router_logits"], router_logits_hf.float())
    assert torch.equal(aux["expert_index"], index_hf)
    reference.square().sum().backward()
    out.square().sum().backward()
    _assert_close_to_scale(x_ours.grad, x_hf.grad)
    if top_k > 1:
        _assert_close_to_scale(ours.router.weight.grad, block.gate.weight.grad)
    else:  # renormalised top-1 weights are identically 1: both router gradients are rounding noise
        scale = float(block.experts.down_proj.grad.abs().max())
        assert float(ours.router.weight.grad.abs().max()) < 1e-5 * scale
        assert float(block.gate.weight.grad.abs().max()) < 1e-5 * scale
    _assert_close_to_scale(ours.experts.gate_up_proj.grad, block.experts.gate_up_proj.grad)
    _assert_close_to_scale(ours.experts.down_proj.grad, block.experts.down_proj.grad)


def _assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding relative to the tensor's largest entry (sums run in another order)."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * (1.0 + float(expected.abs().max())))


def test_switch_top1_router_learns_from_the_task_loss_but_renormalised_top1_does_not():
    x = torch.randn(16, 8, generator=_generator(6))
    grads = {}
    for renormalize in (False, True):
        layer = TopKMoELayer(8, 16, 4, 1, renormalize=renormalize, router_init_std=0.5)
        layer.reset_parameters(_generator(7))
        out, _ = layer(x)
        out.square().sum().backward()
        grads[renormalize] = layer.router.weight.grad
    # Renormalised top-1 weights are identically 1: what is left is float32 rounding of d(p/p).
    assert grads[False].abs().max() > 1e-3
    assert grads[True].abs().max() < 1e-4 * grads[False].abs().max()


def test_combine_weights_follow_the_routing_convention():
    layer = TopKMoELayer(8, 16, 5, 2, renormalize=True, router_init_std=1.0)
    layer.reset_parameters(_generator(8))
    x = torch.randn(7, 8, generator=_generator(9))
    _, aux = layer(x)
    weights = aux["combine_weights"]
    torch.testing.assert_close(weights.sum(-1), torch.ones(7))
    assert ((weights > 0).sum(-1) == 2).all()
    top_logits = aux["router_logits"].gather(-1, aux["expert_index"])
    torch.testing.assert_close(weights.gather(-1, aux["expert_index"]), top_logits.softmax(-1))  # Mixtral eq. 2
    assert aux["expert_counts"].sum().item() == 14.0


def _classifier(n_layers: int = 1, top_k: int = 2, n_experts: int = 4, **overrides):
    config = TopKMoEConfig(
        n_experts=n_experts, top_k=top_k, hidden_dim=16, ffn_dim=24, n_layers=n_layers, router_init_std=1.0, **overrides
    )
    return config.build(input_dim=6, n_classes=3, seed=11)


def test_mask_ablation_reroutes_around_the_ablated_expert():
    model = _classifier()
    x = torch.randn(20, 6, generator=_generator(10))
    logits, aux = model(x, Ablation.of([1], 4, "mask"))
    assert not (aux["expert_index"] == 1).any()
    assert (aux["combine_weights"][..., 1] == 0).all()
    assert aux["expert_counts"][0, 1].item() == 0
    # Equivalent to a hook writing -inf into the router logit (docs/moe.md, "Ablation interventions", A).
    layer = model.moe_layers[0]
    handle = layer.router.register_forward_hook(
        lambda module, args, out: out.index_fill(-1, torch.tensor([1]), float("-inf"))
    )
    try:
        hooked, _ = model(x)
    finally:
        handle.remove()
    torch.testing.assert_close(logits, hooked)


def test_zero_and_drop_ablations_keep_routing_and_reweight_as_specified():
    model = _classifier()
    x = torch.randn(20, 6, generator=_generator(12))
    _, base = model(x)
    _, zero = model(x, Ablation.of([2], 4, "zero"))
    _, drop = model(x, Ablation.of([2], 4, "drop"))
    assert torch.equal(zero["expert_index"], base["expert_index"])  # no re-routing
    assert torch.equal(drop["expert_index"], base["expert_index"])
    assert (zero["combine_weights"][..., 2] == 0).all() and (drop["combine_weights"][..., 2] == 0).all()
    hit = base["combine_weights"][..., 2] > 0
    assert hit.any() and (~hit).any()
    kept = base["combine_weights"].masked_fill(torch.tensor([False, False, True, False]), 0.0)
    torch.testing.assert_close(zero["combine_weights"], kept)  # contribution removed, others unchanged
    torch.testing.assert_close(drop["combine_weights"], kept / kept.sum(-1, keepdim=True))  # top-(k-1) renormalised


@pytest.mark.parametrize("mode", ["mask", "zero", "drop"])
def test_all_single_expert_ablations_in_one_batched_pass_equal_separate_passes(mode):
    model = _classifier(n_layers=2)
    x = torch.randn(9, 6, generator=_generator(13))
    batched, aux = model(x, Ablation.each_expert(4, mode))
    assert batched.shape == (4, 9, 3)
    assert aux["router_logits"].shape == (2, 4, 9, 4)
    for expert in range(4):
        single, single_aux = model(x, Ablation.of([expert], 4, mode))
        torch.testing.assert_close(batched[expert], single, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(aux["expert_counts"][:, expert], single_aux["expert_counts"])


def test_layer_specific_ablation_leaves_earlier_layers_alone():
    model = _classifier(n_layers=2)
    x = torch.randn(9, 6, generator=_generator(14))
    _, base = model(x)
    _, aux = model(x, Ablation.each_expert(4, "mask", layer=1))
    for expert in range(4):
        torch.testing.assert_close(aux["router_logits"][0, expert], base["router_logits"][0])
        assert not (aux["expert_index"][1, expert] == expert).any()


def test_ablation_input_errors_are_clear():
    with pytest.raises(ValueError, match="at least one expert"):
        Ablation(torch.ones(4, dtype=torch.bool), "mask")
    with pytest.raises(ValueError, match="bool tensor"):
        Ablation(torch.zeros(4), "mask")
    with pytest.raises(ValueError, match="mode"):
        Ablation(torch.zeros(4, dtype=torch.bool), "remove")
    with pytest.raises(ValueError, match="written for 3 experts"):
        _classifier()(torch.randn(2, 6), Ablation.of([0], 3))


def test_shared_expert_is_always_on_and_never_ablated():
    model = _classifier(shared_expert=True)
    layer = model.moe_layers[0]
    x = torch.randn(5, 16, generator=_generator(15))
    routed_only = torch.matmul(layer(x)[1]["combine_weights"].unsqueeze(-2), layer.experts(x)).squeeze(-2)
    torch.testing.assert_close(layer(x)[0], routed_only + layer.shared_expert(x))
    all_zeroed, _ = layer(x, Ablation(torch.ones(4, dtype=torch.bool), "zero"))
    torch.testing.assert_close(all_zeroed, layer.shared_expert(x))


def test_classifier_loss_terms_and_training_reduce_the_loss():
    model = _classifier(top_k=1)
    generator = _generator(16)
    x = torch.randn(48, 6, generator=generator)
    targets = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        logits, aux = model(x)
        terms = model.loss_terms(logits, aux, targets)
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
        first = terms["classification"].item() if first is None else first
    assert set(terms) == {"classification", "balance", "z", "total"}
    assert terms["classification"].item() < 0.5 * first
    assert model.moe_layers[0].router.weight.grad.abs().sum() > 0


def test_building_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    first, second = _classifier(), _classifier()
    other = TopKMoEConfig(n_experts=4, hidden_dim=16, ffn_dim=24).build(input_dim=6, n_classes=3, seed=12)
    assert torch.equal(torch.random.get_rng_state(), state)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    assert first.in_proj.weight.shape == other.in_proj.weight.shape
    assert not torch.equal(first.in_proj.weight, other.in_proj.weight)


def test_forward_is_deterministic_and_rejects_a_wrong_input_dimension():
    model = _classifier()
    x = torch.randn(5, 6, generator=_generator(17))
    assert torch.equal(model(x)[0], model(x)[0])
    with pytest.raises(ValueError, match="dimension 7"):
        model(torch.randn(5, 7))
