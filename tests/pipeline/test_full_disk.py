"""A full disk is one line naming the file, the previous version is kept, and the run resumes
once there is space (issue 17). Uses a small tmpfs; skipped where mounting one is not allowed."""

from __future__ import annotations

import subprocess

import pytest
import torch

from fss.errors import StorageError
from fss.models.checkpoints import atomic_torch_save
from pipeline import runs as R
from pipeline.config import REPO_PARAMS
from pipeline_helpers import FSS, tiny_sets


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def _grow(mount, size="256m"):
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)


def test_a_checkpoint_that_does_not_fit_keeps_the_previous_one(small_disk):
    target = small_disk / "model.pt"
    atomic_torch_save({"w": torch.zeros(10)}, target)
    before = target.read_bytes()
    with pytest.raises(StorageError) as info:
        atomic_torch_save({"w": torch.zeros(200_000)}, target)
    assert str(target) in str(info.value) and "\n" not in str(info.value)
    assert target.read_bytes() == before and [p.name for p in small_disk.iterdir()] == ["model.pt"]


def test_fss_train_on_a_full_disk_is_one_line_and_reruns(small_disk, synthetic_root, subprocess_env):
    out = small_disk / "run"
    cmd = [FSS, "train", "--method", "pfenet", "--dataset", "synthetic", "--fold", "0", "--iterations", "4",
           "--device", "cpu", "--params", str(REPO_PARAMS), "--out", str(out)]
    for item in tiny_sets(synthetic_root, **{"train.checkpoint_every": 2, "data.num_workers": 1}):
        cmd += ["--set", item]
    full = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 2, full.stderr[-2000:]
    lines = [line for line in full.stderr.splitlines() if line.strip()]
    assert "Traceback" not in full.stderr and "no space left" in lines[-1] and str(out) in lines[-1]
    assert not list(out.glob(".*.tmp"))
    _grow(small_disk)
    again = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / R.MODEL_SELECTED).is_file()
