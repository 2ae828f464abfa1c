"""Helpers of the torchrun tests (imported by the test modules)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

#: the console script of this environment (torchrun runs it with this python)
FSS = str(Path(sys.executable).parent / "fss")


def subprocess_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["WANDB_MODE"] = "disabled"
    env["OMP_NUM_THREADS"] = "1"
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def torchrun_command(args: list, nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run --standalone`` (a free port) running ``fss ARGS``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            FSS, *map(str, args)]


def torchrun(args: list, cwd: Path, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(args, nproc), cwd=cwd, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


def train_sets(root: Path, **sets) -> list[str]:
    """``--set`` values of a tiny CPU run (33 px crops, global batch 4, no validation)."""
    values = {
        "data.root": root,
        "data.train_size": 33,
        "train.batch_size": 4,
        "train.log_every": 1,
        "train.checkpoint_minutes": 0,
        "validation.every": 0,
        "validation.select": "last",
        "test.size": 33,
        "test.episodes": 6,
        "test.batch_size": 3,
        "test.figure_episodes": 0,
    }
    values.update(sets)
    return [f"{key}={value}" for key, value in values.items()]


def train_args(method: str, root: Path, out: Path, iterations: int, **sets) -> list:
    """``fss train`` arguments of a tiny CPU run (see :func:`train_sets`)."""
    args = ["train", "--method", method, "--dataset", "synthetic", "--fold", 0, "--out", out,
            "--iterations", iterations, "--device", "cpu"]
    for item in train_sets(root, **sets):
        args += ["--set", item]
    return args
