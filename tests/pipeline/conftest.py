"""Shared fixtures of the pipeline tests: a tiny synthetic benchmark and CLI helpers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from pipeline.config import REPO_PARAMS

@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """The real synthetic generator, tiny: 48 px images, 60 train / 80 val (5-shot works)."""
    from fss.data.synthetic import prepare_synthetic

    root = tmp_path_factory.mktemp("synthetic") / "data"
    prepare_synthetic(root, seed=0, size=48, train_images=60, val_images=80)
    return root


@pytest.fixture
def repo_params() -> Path:
    return REPO_PARAMS


@pytest.fixture
def subprocess_env() -> dict:
    env = dict(os.environ)
    env["WANDB_MODE"] = "disabled"
    env["OMP_NUM_THREADS"] = "1"
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env
