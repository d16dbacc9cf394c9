"""Embedding texts (and tokens) with Hugging Face models.

- :mod:`~moespec.embedding.loading`: ``load_model`` (hub name, local folder or ``builtin:`` name;
  device, dtype, pad token) and how to run offline on a cluster.
- :mod:`~moespec.embedding.builtin`: the built-in tiny models ``builtin:tiny-bert`` and
  ``builtin:tiny-llama``, built in code and cached.
- :mod:`~moespec.embedding.pooling`: padding-aware mean / first-token / last-token pooling in float32.
- :mod:`~moespec.embedding.encoder`: ``TextEncoder`` — length-sorted batches, rows back in input order.
- :mod:`~moespec.embedding.tokens`: the input embedding matrix, row block by row block.

Names are imported lazily (``from moespec.embedding import TextEncoder`` imports torch then, not
``import moespec.embedding``), so that configs can be validated without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BUILTIN_MODELS": "builtin",
    "builtin_model_dir": "builtin",
    "cache_root": "builtin",
    "is_builtin": "builtin",
    "LoadedModel": "loading",
    "load_model": "loading",
    "resolve_device": "loading",
    "resolve_dtype": "loading",
    "POOLINGS": "pooling",
    "pool": "pooling",
    "masked_mean": "pooling",
    "first_token": "pooling",
    "last_token": "pooling",
    "TextEncoder": "encoder",
    "BatchPlan": "encoder",
    "EncodedWindow": "encoder",
    "plan_batches": "encoder",
    "embedding_matrix": "tokens",
    "iter_token_blocks": "tokens",
    "token_strings": "tokens",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moespec.embedding' has no attribute {name!r}")
    return getattr(importlib.import_module(f"moespec.embedding.{_EXPORTS[name]}"), name)
