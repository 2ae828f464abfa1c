"""Helpers of the pipeline tests (imported by the test modules)."""

from __future__ import annotations

import sys
from pathlib import Path

#: the console scripts of this environment
FSS = str(Path(sys.executable).parent / "fss")
DVC = str(Path(sys.executable).parent / "dvc")


def tiny_sets(root: Path, **extra) -> list[str]:
    """--set overrides that make a pfenet run take a second or two on a CPU."""
    values = {
        "data.root": str(root),
        "data.train_size": 33,
        "train.batch_size": 2,
        "train.log_every": 1,
        "train.checkpoint_minutes": 0,
        "validation.every": 2,
        "validation.episodes": 4,
        "test.size": 33,
        "test.episodes": 6,
        "test.batch_size": 3,
        "test.figure_episodes": 2,
        "knobs.reduce_dim": 16,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def run_fss(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the `fss` entry point in-process (main() with its one-line error handling)."""
    from pipeline.cli import main

    old = sys.argv
    sys.argv = ["fss", *map(str, args)]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])

