"""Fixtures of the sweep tests: a tiny synthetic benchmark and tiny study files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

FSS = str(Path(sys.executable).parent / "fss")


@pytest.fixture(scope="session")
def sweep_data(synthetic_root) -> Path:
    """The shared tiny synthetic benchmark (tests/conftest.py)."""
    return synthetic_root


def tiny_set(root: Path, iterations: int = 2, **extra) -> dict:
    values = {
        "data.root": str(root), "data.train_size": 33, "train.batch_size": 2, "train.iterations": iterations,
        "train.device": "cpu", "train.checkpoint_minutes": 0, "train.log_every": 1, "validation.every": 0,
        "validation.episodes": 4, "test.size": 33, "test.batch_size": 4, "knobs.reduce_dim": 16,
    }
    values.update(extra)
    return values


def write_study(path: Path, root: Path, *, params=None, iterations: int = 2, extra_set=None, **keys) -> Path:
    """A tiny APANet study file (grid over lam unless ``params`` says otherwise)."""
    doc = {
        "study": keys.pop("study", path.stem), "method": "apanet", "dataset": "synthetic", "folds": [0],
        "shots": [1], "backbone": "small", "set": tiny_set(root, iterations, **(extra_set or {})),
        "params": params or {"knobs.lam": {"values": [0.0, 1.0]}},
        "output": str(path.parent / "out" / "{study}"),
    }
    doc.update(keys)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


from postgres_server import postgres_url  # noqa: E402,F401  (the throw-away PostgreSQL server fixture)
