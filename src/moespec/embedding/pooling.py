"""Pooling token states into one vector per text, padding-aware, always in float32.

Measured pitfalls these functions avoid (docs/performance.md, "Pooling"): a plain
``hidden.mean(1)`` averages the pads in (min cosine 0.87 against the correct embedding), and
``hidden[:, -1]`` with right padding returns a pad position (min cosine 0.93). Every pooler here
finds positions from the attention mask, so it is correct with right *and* left padding.
"""

from __future__ import annotations

from typing import Callable

import torch

POOLINGS = ("mean", "cls", "last")


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real (non-padding) tokens.

    Parameters
    ----------
    hidden : Tensor of shape (batch, seq, dim)
    mask : Tensor of shape (batch, seq)
        Attention mask, 1 for real tokens, 0 for padding.

    Returns
    -------
    Tensor of shape (batch, dim), float32
        NaN for a row without real tokens (callers reject those; a silent zero would hide them).
    """
    weights = mask.to(torch.float32).unsqueeze(-1)  # (B, T, 1)
    return (hidden.to(torch.float32) * weights).sum(1) / weights.sum(1)


def first_token(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """State of the first real token (``[CLS]`` / ``<s>``), at position 0 with right padding.

    Returns
    -------
    Tensor of shape (batch, dim), float32
    """
    first = mask.to(torch.int32).argmax(1)  # (B,) argmax returns the first maximum
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), first].to(torch.float32)


def last_token(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """State of the last real token: in a causal decoder the only one that has seen the whole text.

    Right padding: position ``mask.sum(1) - 1``; left padding: position -1. Both are the last 1 of
    the mask, found here without assuming a padding side (the ``last_token_pool`` of
    e5-mistral / Qwen3-Embedding handles the two sides the same way).

    Returns
    -------
    Tensor of shape (batch, dim), float32
    """
    seq = mask.shape[1]
    last = seq - 1 - mask.to(torch.int32).flip(1).argmax(1)  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].to(torch.float32)


POOLERS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mean": masked_mean,
    "cls": first_token,
    "last": last_token,
}


def pool(hidden: torch.Tensor, mask: torch.Tensor, method: str) -> torch.Tensor:
    """Pool ``hidden`` (batch, seq, dim) with ``method`` in :data:`POOLINGS`; returns (batch, dim) float32."""
    return POOLERS[method](hidden, mask)
