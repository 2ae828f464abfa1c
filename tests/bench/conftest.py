"""Fixtures of the benchmark / precision tests: a tiny synthetic dataset."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bench_synthetic_root(synthetic_root) -> Path:
    """The shared tiny synthetic benchmark (tests/conftest.py)."""
    return synthetic_root
