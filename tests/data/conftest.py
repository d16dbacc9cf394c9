"""Fixtures of the data tests: no network, and a private ``datasets`` cache."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def _datasets_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("hf-datasets")


@pytest.fixture(autouse=True)
def _offline_private_cache(monkeypatch, _datasets_cache):
    """Unknown datasets fail at once (no hub retries); arrow caches of local files go to a temp folder."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", _datasets_cache)
