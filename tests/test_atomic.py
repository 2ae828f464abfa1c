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


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_mode_of_the_umask(tmp_path, umask):
    """Every atomic writer (text, JSON, checkpoints, figures, feature cache) leaves 0666 & ~umask:
    0644 under umask 022, so teammates can read results; 0600 under 077 (issue 15)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from fss.models.checkpoints import atomic_torch_save
    from fss.models.feature_cache import FeatureCache
    from pipeline.figures import _save
    from pipeline.runs import write_json

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        write_json(tmp_path / "metrics.json", {"miou": 0.5})
        atomic_torch_save({"w": torch.zeros(2)}, tmp_path / "checkpoint.pt")
        fig = plt.figure()
        _save(fig, tmp_path / "plot.png")
        plt.close(fig)
        cache = FeatureCache(max_bytes=1 << 20, directory=tmp_path / "cache")
        cache._write_disk("ab" * 32, (torch.ones(3),))
        written = [tmp_path / n for n in ("a.txt", "metrics.json", "checkpoint.pt", "plot.png")]
        written.append(cache.disk_path("ab" * 32))
    finally:
        os.umask(old)
    for path in written:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob(".*.png"))
