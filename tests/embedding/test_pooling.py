"""Pooling: padding never counts, both padding sides, float32 out."""

from __future__ import annotations

import pytest
import torch

from moespec.embedding.pooling import first_token, last_token, masked_mean, pool

LENGTHS = [5, 2, 7, 1]
SEQ, DIM = 7, 3


def _batch(side: str) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Random states, a mask for ``LENGTHS``, and each row's real states; pads hold huge garbage."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.full((len(LENGTHS), SEQ, DIM), 1e6)
    mask = torch.zeros(len(LENGTHS), SEQ, dtype=torch.long)
    real = []
    for row, n in enumerate(LENGTHS):
        states = torch.randn(n, DIM, generator=generator)
        where = slice(0, n) if side == "right" else slice(SEQ - n, SEQ)
        hidden[row, where], mask[row, where] = states, 1
        real.append(states)
    return hidden, mask, real


@pytest.mark.parametrize("side", ["right", "left"])
def test_masked_mean_ignores_padding(side):
    hidden, mask, real = _batch(side)
    expected = torch.stack([states.mean(0) for states in real])
    assert torch.allclose(masked_mean(hidden, mask), expected, atol=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_last_token_is_the_last_real_token_on_either_side(side):
    hidden, mask, real = _batch(side)
    assert torch.equal(last_token(hidden, mask), torch.stack([states[-1] for states in real]))


@pytest.mark.parametrize("side", ["right", "left"])
def test_first_token_is_the_first_real_token_on_either_side(side):
    hidden, mask, real = _batch(side)
    assert torch.equal(first_token(hidden, mask), torch.stack([states[0] for states in real]))


def test_pooling_is_float32_even_from_bfloat16():
    hidden, mask, _ = _batch("right")
    hidden = torch.where(mask.bool().unsqueeze(-1), hidden, 0.0).to(torch.bfloat16)
    for method in ("mean", "cls", "last"):
        assert pool(hidden, mask, method).dtype == torch.float32


def test_a_row_without_tokens_gives_nan_not_a_silent_zero():
    hidden = torch.ones(1, 3, 2)
    assert torch.isnan(masked_mean(hidden, torch.zeros(1, 3))).all()
