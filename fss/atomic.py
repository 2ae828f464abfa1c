"""Atomic file writes: a file is either absent, its old version, or complete.

Everything the project writes (prepared datasets, checkpoints, metrics, tables) goes through
:func:`atomic_path`: the content is written to a temporary file in the target's directory,
flushed to disk, then renamed over the target; an exception or a kill before the rename
leaves no partial target (the temporary file is removed on exceptions).

Temporary files are created with mode ``0o666`` less the process umask (the mode ``open``
gives a new file: 0644 under umask 022), not ``tempfile.mkstemp``'s 0600, so that a renamed
output is as readable by others as any file the user writes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path
from typing import Iterator

from fss.errors import StorageError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on a clean exit it replaces ``path``.

    The writer inside the block writes the temporary path by name (``torch.save``, PIL's
    ``Image.save``, ``open``). Parent directories are created.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # the writer's pid in the name lets a later run remove what a killed writer left
    fd, tmp = create_temporary(target.parent, prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        full = disk_full(exc)
        if full is not None:
            raise StorageError(f"no space left to write {target} ({full.strerror}); its previous version, if any, "
                               "is kept: free space or write elsewhere, then rerun.") from None
        raise


def create_temporary(directory: str | os.PathLike, prefix: str, suffix: str) -> tuple[int, Path]:
    """A new empty file ``directory/PREFIX<random>SUFFIX`` opened for writing: ``(fd, path)``.

    Like ``tempfile.mkstemp`` (exclusive creation, so never another process's file), but
    with the mode a plain ``open`` gives: ``0o666`` less the umask (and any default ACL),
    applied by the kernel at creation."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        path = Path(directory) / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name {prefix}*{suffix} in {directory}")


def disk_full(exc: BaseException | None) -> OSError | None:
    """The ENOSPC/EDQUOT error behind ``exc``, also where a writer raised another exception
    while handling it (torch.save's zip writer raises RuntimeError "enforce fail" then)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary files in ``directory`` of atomic writes whose process is gone
    (a SIGKILL between creating and renaming one); returns the removed paths."""
    removed = []
    for tmp in Path(directory).glob(".*.tmp"):
        pid = tmp.name[: -len(".tmp")].split(".")[-2]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = True) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text, encoding="utf-8")
