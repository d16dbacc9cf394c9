"""The dictionary-expert MoE: a per-expert reference, sparsity, gradients (the earlier bug), ablations."""

from __future__ import annotations

import pytest
import torch

from moespec.models import Ablation, DictionaryMoEConfig, kernels


@pytest.fixture(params=["compiled", "torch"])
def backend(request, monkeypatch):
    """Run a test with the numba CPU kernels, then with the torch operations that stand in for them."""
    if request.param == "torch":
        monkeypatch.setattr(kernels, "HAVE_NUMBA", False)
    elif not kernels.HAVE_NUMBA:
        pytest.skip("numba is not installed")
    return request.param


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _model(**overrides):
    settings = dict(
        n_experts=3,
        query_dim=8,
        code_dim=6,
        n_layers=3,
        sparsity_levels=[2, 4, 6],
        projection_hidden=5,
        projection_dim=4,
    )
    settings.update(overrides)
    return DictionaryMoEConfig(**settings).build(input_dim=10, seed=3)


def _reference_codes(model, x):
    """One expert at a time, one LISTA layer at a time, with torch.topk per expert (the textbook loop).

    Autograd differentiates it: the hard top-k passes its gradient straight through (the earlier
    pipeline's ``TopKSTE``), soft thresholding through ``sign(u) relu(|u| - theta)``.
    """
    experts = model.experts
    codes = []
    for e in range(experts.n_experts):  # layout: encoder (L, E, m, d), lateral (L, E, m, m)
        z = torch.zeros(x.shape[0], experts.code_dim, dtype=x.dtype)
        for t in range(experts.n_layers):
            u = x @ experts.encoder[t, e].T + z @ experts.lateral[t, e].T
            if experts.raw_threshold is None:
                keep = torch.zeros_like(u).scatter(1, u.abs().topk(int(experts.sparsity[e]), dim=1).indices, 1.0)
                z = u + (u * keep - u).detach()  # forward: the k largest; backward: identity
            else:
                theta = experts.thresholds()[t, e]
                z = torch.sign(u) * torch.clamp(u.abs() - theta, min=0)
        codes.append(z)
    return torch.stack(codes, dim=1)  # (B, E, m)


@pytest.mark.parametrize("shrinkage", ["topk", "soft"])
def test_vectorised_experts_equal_a_per_expert_loop(shrinkage):
    model = _model(shrinkage=shrinkage)
    x = torch.randn(12, 10, generator=_generator(1))
    torch.testing.assert_close(model.experts(x), _reference_codes(model, x))
    reconstruction = model.experts.reconstruct(model.experts(x))
    torch.testing.assert_close(reconstruction[:, 1], model.experts(x)[:, 1] @ model.experts.dictionary[1].T)


def test_each_expert_code_has_its_own_sparsity_level():
    model = _model()
    codes = model.experts(torch.randn(30, 10, generator=_generator(2)))
    nonzeros = (codes != 0).sum(-1)  # (B, E)
    assert torch.equal(nonzeros, torch.tensor([2, 4, 6]).expand(30, 3))


@pytest.mark.parametrize("shrinkage", ["topk", "soft"])
def test_hand_written_backward_equals_autograd_of_the_loop(shrinkage, backend):
    model = _model(shrinkage=shrinkage).double()
    x = torch.randn(12, 10, generator=_generator(3), dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(12, 3, 6, generator=_generator(4), dtype=torch.float64)
    parameters = [x, model.experts.encoder, model.experts.lateral]
    if shrinkage == "soft":
        parameters.append(model.experts.raw_threshold)
    ours = torch.autograd.grad((model.experts(x) * upstream).sum(), parameters)
    reference = torch.autograd.grad((_reference_codes(model, x) * upstream).sum(), parameters)
    for name, a, b in zip(["x", "encoder", "lateral", "raw_threshold"], ours, reference):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"gradient of {name}: {m}")
    assert ours[2][0].abs().sum() == 0  # S_0 multiplies z_0 = 0


@pytest.mark.parametrize("x_requires_grad", [False, True])
@pytest.mark.parametrize("routing", ["soft", "straight_through"])
@pytest.mark.parametrize("shrinkage", ["topk", "soft"])
def test_fused_head_equals_the_autograd_forward(routing, shrinkage, x_requires_grad, backend):
    """The hand-written backward of gate, mixture, head and losses against autograd, term by term."""
    model = _model(routing=routing, shrinkage=shrinkage, balance_loss_weight=0.3, reconstruction_weight=0.7).double()
    x = torch.randn(16, 10, generator=_generator(9), dtype=torch.float64, requires_grad=x_requires_grad)
    keys = torch.arange(16) % 3
    parameters = [p for p in model.parameters()] + ([x] if x_requires_grad else [])
    fused, fused_aux = model(x)
    reference, reference_aux = model._forward_autograd(x, None)
    torch.testing.assert_close(fused, reference)
    for name, value in reference_aux.items():
        torch.testing.assert_close(fused_aux[name], value.detach(), msg=lambda m, name=name: f"aux {name}: {m}")
    # Each loss alone, then the training objective: every way the outputs reach the parameters.
    for objective in (
        lambda e, a: (e * torch.linspace(-1, 1, e.numel()).view_as(e).double()).sum(),
        lambda e, a: a["reconstruction_loss"],
        lambda e, a: a["balance_loss"],
        lambda e, a: model.loss_terms(e, a, keys)["total"],
    ):
        ours = torch.autograd.grad(objective(*model(x)), parameters, allow_unused=True)
        expected = torch.autograd.grad(objective(*model._forward_autograd(x, None)), parameters, allow_unused=True)
        for parameter, a, b in zip(parameters, ours, expected):
            name = next((n for n, p in model.named_parameters() if p is parameter), "x")
            a = torch.zeros_like(parameter) if a is None else a
            b = torch.zeros_like(parameter) if b is None else b
            torch.testing.assert_close(a, b, msg=lambda m, name=name: f"gradient of {name}: {m}")


def _autograd_reference(model, x, targets, scale):
    """Loss terms and ``scale`` times the gradient of the total, op by op under autograd."""
    terms = model.loss_terms(*model._forward_autograd(x, None), targets)
    grads = torch.autograd.grad(terms["total"] * scale, list(model.parameters()))
    return {name: value.detach() for name, value in terms.items()}, grads


@pytest.mark.parametrize("routing", ["soft", "straight_through"])
@pytest.mark.parametrize("shrinkage", ["topk", "soft"])
def test_training_step_without_autograd_equals_autograd(routing, shrinkage, backend):
    """``accumulate_gradients`` (the train stage's path) against autograd of the op-by-op model, in
    float64: same loss terms, same gradients, added to what ``.grad`` already holds."""
    model = _model(
        routing=routing, shrinkage=shrinkage, balance_loss_weight=0.3, reconstruction_weight=0.7, contrastive_weight=1.3
    ).double()
    x = torch.randn(16, 10, generator=_generator(9), dtype=torch.float64)
    targets = torch.stack([torch.arange(16) % 3, torch.arange(16) % 2], dim=1)  # (domain, label) keys
    expected_terms, expected_grads = _autograd_reference(model, x, targets, 0.25)
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)  # what earlier micro-batches left
    terms = model.accumulate_gradients(x, targets, 0.25)
    assert terms.keys() == expected_terms.keys()
    for name, value in expected_terms.items():
        torch.testing.assert_close(terms[name], value, rtol=1e-12, atol=1e-14, msg=lambda m, n=name: f"{n}: {m}")
    for (name, parameter), expected in zip(model.named_parameters(), expected_grads):
        torch.testing.assert_close(
            parameter.grad - 1.0, expected, rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"gradient of {n}: {m}"
        )


def test_training_step_without_autograd_in_float32_and_with_a_frozen_parameter(backend):
    model = _model()
    x = torch.randn(16, 10, generator=_generator(9))
    targets = torch.arange(16) % 3
    expected_terms, expected_grads = _autograd_reference(model, x, targets, 1.0)
    terms = model.accumulate_gradients(x, targets)
    for name, value in expected_terms.items():
        torch.testing.assert_close(terms[name], value, msg=lambda m, n=name: f"{n}: {m}")
    for (name, parameter), expected in zip(model.named_parameters(), expected_grads):
        torch.testing.assert_close(
            parameter.grad, expected, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"gradient of {n}: {m}"
        )
    model.zero_grad(set_to_none=True)
    model.gate.keys.requires_grad_(False)  # a frozen parameter: no gradient, the others unchanged
    model.accumulate_gradients(x, targets)
    assert model.gate.keys.grad is None
    torch.testing.assert_close(model.experts.encoder.grad, expected_grads[3], rtol=1e-4, atol=1e-6)


def test_hard_topk_gradient_is_straight_through():
    """The gradient of the last step reaches every pre-code entry, the zeroed ones included."""
    model = _model(n_layers=1)
    x = torch.randn(7, 10, generator=_generator(3))
    upstream = torch.randn(7, 3, 6, generator=_generator(4))
    (model.experts(x) * upstream).sum().backward()
    # One layer: codes = topk(W_0 x), so dL/dW_0[e] = upstream[:, e]^T x with nothing masked.
    torch.testing.assert_close(model.experts.encoder.grad[0], torch.einsum("bem,bd->emd", upstream, x))


def test_experts_run_under_bfloat16_autocast():
    model = _model()
    x = torch.randn(9, 10, generator=_generator(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = model.experts(x)
    assert codes.dtype == torch.bfloat16
    codes.float().sum().backward()
    assert model.experts.encoder.grad.dtype == torch.float32 and model.experts.encoder.grad.abs().sum() > 0
    assert torch.equal((codes != 0).sum(-1), torch.tensor([2, 4, 6]).expand(9, 3))  # ties broken too


@pytest.mark.parametrize("routing", ["soft", "straight_through"])
@pytest.mark.parametrize("shrinkage", ["topk", "soft"])
def test_gate_and_dictionaries_receive_gradients(routing, shrinkage):
    """The earlier pipeline's loss sent no gradient to its gate or dictionaries.

    (docs/moe.md, "Defects of the earlier pipeline")
    """
    model = _model(routing=routing, shrinkage=shrinkage)
    x = torch.randn(32, 10, generator=_generator(5))
    keys = torch.stack([torch.arange(32) % 2, torch.arange(32) % 3], dim=1)
    embedding, aux = model(x)
    model.loss_terms(embedding, aux, keys)["total"].backward()
    assert model.gate.keys.grad.abs().sum() > 0
    assert model.gate.query.weight.grad.abs().sum() > 0
    dictionary_grad = model.experts.dictionary.grad.abs().sum(dim=(1, 2))  # (E,)
    used = aux["expert_counts"] > 0
    assert (dictionary_grad[used] > 0).all()
    if routing == "soft":
        assert (dictionary_grad > 0).all()  # every expert contributes to the soft mixture
    else:
        assert (dictionary_grad[~used] == 0).all()  # hard forward: unrouted dictionaries untouched
    if shrinkage == "soft":
        assert model.experts.raw_threshold.grad.abs().sum() > 0


def test_straight_through_routing_uses_one_expert_forward():
    model = _model(routing="straight_through")
    x = torch.randn(16, 10, generator=_generator(6))
    _, aux = model(x)
    chosen = aux["expert_index"].squeeze(-1)
    torch.testing.assert_close(aux["code"], aux["codes"][torch.arange(16), chosen])
    torch.testing.assert_close(aux["combine_weights"], torch.nn.functional.one_hot(chosen, 3).float())
    assert aux["expert_counts"].sum().item() == 16


def test_soft_routing_mixes_codes_with_the_gate_probabilities():
    model = _model()
    x = torch.randn(5, 10, generator=_generator(7))
    _, aux = model(x)
    torch.testing.assert_close(aux["combine_weights"], aux["router_probs"])
    torch.testing.assert_close(aux["code"], torch.einsum("be,bem->bm", aux["router_probs"], aux["codes"]))
    squared_error = ((x[:, None, :] - model.experts.reconstruct(aux["codes"])) ** 2).sum(-1)
    expected = (aux["router_probs"] * squared_error).sum(-1).mean()
    torch.testing.assert_close(aux["reconstruction_loss"], expected)


@pytest.mark.parametrize("routing", ["soft", "straight_through"])
@pytest.mark.parametrize("mode", ["mask", "zero", "drop"])
def test_batched_single_expert_ablations_equal_separate_passes(routing, mode):
    model = _model(routing=routing)
    x = torch.randn(8, 10, generator=_generator(8))
    batched, aux = model(x, Ablation.each_expert(3, mode))
    assert batched.shape == (3, 8, 4) and aux["expert_counts"].shape == (3, 3)
    for expert in range(3):
        single, single_aux = model(x, Ablation.of([expert], 3, mode))
        torch.testing.assert_close(batched[expert], single)
        assert (single_aux["combine_weights"][..., expert] == 0).all()
        if mode == "mask":
            assert not (single_aux["expert_index"] == expert).any()


def test_drop_ablation_renormalises_the_soft_mixture_and_empties_a_dropped_hard_choice():
    soft = _model()
    x = torch.randn(8, 10, generator=_generator(9))
    _, aux = soft(x, Ablation.of([0], 3, "drop"))
    torch.testing.assert_close(aux["combine_weights"].sum(-1), torch.ones(8))
    hard = _model(routing="straight_through")
    _, base = hard(x)
    chosen = int(base["expert_index"][0, 0])
    _, dropped = hard(x, Ablation.of([chosen], 3, "drop"))
    hit = base["expert_index"][:, 0] == chosen
    assert (dropped["code"][hit] == 0).all()
    torch.testing.assert_close(dropped["code"][~hit], base["code"][~hit])


def test_training_steps_reduce_the_loss_and_move_the_gate():
    model = _model()
    generator = _generator(10)
    centers = torch.randn(3, 10, generator=generator) * 3
    domain = torch.arange(48) % 3
    x = centers[domain] + 0.3 * torch.randn(48, 10, generator=generator)
    keys = domain.unsqueeze(1)
    keys_before = model.gate.keys.detach().clone()
    dictionary_before = model.experts.dictionary.detach().clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        embedding, aux = model(x)
        terms = model.loss_terms(embedding, aux, keys)
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
        losses.append(terms["total"].item())
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.equal(model.gate.keys, keys_before)
    assert not torch.equal(model.experts.dictionary, dictionary_before)


def test_building_is_seeded_deterministic_and_checks_the_input_dimension():
    state = torch.random.get_rng_state()
    first, second = _model(), _model()
    assert torch.equal(torch.random.get_rng_state(), state)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    x = torch.randn(4, 10, generator=_generator(11))
    assert torch.equal(first(x)[0], second(x)[0])
    with pytest.raises(ValueError, match="dimension 9"):
        first(torch.randn(4, 9))
    with pytest.raises(ValueError, match="expects input dimension 64, the data has 10"):
        DictionaryMoEConfig(input_dim=64).build(input_dim=10)
