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

#: Submodule -> the public names it defines (imported on first use).
_MODULE_EXPORTS = {
    "builtin": ("BUILTIN_MODELS", "builtin_model_dir", "cache_root", "is_builtin"),
    "loading": ("LoadedModel", "load_model", "resolve_device", "resolve_dtype"),
    "pooling": ("POOLINGS", "pool", "masked_mean", "first_token", "last_token"),
    "encoder": ("TextEncoder", "BatchPlan", "EncodedWindow", "plan_batches"),
    "tokens": ("embedding_matrix", "iter_token_blocks", "token_strings"),
}
_EXPORTS = {name: module for module, names in _MODULE_EXPORTS.items() for name in names}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moespec.embedding' has no attribute {name!r}")
    return getattr(importlib.import_module(f"moespec.embedding.{_EXPORTS[name]}"), name)
