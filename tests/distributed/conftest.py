"""Fixtures of the torchrun tests: tiny synthetic data (helpers: ddp_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def synthetic_data(synthetic_root) -> Path:
    """The shared tiny synthetic benchmark (tests/conftest.py)."""
    return synthetic_root


@pytest.fixture(scope="session")
def unbanded_data(synthetic_data, tmp_path_factory) -> Path:
    """The same data with the 255 boundary band relabelled background.

    Every mask pixel is then valid, so each rank's loss averages the same number of pixels
    and the mean of the per-rank losses is the global batch's loss (one-process equality).
    """
    import shutil

    from fss.data.imageio import read_mask, write_mask

    root = tmp_path_factory.mktemp("ddp-unbanded") / "data"
    shutil.copytree(synthetic_data, root)
    for path in sorted((root / "SegmentationClass").glob("*.png")):
        mask = read_mask(path)
        write_mask(path, np.where(mask == 255, 0, mask).astype(np.uint8))
    return root
