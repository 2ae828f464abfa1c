"""The fork server behind `fss` under DVC: same results as a fresh process, signals, exits, staleness."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from pipeline import forkserver as F
from pipeline import runs as R
from pipeline.config import REPO_PARAMS

from pipeline_helpers import FSS, forkserver_env, forkserver_log, stop_forkservers, tiny_sets

pytestmark = pytest.mark.skipif(not F.supported(), reason="the fork server needs Linux")


@pytest.fixture
def server_env(tmp_path, subprocess_env):
    """A private runtime folder (so no other server is reused) and the server switched on."""
    runtime = tmp_path / "runtime"
    yield forkserver_env(subprocess_env, runtime, FSS_FORKSERVER="1")
    stop_forkservers(runtime)


def _log(env) -> str:
    return forkserver_log(Path(env["XDG_RUNTIME_DIR"]))


def _fss(env, *args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([FSS, *map(str, args)], env=env, capture_output=True, text=True, timeout=300, **kw)


def _start_server(env) -> None:
    """The first command runs in-process and starts the server; wait until it listens."""
    first = _fss(env, "methods", "--json")
    assert first.returncode == 0, first.stderr
    deadline = time.monotonic() + 120
    while "listening on @" not in _log(env):
        assert time.monotonic() < deadline, "the fork server did not start: " + _log(env)
        time.sleep(0.1)


def _train_cmd(root, out, iterations=4, **extra):
    cmd = ["train", "--method", "pfenet", "--dataset", "synthetic", "--fold", "0", "--iterations", str(iterations),
           "--device", "cpu", "--params", str(REPO_PARAMS), "--out", str(out)]
    for s in tiny_sets(root, **extra):
        cmd += ["--set", s]
    return cmd


def _state(run_dir: Path) -> dict:
    return torch.load(run_dir / R.MODEL_SELECTED, map_location="cpu", weights_only=True)["state_dict"]


def test_switch_and_fingerprint():
    assert F.wanted({"DVC_STAGE": "train@pfenet-0"})
    assert not F.wanted({"DVC_STAGE": "train@pfenet-0", "FSS_FORKSERVER": "0"})
    assert F.wanted({"FSS_FORKSERVER": "1"})
    assert not F.wanted({})
    assert not F.wanted({"DVC_STAGE": "train@pfenet-0", "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "x"})
    base = {"PATH": "/usr/bin", "DVC_STAGE": "a", "PWD": "/x"}
    # per-stage variables do not matter, every other one does
    assert F.fingerprint(base) == F.fingerprint(dict(base, DVC_STAGE="b", PWD="/y"))
    assert F.fingerprint(base) != F.fingerprint(dict(base, OMP_NUM_THREADS="1"))
    assert F.idle_seconds({"FSS_FORKSERVER_IDLE": "5"}) == 5.0
    assert F.idle_seconds({"FSS_FORKSERVER_IDLE": "soon"}) == F.DEFAULT_IDLE_S


@pytest.mark.slow
def test_served_training_and_evaluation_equal_fresh_processes(server_env, synthetic_root, tmp_path):
    """Train + evaluate through the server give the bytes a fresh process gives, and the server
    (not the client) ran them, in the client's directory (the paths are relative)."""
    fresh_env = dict(server_env, FSS_FORKSERVER="0")
    _start_server(server_env)
    for name, env in (("fresh", fresh_env), ("served", server_env)):
        done = _fss(env, *_train_cmd(synthetic_root, name), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        evaluated = _fss(env, "evaluate", "--run", name, "--shot", "1", "--device", "cpu", "--episodes", "6",
                         "--out", f"{name}.json", cwd=tmp_path)
        assert evaluated.returncode == 0, evaluated.stderr
    fresh, served = _state(tmp_path / "fresh"), _state(tmp_path / "served")
    assert fresh.keys() == served.keys() and all(torch.equal(fresh[k], served[k]) for k in fresh)
    reports = [json.loads((tmp_path / f"{n}.json").read_text()) for n in ("fresh", "served")]
    assert reports[0]["miou"] == reports[1]["miou"] and reports[0]["class_iou"] == reports[1]["class_iou"]
    log = _log(server_env)
    assert "train --method pfenet" in log and "--out served --set" in log, log
    assert f"--out served.json in {tmp_path} -> {{'exit': 0}}" in log, log
    assert "--out fresh" not in log  # FSS_FORKSERVER=0 never asks the server


def test_exit_codes_and_errors_pass_through(server_env, tmp_path):
    _start_server(server_env)
    bad = _fss(server_env, "train", "--method", "nope", "--dataset", "synthetic", "--fold", "0", "--out", tmp_path / "x")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: unknown method 'nope'; choose one of: apanet, canet, celp, dpnet_canet, dpnet_pfenet, panet, "
        "pfenet, simpropnet."
    ]
    listing = _fss(server_env, "methods", "--json")
    assert listing.returncode == 0 and json.loads(listing.stdout)[0]["name"] == "apanet"
    assert "methods --json in" in _log(server_env) and "-> {'exit': 2}" in _log(server_env)


@pytest.mark.slow
def test_sigterm_to_the_client_reaches_the_training(server_env, synthetic_root, tmp_path):
    """DVC or a scheduler stopping the client stops the served training the way it stops a
    local one: checkpoint, then exit 130."""
    _start_server(server_env)
    out = tmp_path / "run"
    cmd = [FSS, *_train_cmd(synthetic_root, out, iterations=400, **{"train.checkpoint_every": 1,
                                                                        "validation.every": 0})]
    proc = subprocess.Popen(cmd, env=server_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    curves = out / R.CURVES_FILE
    deadline = time.monotonic() + 120
    while not (curves.is_file() and len(curves.read_text().splitlines()) > 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted by signal 15" in err
    stopped = R.load_checkpoint(out / R.CHECKPOINT_FILE)["iteration"]
    assert 0 < stopped < 400
    assert "-> {'exit': 130}" in _log(server_env)


@pytest.mark.slow
def test_a_killed_client_stops_its_worker(server_env, synthetic_root, tmp_path):
    _start_server(server_env)
    out = tmp_path / "run"
    cmd = [FSS, *_train_cmd(synthetic_root, out, iterations=2000, **{"train.checkpoint_every": 50,
                                                                         "validation.every": 0})]
    proc = subprocess.Popen(cmd, env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    curves = out / R.CURVES_FILE
    deadline = time.monotonic() + 120
    while not (curves.is_file() and len(curves.read_text().splitlines()) > 3):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 60
    while "-> {'exit': 130}" not in _log(server_env):  # the worker got SIGTERM and checkpointed
        assert time.monotonic() < deadline, _log(server_env)
        time.sleep(0.1)
    assert "interrupted by signal 15" in (out / "train.log").read_text()


def test_a_request_from_another_environment_stops_the_server(server_env):
    _start_server(server_env)
    address = "\0" + _log(server_env).split("listening on @")[1].split()[0]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(address)
        F._send(sock, {"argv": ["fss", "methods"], "cwd": "/", "env": {}, "fingerprint": "another", "umask": 18},
                [0, 1, 2])
        assert F._recv(sock) == {"stale": True}
    deadline = time.monotonic() + 30
    while "server stopped" not in _log(server_env):
        assert time.monotonic() < deadline, "the outdated server kept serving: " + _log(server_env)
        time.sleep(0.05)
    assert "refused a request of another environment" in _log(server_env)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(address)
    # the next command runs in-process and starts a fresh server
    again = _fss(server_env, "methods", "--json")
    assert again.returncode == 0


@pytest.mark.slow
def test_the_server_waits_while_busy_and_exits_when_idle(server_env, synthetic_root, tmp_path):
    env = dict(server_env, FSS_FORKSERVER_IDLE="2")
    _start_server(env)
    time.sleep(0.5)
    done = _fss(env, *_train_cmd(synthetic_root, tmp_path / "run", iterations=12))  # longer than the idle time
    assert done.returncode == 0, done.stderr
    after = _fss(env, "methods")
    assert after.returncode == 0
    log = _log(env)
    assert len(re.findall(r"^server \d+ for ", log, re.M)) == 1 and "train --method pfenet" in log and "methods in" in log, log
    deadline = time.monotonic() + 30
    while "server stopped" not in _log(env):
        assert time.monotonic() < deadline, _log(env)
        time.sleep(0.1)
