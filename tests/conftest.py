"""Shared fixtures: a private model cache per test session, tiny experiment configs."""

from __future__ import annotations

import contextlib
import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Build the built-in models once per session in a private cache (never the user's)."""
    if "MOESPEC_CACHE" not in os.environ:
        os.environ["MOESPEC_CACHE"] = str(tmp_path_factory.mktemp("moespec-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    yield


@contextlib.contextmanager
def one_torch_thread():
    """Run torch on one thread, then restore: tiny models in small batches stall on thread barriers
    when the box is shared, and a stage run inline must match its one-thread job bit for bit."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_experiment(name: str = "t", n_per_domain: int = 4, **sections) -> dict:
    """A small experiment dict on the built-in corpus and model."""
    config = {
        "experiment": name,
        "embed": {"model": {"name": "builtin:tiny-bert"}, "data": [{"kind": "builtin", "n_per_domain": n_per_domain}],
                  "batch_size": 16, "max_length": 64},
    }
    config.update(sections)
    return config
