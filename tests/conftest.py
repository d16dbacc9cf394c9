"""Shared fixtures: a private model cache per test session (builders are in ``tests/builders.py``)."""

from __future__ import annotations

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
