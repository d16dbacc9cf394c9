"""The flat-buffer optimiser: the same updates as torch's fused Adam(W) on the separate tensors."""

from __future__ import annotations

import copy

import pytest
import torch

from moespec.models import DictionaryMoEConfig
from moespec.models.optim import flat_adam


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_flat_adam_matches_torch_adam_on_separate_tensors(kind):
    model = DictionaryMoEConfig(
        n_experts=3,
        sparsity_levels=[2, 3, 4],
        query_dim=8,
        code_dim=6,
        n_layers=2,
        projection_hidden=5,
        projection_dim=4,
    ).build(input_dim=10, seed=0)
    reference = copy.deepcopy(model)
    optimizer = flat_adam(model, lr=1e-2, weight_decay=0.1, kind=kind)
    reference_class = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    reference_optimizer = reference_class(reference.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(8, 10, generator=generator)
        keys = torch.randint(0, 3, (8,), generator=generator)
        for net, opt in ((model, optimizer), (reference, reference_optimizer)):
            opt.zero_grad()
            embedding, aux = net(x)
            net.loss_terms(embedding, aux, keys)["total"].backward()
            opt.step()
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, msg=lambda m, name=name: f"{name}: {m}")
        assert ours.grad is not None and ours.grad.data_ptr() != theirs.grad.data_ptr()


def test_parameters_and_gradients_are_views_of_one_buffer():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = flat_adam(model, lr=0.1)
    (flat,) = optimizer.param_groups[0]["params"]
    assert flat.numel() == sum(p.numel() for p in model.parameters())
    model(torch.ones(5, 3)).sum().backward()
    assert flat.grad.abs().sum() > 0
    torch.testing.assert_close(flat.grad[:12].view(4, 3), model[0].weight.grad)
    optimizer.step()
    optimizer.zero_grad()  # in place: the views survive and read zero
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() == 0
    assert flat.data_ptr() == model[0].weight.data_ptr()
    before = model[1].bias.detach().clone()
    model(torch.ones(5, 3)).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model[1].bias)
