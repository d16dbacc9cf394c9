"""Fixtures of the embedding tests: the built-in models, loaded once, and no network."""

from __future__ import annotations

import pytest

from tests.builders import one_torch_thread


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Never reach the hub: a lookup of an unknown model fails at once instead of retrying for a minute."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def tiny_bert():
    from moespec.embedding.loading import load_model

    return load_model("builtin:tiny-bert")


@pytest.fixture(scope="session")
def tiny_llama():
    from moespec.embedding.loading import load_model

    return load_model("builtin:tiny-llama")


@pytest.fixture(scope="session")
def corpus_texts():
    """30 built-in texts of heavy-tailed lengths, 5 per domain."""
    from moespec.data import BuiltinSource

    return BuiltinSource(n_per_domain=5, seed=3).load().texts
