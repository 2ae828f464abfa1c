"""Study files, storages, fingerprints and the claim of queued trials (no training)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from fss.errors import ConfigError
from pipeline.sweep.queueing import claim_waiting, is_dead, open_study
from pipeline.sweep.storage import normalize_storage, open_storage
from pipeline.sweep.study import load_study
from pipeline.sweep.wandb_file import wandb_sweep

from conftest import FSS, write_study
from tests.pipeline.pipeline_helpers import assert_one_line_error as one_line_error
from tests.pipeline.pipeline_helpers import run_fss as run_cli

REPO = Path(__file__).resolve().parents[2]
STUDY_FILES = sorted((REPO / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDY_FILES, ids=lambda p: p.stem)
def test_every_study_file_validates_and_its_wandb_file_is_current(path):
    spec = load_study(path)  # resolves the run config of every point against the registry
    assert spec.name == path.stem
    assert spec.mode == ("tune" if spec.name.endswith("_tune") else "grid")
    wandb_file = REPO / "sweeps" / "wandb" / path.name
    saved = yaml.safe_load(wandb_file.read_text())
    assert saved == yaml.safe_load(yaml.safe_dump(wandb_sweep(spec, f"sweeps/{path.name}")))
    assert saved["command"][:4] == ["${env}", "fss", "sweep", "trial"]
    assert set(saved["parameters"]) == set(spec.param_names)


def test_test_time_studies_re_evaluate_checkpoints():
    beta = load_study(REPO / "sweeps" / "dpnet_beta.yaml")
    assert beta.test_time and [p["knobs.beta_test"] for p in beta.grid()][:3] == [0.0, 0.1, 0.2]
    assert beta.checkpoint_for(2, 1) == Path("runs/pascal/dpnet_pfenet/fold2")
    assert not load_study(REPO / "sweeps" / "apanet_lambda.yaml").test_time


@pytest.mark.parametrize("change, needles", [
    ({"paramz": {}}, ["unknown key 'paramz'", "allowed keys"]),
    ({"params": {"knobs.lam": {"values": [0.0, 2.0]}}}, ["knobs.lam", "2.0", "[0.0, 1.0]"]),
    ({"params": {"knobs.nope": {"values": [1]}}}, ["knobs.nope", "its knobs are"]),
    ({"params": {"knobs.lam": {"low": 0.0}}}, ["params.knobs.lam", "high"]),
    ({"params": {"knobs.lam": {"values": [0.1], "low": 0.0, "high": 1.0}}}, ["exactly one of values"]),
    ({"folds": [0, 7]}, ["folds", "0..3"]),
    ({"mode": "tune"}, ["n_trials"]),
    ({"pruner": {"name": "median"}}, ["pruning is off for grids"]),
    ({"method": "dpnet_pfenet", "params": {"knobs.beta_test": {"values": [0.2]}, "knobs.lambda1": {"values": [1.0]}},
      "set": {}}, ["mixes test-time-only knobs", "knobs.beta_test"]),
    ({"method": "dpnet_pfenet", "params": {"knobs.beta_test": {"values": [0.2]}}, "set": {}}, ["needs 'checkpoint'"]),
])
def test_bad_study_files_say_which_key_and_what_is_allowed(tmp_path, sweep_data, capsys, change, needles):
    path = write_study(tmp_path / "bad.yaml", sweep_data)
    doc = yaml.safe_load(path.read_text())
    doc.update(change)
    path.write_text(yaml.safe_dump(doc))
    code, out, err = run_cli(["sweep", "run", path], capsys)
    one_line_error(code, err, str(path), *needles)
    assert not (tmp_path / "out").exists()  # nothing started


@pytest.mark.parametrize("where", ["set", "params"])
def test_a_validation_seed_of_the_test_protocol_is_refused_before_any_trial(tmp_path, sweep_data, capsys, where):
    """Issue 17: such a study used to train every trial fully and then fail each one."""
    from fss.data.protocols import protocol_preset

    test_seed = protocol_preset("pfenet", "synthetic").seeds[0]  # the synthetic runs' test protocol
    if where == "set":
        path = write_study(tmp_path / "s.yaml", sweep_data, extra_set={"validation.seed": test_seed})
    else:  # one grid point of several collides
        path = write_study(tmp_path / "s.yaml", sweep_data, params={"validation.seed": {"values": [7, test_seed]}})
    code, out, err = run_cli(["sweep", "run", path], capsys)
    one_line_error(code, err, str(path), f"validation.seed {test_seed}", "test protocol pfenet")
    assert not (tmp_path / "out").exists()  # refused before the first trial


def test_tuning_pruner_needs_validation_during_training(tmp_path, sweep_data):
    path = write_study(tmp_path / "t.yaml", sweep_data, params={"knobs.lam": {"low": 0.0, "high": 1.0}},
                       mode="tune", n_trials=2, pruner={"name": "median"})
    with pytest.raises(ConfigError, match="validation.every"):
        load_study(path)


@pytest.mark.slow
def test_unreachable_or_unopenable_storage_is_one_line_without_trials(tmp_path, sweep_data, subprocess_env, capsys):
    path = write_study(tmp_path / "s.yaml", sweep_data)
    # through the console script (exit code 2, one line, the password hidden)
    proc = subprocess.run([FSS, "sweep", "run", str(path), "--storage", "postgresql://fss:secret@127.0.0.1:1/fss"],
                          capture_output=True, text=True, env=subprocess_env, timeout=300)
    one_line_error(proc.returncode, proc.stderr, "cannot open storage postgresql://fss:***@127.0.0.1:1/fss")
    assert "secret" not in proc.stderr
    for storage, needle in [
        (f"sqlite:///{tmp_path}/missing/dir/x.db", "does not exist"),
        ("redis://localhost", "unknown scheme 'redis'"),
        (str(tmp_path / "study.txt"), "must end in .db"),
    ]:
        code, _, err = run_cli(["sweep", "run", path, "--storage", storage], capsys)
        one_line_error(code, err, needle)
    assert not (tmp_path / "out").exists()


def test_sqlite_refused_for_several_workers(tmp_path, sweep_data, capsys):
    path = write_study(tmp_path / "s.yaml", sweep_data)
    code, _, err = run_cli(["sweep", "run", path, "--workers", "2", "--storage", tmp_path / "x.db"], capsys)
    one_line_error(code, err, "SQLite", "journal file")


def test_changed_study_file_under_the_same_name_is_refused(tmp_path, sweep_data, capsys):
    path = write_study(tmp_path / "s.yaml", sweep_data)
    url = normalize_storage(str(tmp_path / "journal.log"))
    spec = load_study(path)
    study = open_study(spec, open_storage(url), url)
    assert len(study.get_trials()) == 2 and study.user_attrs["fss_fingerprint"] == spec.fingerprint()
    # the same file again: loads, queues nothing twice
    assert len(open_study(load_study(path), open_storage(url), url).get_trials()) == 2
    # a budget-free key (title) may change; a parameter may not
    doc = yaml.safe_load(path.read_text())
    doc["title"] = "renamed"
    doc["params"]["knobs.lam"]["values"] = [0.0, 0.5]
    path.write_text(yaml.safe_dump(doc))
    code, _, err = run_cli(["sweep", "run", path, "--storage", tmp_path / "journal.log"], capsys)
    one_line_error(code, err, "different version", "params.knobs.lam.values", "new --study name")
    assert len(open_storage(url).get_all_trials(0)) == 2


def test_changed_params_are_another_study_and_restart_on_change_starts_afresh(tmp_path, sweep_data, capsys):
    """The params file's method section is part of the study: an edited knob is refused like an
    edited study file, and --restart-on-change (dvc.yaml's sweep stage) deletes the stale study
    and its trial runs and queues the grid afresh instead of reusing finished trials."""
    from pipeline.config import REPO_PARAMS

    params = tmp_path / "params.yaml"
    params.write_text(REPO_PARAMS.read_text())
    path = write_study(tmp_path / "s.yaml", sweep_data, params_file=str(params))
    url = normalize_storage(str(tmp_path / "journal.log"))
    first = open_study(load_study(path), open_storage(url), url)
    first.tell(first.ask(), 0.5)  # a finished trial that a silent reuse would keep
    stale = tmp_path / "out" / "s" / "trial-0000-lam-0.0"
    stale.mkdir(parents=True)
    doc = yaml.safe_load(params.read_text())
    doc["methods"]["apanet"]["knobs"]["n_clusters"] = 2
    params.write_text(yaml.safe_dump(doc, sort_keys=False))
    code, _, err = run_cli(["sweep", "run", path, "--storage", tmp_path / "journal.log"], capsys)
    one_line_error(code, err, "different version", "base_configs", "--restart-on-change")
    said = []
    again = open_study(load_study(path), open_storage(url), url, restart_on_change=True, say=said.append)
    assert [t.state.name for t in again.get_trials()] == ["WAITING", "WAITING"] and not stale.exists()
    assert "starting afresh" in said[0] and again.user_attrs["fss_fingerprint"] == load_study(path).fingerprint()


def test_dead_worker_detection(tmp_path):
    import socket
    from types import SimpleNamespace

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = SimpleNamespace(user_attrs={"fss_host": socket.gethostname(), "fss_pid": proc.pid}, datetime_start=None)
    alive = SimpleNamespace(user_attrs={"fss_host": socket.gethostname(), "fss_pid": subprocess.os.getpid()},
                            datetime_start=None)
    remote = SimpleNamespace(user_attrs={"fss_host": "elsewhere", "fss_pid": 1, "fss_heartbeat": time.time() - 100},
                             datetime_start=None)
    assert is_dead(dead, grace=600) and not is_dead(alive, grace=600)
    assert not is_dead(remote, grace=600) and is_dead(remote, grace=50)


CLAIMER = textwrap.dedent("""
    import json, sys, optuna
    from pipeline.sweep.queueing import claim_waiting
    from pipeline.sweep.storage import open_storage
    storage = open_storage(sys.argv[1])
    study = optuna.load_study(study_name="race", storage=storage)
    got = []
    while True:
        trial = claim_waiting(study, storage)
        if trial is None:
            break
        got.append(trial.number)
    print(json.dumps(got))
""")


@pytest.mark.slow
def test_two_processes_never_claim_the_same_queued_trial(tmp_path, subprocess_env):
    import json

    import optuna

    url = normalize_storage(str(tmp_path / "journal.log"))
    study = optuna.create_study(study_name="race", storage=open_storage(url))
    for i in range(60):
        study.enqueue_trial({"x": i})
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, url], stdout=subprocess.PIPE, text=True,
                              env=subprocess_env, cwd=REPO) for _ in range(2)]
    claimed = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    together = claimed[0] + claimed[1]
    assert sorted(together) == list(range(60))  # every trial claimed exactly once
    assert claim_waiting(optuna.load_study(study_name="race", storage=open_storage(url)), open_storage(url)) is None


def test_a_sqlite_storage_killed_while_created_leaves_nothing_behind(tmp_path, monkeypatch):
    """Optuna creates its tables one by one; a kill in between used to leave a study.db that
    every later run refused ("table study_directions already exists")."""
    import sqlite3

    import optuna

    db = tmp_path / "study.db"
    real = optuna.storages.RDBStorage

    def killed_half_way(url, **kwargs):
        con = sqlite3.connect(url.split(":///", 1)[1])
        con.execute("CREATE TABLE study_directions (x)")  # the first tables were written ...
        con.commit()
        con.close()
        raise KeyboardInterrupt  # ... then the process was stopped

    monkeypatch.setattr(optuna.storages, "RDBStorage", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        open_storage(f"sqlite:///{db}")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(optuna.storages, "RDBStorage", real)
    study = optuna.create_study(storage=open_storage(f"sqlite:///{db}"), study_name="after")
    assert db.is_file() and study.study_name == "after"
    assert [s.study_name for s in optuna.get_all_study_summaries(open_storage(f"sqlite:///{db}"))] == ["after"]


MARKER = textwrap.dedent("""
    import json, sys
    from pipeline.sweep.storage import open_storage, take_mark
    storage = open_storage(sys.argv[1])
    print(json.dumps([take_mark(storage, "race", f"mark-{i}") for i in range(40)]))
""")


@pytest.mark.parametrize("kind", ["journal.log", "study.db"])
def test_one_time_marks_are_taken_once_and_never_show_as_studies(tmp_path, sweep_data, subprocess_env, kind):
    """The requeue bookkeeping lives beside the studies: `optuna studies` and optuna-dashboard
    list only the real study, and of two processes asking at once exactly one gets each mark."""
    import json

    import optuna

    from pipeline.sweep.queueing import requeue_missing

    url = normalize_storage(str(tmp_path / kind))
    storage = open_storage(url, create_dirs=True)
    spec = load_study(write_study(tmp_path / "s.yaml", sweep_data))
    study = open_study(spec, storage, url)
    for t in study.get_trials():  # both grid points failed: one requeue of them, whoever asks
        storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.RUNNING)
        storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    assert requeue_missing(study, storage, spec, "s", reason="rerun") == 2
    assert requeue_missing(study, open_storage(url), spec, "s", reason="rerun") == 0
    assert len(study.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 2
    procs = [subprocess.Popen([sys.executable, "-c", MARKER, url], stdout=subprocess.PIPE, text=True,
                              env=subprocess_env, cwd=REPO) for _ in range(2)]
    got = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert [a + b for a, b in zip(*got)] == [1] * 40  # each mark taken by exactly one process
    assert [s.study_name for s in optuna.get_all_study_summaries(open_storage(url))] == ["s"]
    assert optuna.get_all_study_names(open_storage(url)) == ["s"]


def test_tuning_report_rounds_sampled_values_and_draws_log_parameters_on_a_log_axis(tmp_path):
    import optuna
    import pandas as pd
    from optuna.distributions import FloatDistribution

    from pipeline.sweep.report import write_report

    info = {"name": "tune", "title": "tune", "mode": "tune", "folds": [0], "shots": [1], "reference": {},
            "params": [{"name": "knobs.lam", "kind": "float", "low": 0.0, "high": 1.0, "log": False},
                       {"name": "optim.lr", "kind": "float", "low": 1e-4, "high": 1e-2, "log": True}]}
    study = optuna.create_study(direction="maximize")
    dists = {"knobs.lam": FloatDistribution(0.0, 1.0), "optim.lr": FloatDistribution(1e-4, 1e-2, log=True)}
    for lam, lr, v in [(0.5488135039273248, 0.0012345678, 0.4), (0.7151893663724195, 0.00551234, 0.5)]:
        study.add_trial(optuna.trial.create_trial(params={"knobs.lam": lam, "optim.lr": lr}, distributions=dists,
                                                  value=v, user_attrs={"fss_scores": {"1": {"0": v}}}))
    write_report(study, info, tmp_path)
    table = (tmp_path / "table.md").read_text()
    assert "| 0.7152 | 0.005512 |" in table and "| 0.5488 | 0.001235 |" in table
    assert "0.5488135" not in table + (tmp_path / "table.tex").read_text() + (tmp_path / "table.csv").read_text()
    assert pd.read_csv(tmp_path / "table.csv")["optim.lr"].tolist() == [0.005512, 0.001235]
    html = (tmp_path / "slice.html").read_text()
    assert html.count('"type":"log"') == 1  # optim.lr's axis only
