"""Fixtures of the pipeline tests (synthetic_root and subprocess_env live in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import REPO_PARAMS


@pytest.fixture
def repo_params() -> Path:
    return REPO_PARAMS
