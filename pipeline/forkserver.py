"""Warm starts for the `fss` processes of a DVC graph: a fork server.

Every stage of ``dvc repro`` is a new ``fss`` process, and most of a short stage is start-up:
on a 2-core machine importing torch alone takes 2.5 to 4.5 s, about a third of an embedded
train or evaluate stage. Under DVC (``DVC_STAGE`` is set) or with ``FSS_FORKSERVER=1``, the
``fss`` console script is a thin client that asks a server holding the heavy third-party
libraries already imported (:data:`PRELOAD`: torch, numpy, PIL, yaml, typer, rich) to fork a
copy of itself, which then runs the command exactly as a fresh process would:

* the client sends its argv, working directory, umask and whole environment, and passes its
  stdin/stdout/stderr as file descriptors (``SCM_RIGHTS``); the forked worker takes them as
  fds 0/1/2, rebuilds ``sys.stdin/stdout/stderr``, reseeds the global RNGs a fresh process
  would seed from the OS, and imports the project's own code (``fss``, ``pipeline``) fresh,
  so an edited source file is always the one that runs;
* signals the client gets (Ctrl-C, a kill from DVC or a scheduler) are forwarded to the
  worker; if the client dies, the worker gets SIGTERM (training then checkpoints and stops);
  the client exits with the worker's exit code, or dies of the worker's signal;
* a server is reused only by a client whose fingerprint matches the server's own
  (:func:`fingerprint`: interpreter and flags, ``sys.path`` and the modification times of
  its folders, so an install or ``uv sync`` invalidates it, this file, the user and every
  environment variable except the per-stage ones in :data:`VOLATILE_ENV`); a server that
  gets a request of another environment stops, and that command runs in-process;
* anything that fails before the hand-over (no server yet, a stale one, an unsupported
  platform) runs the command in the client's own process, and a missing server is started
  in the background (detached, its own session) for the next command. The hand-over is
  two-phase (the server accepts the request, the client says "go", only then is the
  worker forked), so a command never runs both in the client and in a worker. A server
  exits once no command of its has run for ``FSS_FORKSERVER_IDLE`` seconds (default 60).

``FSS_FORKSERVER=0`` turns it off everywhere, ``1`` turns it on outside DVC too. Only
Linux is supported (fork, Unix sockets with fd passing, ``SO_PEERCRED``); elsewhere the
client always runs in-process. The socket is in Linux's abstract namespace and the server
serves only its own user; its lock file (the server's pid) and log (a line per command) are
in the user's 0700 folder ``$XDG_RUNTIME_DIR/fss-forkserver-<uid>`` (``/tmp`` without
``XDG_RUNTIME_DIR``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import select
import signal
import socket
import struct
import sys
import time

ENV_SWITCH = "FSS_FORKSERVER"
ENV_IDLE = "FSS_FORKSERVER_IDLE"
DEFAULT_IDLE_S = 60.0
#: the hidden first argument of the console script that makes the process a server
SERVE_ARG = "--fss-forkserver-serve"
#: third-party modules the server imports before it forks workers (never the project's own)
PRELOAD = (
    "numpy",
    "torch",
    "torch.nn.functional",
    "torch.utils.data",
    "PIL.Image",
    "PIL.ImageDraw",
    "yaml",
    "typer",
    "click",
    "rich.console",
    "rich.progress",
)
#: environment variables that differ between the stages of one ``dvc repro`` and that
#: nothing reads at import time; every other variable must match the server's
VOLATILE_ENV = frozenset({"DVC_STAGE", "PWD", "OLDPWD", "SHLVL", "_"})
#: signals a client passes on to its worker
FORWARDED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
_HEADER = struct.Struct("!I")
_MAX_MESSAGE = 1 << 24


# ---------------------------------------------------------------- when and where


def supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(socket, "send_fds") and hasattr(os, "fork")


def wanted(env: dict | None = None) -> bool:
    """Whether ``fss`` should go through the fork server: ``FSS_FORKSERVER`` 1/0, else under DVC
    (except under torchrun)."""
    env = os.environ if env is None else env
    switch = env.get(ENV_SWITCH, "").strip().lower()
    if switch in ("0", "false", "no", "off"):
        return False
    if switch in ("1", "true", "yes", "on"):
        return True
    # torchrun's ranks differ in their environment (RANK, ...), so none could share a server
    return bool(env.get("DVC_STAGE")) and "TORCHELASTIC_RUN_ID" not in env and "LOCAL_RANK" not in env


def idle_seconds(env: dict | None = None) -> float:
    env = os.environ if env is None else env
    try:
        value = float(env.get(ENV_IDLE, DEFAULT_IDLE_S))
    except ValueError:
        return DEFAULT_IDLE_S
    return value if value > 0 else DEFAULT_IDLE_S


def fingerprint(env: dict | None = None) -> str:
    """What a server and its clients must share for a forked worker to equal a fresh process."""
    env = os.environ if env is None else env
    h = hashlib.sha256()

    def add(value) -> None:
        h.update(repr(value).encode("utf-8", "surrogateescape"))
        h.update(b"\0")

    add((sys.executable, sys.version, tuple(sys.flags), sys.warnoptions, sorted(sys._xoptions.items())))
    add(os.getuid())
    add(sys.path)
    # an install into the environment (``uv sync``) changes its folders' modification times;
    # the project's own folders are not checked: workers import the project's code fresh
    prefixes = tuple(os.path.join(os.path.realpath(p), "") for p in {sys.prefix, sys.base_prefix})
    for entry in sys.path:
        real = os.path.join(os.path.realpath(entry or "."), "")
        if real.startswith(prefixes):
            try:
                add((entry, os.stat(entry).st_mtime_ns))
            except OSError:
                add((entry, None))
    here = os.path.dirname(os.path.abspath(__file__))
    for own in (__file__, os.path.join(here, "__init__.py")):  # the modules a server itself runs
        try:
            add(os.stat(own).st_mtime_ns)
        except OSError:
            add(None)
    add(sorted((k, v) for k, v in env.items() if k not in VOLATILE_ENV))
    return h.hexdigest()


def server_files(fp: str) -> tuple[str, str]:
    """``(address, stem)`` of the server for fingerprint ``fp``.

    The socket is in Linux's abstract namespace (no file to go stale, no path-length limit),
    named after the user, the runtime folder and ``fp``; ``stem`` + ``.lock`` (the server's
    pid, locked while it runs) and ``.log`` (one line per request) are in the user's private
    folder ``$XDG_RUNTIME_DIR/fss-forkserver-<uid>`` (default ``/tmp``).
    """
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    folder = os.path.join(os.path.realpath(base), f"fss-forkserver-{os.getuid()}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    info = os.lstat(folder)
    if info.st_uid != os.getuid() or (info.st_mode & 0o077) or not os.path.isdir(folder):
        raise OSError(errno.EPERM, f"{folder} is not a private folder of this user")
    where = hashlib.sha256(folder.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"\0fss-forkserver-{os.getuid()}-{where}-{fp[:24]}", os.path.join(folder, fp[:24])


# ---------------------------------------------------------------- messages


def _send(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    payload = _HEADER.pack(len(data)) + data
    sent = socket.send_fds(sock, [payload], fds) if fds else 0
    sock.sendall(payload[sent:])


def _recv_exact(sock: socket.socket, size: int, fds: list[int] | None = None) -> bytes:
    chunks, got = [], 0
    while got < size:
        if fds is not None and not fds:
            data, received, _flags, _addr = socket.recv_fds(sock, size - got, 8)
            fds.extend(received)
        else:
            data = sock.recv(size - got)
        if not data:
            raise EOFError("connection closed")
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def _recv(sock: socket.socket, fds: list[int] | None = None) -> dict:
    """One message; with ``fds`` (a list), the descriptors that came with it are appended."""
    (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size, fds))
    if size > _MAX_MESSAGE:
        raise EOFError("message too large")
    return json.loads(_recv_exact(sock, size))


# ---------------------------------------------------------------- the client


def run_via_server(argv: list[str]) -> int | None:
    """Run ``fss ARGV`` in a worker forked by the server; its exit code, or None to run in-process.

    May not return: a worker killed by a signal kills the client with the same signal.
    """
    if not supported() or not wanted():
        return None
    env = dict(os.environ)
    fp = fingerprint(env)
    try:
        address, _stem = server_files(fp)
    except OSError:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        start_server(fp)
        return None
    with sock:
        fds = [_std_fd(i) for i in range(3)]
        try:
            sock.settimeout(30.0)
            _send(sock, {"argv": [sys.argv[0], *argv], "cwd": os.getcwd(), "env": env, "fingerprint": fp,
                         "umask": _current_umask()}, fds)
            reply = _recv(sock)
            if not reply.get("ready"):
                return None  # a server of another environment (it stops itself): run here
            # from "go" on the command is the server's: no fallback, so it can never run twice
            _send(sock, {"go": True})
        except (OSError, EOFError, ValueError):
            return None  # no worker exists yet: run here
        finally:
            for fd, std in zip(fds, range(3)):
                if fd != std:
                    os.close(fd)
        sock.settimeout(None)
        return _wait_for_worker(sock)


def _wait_for_worker(sock: socket.socket) -> int:
    def forward(signum, _frame):
        try:
            _send(sock, {"signal": signum})
        except OSError:
            pass

    previous = {}
    for name in FORWARDED_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            previous[sig] = signal.signal(sig, forward)
    try:
        started = _recv(sock)
        result = _recv(sock) if "pid" in started else started
    except (OSError, EOFError, ValueError):
        result = {}
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if "signal" in result:
        sig = int(result["signal"])
        sys.stdout.flush()
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        return 128 + sig
    if "exit" in result:
        return int(result["exit"])
    sys.stderr.write("error: the fss fork server lost this command's worker; run it again (FSS_FORKSERVER=0 "
                     "runs it without the server).\n")
    return 1


def _std_fd(fd: int) -> int:
    """``fd`` if it is open, else a /dev/null descriptor in its place."""
    try:
        os.fstat(fd)
        return fd
    except OSError:
        return os.open(os.devnull, os.O_RDWR)


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def start_server(fp: str) -> None:
    """Start a server for this environment in the background (it imports, then listens)."""
    import subprocess

    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if not os.path.isfile(script):
        return
    try:
        subprocess.Popen(
            [sys.executable, script, SERVE_ARG, fp],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=True, start_new_session=True, cwd="/",
        )
    except OSError:
        pass


# ---------------------------------------------------------------- the server


class Request:
    """What a forked worker is to run (see :func:`become_worker`)."""

    def __init__(self, message: dict, fds: list[int]):
        self.argv = list(message["argv"])
        self.cwd = message["cwd"]
        self.env = dict(message["env"])
        self.umask = int(message["umask"])
        self.fds = fds


def serve(expected: str) -> Request | None:
    """Serve until idle (at :func:`server_files` of ``expected``); returns only in a forked
    worker, with its request.

    ``expected``: the starting client's fingerprint; a server that would differ (another
    interpreter flag, say) exits at once instead of importing anything.
    """
    import fcntl
    import importlib
    import threading

    if fingerprint() != expected:
        return None
    address, stem = server_files(expected)
    lock = open(stem + ".lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        return None  # another server is starting or serving
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")  # who serves (SIGTERM stops it)
    lock.flush()
    log = open(stem + ".log", "w", buffering=1)  # one line per request
    log.write(f"server {os.getpid()} for {sys.executable}\n")
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    if fingerprint() != expected or threading.active_count() != 1:
        log.write("not serving: the environment changed while importing, or a library started a thread\n")
        lock.close()
        return None
    server_pid = os.getpid()
    idle = idle_seconds()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            listener.bind(address)
        except OSError:
            return None  # the address is taken: another server of this environment serves
        listener.listen(16)
        signal.signal(signal.SIGTERM, _stop_server)
        signal.signal(signal.SIGHUP, _stop_server)
        log.write(f"listening on @{address[1:]}\n")
        runners: set[int] = set()
        last_busy = time.monotonic()
        while True:
            _reap(runners)
            if runners:
                last_busy = time.monotonic()  # a command still running is not idleness
            elif time.monotonic() - last_busy >= idle:
                break
            ready, _, _ = select.select([listener], [], [], 1.0)
            if not ready:
                continue
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            if not _same_user(conn):
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:  # the runner of this request
                listener.close()
                lock.close()
                return _runner(conn, expected, log)
            conn.close()
            runners.add(pid)
    except _StopServer:
        pass
    finally:
        if os.getpid() == server_pid:
            listener.close()  # the abstract address is free again at once
            log.write("server stopped\n")
            log.close()
            lock.close()
    return None


def _reap(runners: set[int]) -> None:
    """Collect the runners that ended (the server's only children)."""
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            runners.clear()
            return
        if pid == 0:
            return
        runners.discard(pid)


class _StopServer(Exception):
    pass


def _stop_server(_signum, _frame) -> None:
    raise _StopServer


def _same_user(conn: socket.socket) -> bool:
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.getuid()


def _runner(conn: socket.socket, fp: str, log) -> Request:
    """In a fork of the server: receive one request, fork its worker, relay signals and the exit.

    Returns (the request) only in the worker; the runner itself ends with ``os._exit``.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    fds: list[int] = []
    try:
        conn.settimeout(30.0)
        message = _recv(conn, fds)
        if message.get("fingerprint") != fp or len(fds) != 3:
            log.write(f"runner {os.getpid()}: refused a request of another environment; server stops\n")
            _send(conn, {"stale": True})
            os.kill(os.getppid(), signal.SIGTERM)  # stop the outdated server; the client starts a new one
            os._exit(0)
        request = Request(message, fds)
        _send(conn, {"ready": True})
        if not _recv(conn).get("go"):
            os._exit(0)
        pid = os.fork()
        if pid == 0:
            conn.close()
            log.close()
            return request
        for fd in fds:
            os.close(fd)
        started = time.monotonic()
        try:
            conn.settimeout(None)
            _send(conn, {"pid": pid})
            result = _relay(conn, pid)
        except BaseException:  # noqa: BLE001 - the runner broke: its worker must not run on unwatched
            _kill(pid, signal.SIGTERM)
            raise
        log.write(f"worker {pid}: {' '.join(request.argv[1:])} in {request.cwd} -> {result} "
                  f"({time.monotonic() - started:.1f} s)\n")
    except BaseException:  # noqa: BLE001 - a runner never returns into the server loop
        os._exit(1)
    os._exit(0)


def _relay(conn: socket.socket, pid: int) -> dict:
    try:
        pidfd = os.pidfd_open(pid)  # readable when the worker ends (Linux 5.3+)
    except (AttributeError, OSError):
        pidfd = None  # poll instead
    watched = [conn] + ([pidfd] if pidfd is not None else [])
    client_gone_at = None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if client_gone_at is not None and time.monotonic() - client_gone_at > 60:
            _kill(pid, signal.SIGKILL)  # SIGTERM was not enough
        ready, _, _ = select.select(watched, [], [], 0.05 if pidfd is None else 1.0)
        if conn in ready:
            try:
                message = _recv(conn)
            except (OSError, EOFError, ValueError):
                # the client is gone (killed): stop the worker as a kill of the process would
                watched.remove(conn)
                client_gone_at = time.monotonic()
                _kill(pid, signal.SIGTERM)
                continue
            if "signal" in message:
                _kill(pid, int(message["signal"]))
    if os.WIFSIGNALED(status):
        result = {"signal": os.WTERMSIG(status)}
    else:
        result = {"exit": os.waitstatus_to_exitcode(status)}
    try:
        _send(conn, result)
    except OSError:
        pass
    return result


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def become_worker(request: Request) -> None:
    """Turn this forked process into the client's command: its fds, directory, environment,
    argv, umask, default signal handlers and freshly seeded RNGs."""
    import io
    import random

    for target, fd in enumerate(request.fds):
        if fd != target:
            os.dup2(fd, target)
    for fd in set(request.fds) - {0, 1, 2}:
        os.close(fd)
    os.chdir(request.cwd)
    os.umask(request.umask)
    os.environ.clear()
    os.environ.update(request.env)
    sys.argv = request.argv
    for sig, handler in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL),
                         (signal.SIGHUP, signal.SIG_DFL), (signal.SIGCHLD, signal.SIG_DFL)):
        signal.signal(sig, handler)
    def stream(fd: int, mode: str, like):  # as Python builds them at start-up (-u: write_through)
        tty = os.isatty(fd)
        raw = io.FileIO(fd, mode, closefd=False)
        if mode == "r":
            return io.TextIOWrapper(io.BufferedReader(raw), encoding=like.encoding, errors=like.errors)
        return io.TextIOWrapper(io.BufferedWriter(raw), encoding=like.encoding, errors=like.errors,
                                line_buffering=tty, write_through=bool(getattr(like, "write_through", False)))

    sys.stdin = sys.__stdin__ = stream(0, "r", sys.__stdin__ or sys.stdin)
    sys.stdout = sys.__stdout__ = stream(1, "w", sys.__stdout__ or sys.stdout)
    sys.stderr = sys.__stderr__ = stream(2, "w", sys.__stderr__ or sys.stderr)
    random.seed()  # (also done by random's own at-fork hook) as a fresh process: from the OS
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed()


def main() -> None:
    """The ``fss`` console script: through a warm server where wanted and possible, else in-process."""
    if len(sys.argv) == 3 and sys.argv[1] == SERVE_ARG:
        request = serve(sys.argv[2])
        if request is None:
            sys.exit(0)
        become_worker(request)  # a forked worker: from here on, the client's command
    else:
        try:
            code = run_via_server(sys.argv[1:])
        except KeyboardInterrupt:
            sys.exit(130)
        if code is not None:
            sys.exit(code)
    from pipeline.cli import main as cli_main

    cli_main()
