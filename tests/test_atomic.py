"""fss.atomic: a write is all or nothing, and a killed writer's temporary file is removed later."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from fss.atomic import atomic_path, atomic_write_text, remove_stale_temporaries


def test_an_exception_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_a_killed_writers_temporary_is_removed_and_a_live_ones_kept(tmp_path):
    code = ("import os, sys; from fss.atomic import atomic_path\n"
            f"with atomic_path({str(tmp_path / 'checkpoint.pt')!r}) as t:\n"
            "    t.write_bytes(b'x' * 100); print(t, flush=True); os.kill(os.getpid(), 9)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    left = tmp_path / proc.stdout.strip().rsplit("/", 1)[-1]
    assert left.is_file() and not (tmp_path / "checkpoint.pt").exists()
    with atomic_path(tmp_path / "other.pt") as live:  # this process's own write in progress
        live.write_bytes(b"y")
        assert remove_stale_temporaries(tmp_path) == [left]
        assert live.is_file()
    assert not left.exists() and (tmp_path / "other.pt").read_bytes() == b"y"
