"""A throw-away PostgreSQL server for the sweep tests (Debian's `postgresql` package).

``initdb`` writes a cluster into a new temporary directory, ``pg_ctl`` starts it on
127.0.0.1 at a free port (unix socket in the same directory), trust authentication for the
user ``fss`` and one database ``fss``; the server is stopped and the directory removed after
the test session. Run as root (CI, containers), the server runs as the ``postgres`` user
through ``runuser``, since PostgreSQL refuses to run as root.

Where no PostgreSQL is installed or it cannot start, the tests that need it are skipped with
the reason, unless ``FSS_REQUIRE_POSTGRES=1`` (set by ``.ci/run`` once it has installed the
package), where that is a failure instead.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def _bin_dir() -> Path | None:
    """The newest PostgreSQL server binaries (Debian keeps them off PATH)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent  # Debian: /usr/lib/postgresql/N/bin (symlinks elsewhere)
    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb") + glob.glob("/usr/local/pgsql/bin/initdb")
    if not candidates:
        return None
    return Path(max(candidates, key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parts[-3].split(".")])).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _give_up(reason: str):
    if os.environ.get("FSS_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{reason} (FSS_REQUIRE_POSTGRES=1: .ci/run installed PostgreSQL, so it must run)")
    pytest.skip(reason)


class PostgresServer:
    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.as_user: list[str] = []
        self.base = Path(tempfile.mkdtemp(prefix="fss-pg-"))
        if os.geteuid() == 0:  # postgres refuses root: run it as the package's system user
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.base)
                _give_up("running as root and there is no 'postgres' user to run the PostgreSQL server as")
            runuser = shutil.which("runuser")
            if runuser is None:
                shutil.rmtree(self.base)
                _give_up("running as root and 'runuser' is missing, so the PostgreSQL server cannot drop root")
            os.chown(self.base, user.pw_uid, user.pw_gid)
            self.as_user = [runuser, "-u", "postgres", "--"]
        self.data = self.base / "data"
        self.port = _free_port()
        self.url = f"postgresql://fss@127.0.0.1:{self.port}/fss"

    def _run(self, tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*self.as_user, str(self.bindir / tool), *args], capture_output=True, text=True,
                              timeout=timeout, cwd=self.base)

    def start(self) -> None:
        steps = [
            ("initdb", "-D", str(self.data), "-U", "fss", "--auth=trust", "-E", "UTF8", "--no-sync"),
            ("pg_ctl", "-D", str(self.data), "-l", str(self.base / "server.log"), "-w", "-t", "60", "-o",
             f"-h 127.0.0.1 -p {self.port} -k {self.base} -c fsync=off -c synchronous_commit=off "
             f"-c full_page_writes=off -c max_connections=40", "start"),
            ("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "fss", "fss"),
        ]
        for step in steps:
            done = self._run(*step)
            if done.returncode != 0:
                log = self.base / "server.log"
                tail = log.read_text()[-600:] if log.is_file() else ""
                self.stop()
                _give_up(f"PostgreSQL {step[0]} failed: {(done.stderr or done.stdout).strip()[-600:]} {tail}".strip())

    def stop(self) -> None:
        pidfile = self.data / "postmaster.pid"
        if pidfile.exists():
            done = self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
            if done.returncode != 0 and pidfile.exists():  # never leave a server behind
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pidfile.read_text().split()[0]), signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """``postgresql://fss@127.0.0.1:PORT/fss`` of a server that lives for the test session."""
    bindir = _bin_dir()
    if bindir is None:
        _give_up("PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run does it)")
    server = PostgresServer(bindir)
    start = time.monotonic()
    server.start()
    print(f"PostgreSQL {bindir.parent.name} up in {time.monotonic() - start:.1f} s at {server.url}")
    try:
        yield server.url
    finally:
        server.stop()
