"""Test-suite settings shared by every test module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

#: Key/shape listings of the released checkpoints and pretrained backbones
#: (copied from the project's spec: ``key<TAB>shape<TAB>dtype`` per line).
CHECKPOINT_KEYS = Path(__file__).parent / "fixtures" / "checkpoint_keys"

#: The tiny synthetic benchmark of the tests (`synthetic_root`, the DVC tests' graph). With seed 0
#: every base class of every fold has at least 6 training images and every novel class at least 9
#: validation and holdout images (a 5-shot episode needs 6).
TINY_SYNTHETIC = dict(size=48, train_images=140, val_images=160, holdout_images=160)

# Tracking stays off in tests unless a test turns it on explicitly.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny tensors run faster on one thread, and a loaded 2-core machine does not thrash."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def checkpoint_keys() -> Path:
    return CHECKPOINT_KEYS


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """The real synthetic generator at `TINY_SYNTHETIC`'s sizes. Shared by the pipeline, sweep,
    cache, bench and distributed tests."""
    from fss.data.synthetic import prepare_synthetic

    root = tmp_path_factory.mktemp("synthetic") / "data"
    prepare_synthetic(root, seed=0, **TINY_SYNTHETIC)
    return root


@pytest.fixture
def subprocess_env() -> dict:
    """Environment of CLI subprocesses: W&B off, one torch thread, the env's `fss` on PATH."""
    import sys

    env = dict(os.environ)
    env["WANDB_MODE"] = "disabled"
    env["OMP_NUM_THREADS"] = "1"
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env
