"""A real PostgreSQL sweep: two `fss sweep run` workers share one grid study through a
``postgresql://`` storage (a throw-away server, tests/sweeps/postgres_server.py); one is
killed mid-trial, the other recovers its trial; the report reads the study from the server."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from pipeline.sweep.storage import open_storage

from tests.pipeline.pipeline_helpers import run_fss as run_cli
from tests.sweeps.conftest import FSS, write_study

pytestmark = pytest.mark.slow

VALUES = (0.0, 0.5, 1.0)


def _snapshot(url: str):
    storage = open_storage(url)
    try:
        return optuna.load_study(study_name="pg", storage=storage).get_trials()
    except KeyError:  # the study is not created yet
        return []
    finally:
        storage.engine.dispose()


def _kill_mid_trial(victim: subprocess.Popen, other: subprocess.Popen, url: str, timeout: float = 300):
    """SIGKILL ``victim`` while both workers run a trial and the victim's has a checkpoint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        running = {t.user_attrs.get("fss_pid"): t for t in _snapshot(url) if t.state == TrialState.RUNNING}
        mine = running.get(victim.pid)
        if other.pid not in running or mine is None or "fss_run_dir" not in mine.user_attrs:
            continue
        if not (Path(mine.user_attrs["fss_run_dir"]) / "fold0" / "checkpoint.pt").exists():
            continue
        victim.send_signal(signal.SIGSTOP)  # frozen: its trial cannot finish between this check and the kill
        if next(t for t in _snapshot(url) if t.number == mine.number).state == TrialState.RUNNING:
            victim.kill()
            victim.wait()
            return mine
        victim.send_signal(signal.SIGCONT)
    raise AssertionError("the two workers never ran a trial at the same time")


def test_two_workers_share_a_grid_through_postgresql(tmp_path, sweep_data, subprocess_env, postgres_url, capsys):
    path = write_study(tmp_path / "pg.yaml", sweep_data, iterations=30, extra_set={"train.checkpoint_every": 1},
                       params={"knobs.lam": {"values": list(VALUES)}})
    cmd = [FSS, "sweep", "run", str(path), "--storage", postgres_url, "--grace", "600"]
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    with open(logs[0], "w") as log0, open(logs[1], "w") as log1:
        first = subprocess.Popen(cmd, env=subprocess_env, stdout=log0, stderr=subprocess.STDOUT)
        second = subprocess.Popen(cmd, env=subprocess_env, stdout=log1, stderr=subprocess.STDOUT)
        try:
            dead = _kill_mid_trial(first, second, postgres_url)
            second.wait(timeout=600)
        finally:
            for p in (first, second):
                if p.poll() is None:
                    p.kill()
                    p.wait()
    err = logs[1].read_text()
    assert second.returncode == 0, err[-3000:]
    assert "left RUNNING by a dead worker" in err  # the surviving worker recovered the killed one's trial

    trials = _snapshot(postgres_url)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert Counter(t.user_attrs["fss_point"] for t in complete) == Counter(
        json.dumps({"knobs.lam": v}) for v in VALUES)  # every grid point exactly once
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [dead.number] and failed[0].user_attrs["fss_dead_worker"]
    retry = next(t for t in complete if t.user_attrs.get("fss_retry_of") == dead.number)
    assert retry.user_attrs["fss_run_dir"] == dead.user_attrs["fss_run_dir"]  # its training resumed there
    assert "resumed at iteration" in (Path(retry.user_attrs["fss_run_dir"]) / "fold0" / "train.log").read_text()
    assert {first.pid, second.pid} <= {t.user_attrs["fss_pid"] for t in trials}

    # the next run finds the grid complete; the report reads the study from the server
    code, out, err = run_cli(["sweep", "run", path, "--storage", postgres_url], capsys)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["ran_now"]["COMPLETE"] == 0, err
    code, out, err = run_cli(["sweep", "report", "pg", "--storage", postgres_url, "--out", tmp_path / "report"], capsys)
    assert code == 0, err
    table = pd.read_csv(tmp_path / "report" / "table.csv")
    by_lam = {t.params["knobs.lam"]: 100 * t.value for t in complete}
    assert table["lam"].tolist() == list(VALUES)
    assert table["mean"].tolist() == pytest.approx([round(by_lam[v], 4) for v in VALUES])
    storage = open_storage(postgres_url)
    assert optuna.get_all_study_names(storage) == ["pg"]  # no helper studies beside it
    storage.engine.dispose()
