"""Fixtures of the feature-cache and data-loading tests: a tiny synthetic benchmark."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cache_synthetic_root(synthetic_root) -> Path:
    """The shared tiny synthetic benchmark (tests/conftest.py)."""
    return synthetic_root


@pytest.fixture(scope="session")
def cache_val_data(cache_synthetic_root):
    """Fold 0 val list (decoded images cached in memory)."""
    from fss.data.access import open_prepared

    return open_prepared(cache_synthetic_root, 0, "val", cache=True)
