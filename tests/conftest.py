"""Test-suite settings shared by every test module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

#: Key/shape listings of the released checkpoints and pretrained backbones
#: (copied from the project's spec: ``key<TAB>shape<TAB>dtype`` per line).
CHECKPOINT_KEYS = Path(__file__).parent / "fixtures" / "checkpoint_keys"

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
