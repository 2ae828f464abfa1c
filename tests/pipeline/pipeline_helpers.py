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


def forkserver_env(env: dict, runtime: Path, **values: str) -> dict:
    """``env`` with a private folder for fork-server sockets (``XDG_RUNTIME_DIR``), so that no
    other test's or user's server is reused, and FSS_FORKSERVER* values (``FSS_FORKSERVER=None``
    removes the switch: on under DVC, off elsewhere)."""
    runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = dict(env, XDG_RUNTIME_DIR=str(runtime), FSS_FORKSERVER_IDLE="120")
    env.pop("DVC_STAGE", None)
    for key, value in values.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def forkserver_log(runtime: Path) -> str:
    import os

    logs = list((runtime / f"fss-forkserver-{os.getuid()}").glob("*.log"))
    return "\n".join(p.read_text() for p in logs)


def stop_forkservers(runtime: Path) -> None:
    """SIGTERM every fork server that serves from ``runtime`` (their pids are in the lock files)."""
    import os
    import signal

    for lock in runtime.glob("fss-forkserver-*/*.lock"):
        text = lock.read_text().strip()
        if text.isdigit():
            try:
                os.kill(int(text), signal.SIGTERM)
            except ProcessLookupError:
                pass
