"""Real small sweeps on the synthetic benchmark: grid, sampler, test-time re-evaluation,
kill-and-resume, two workers on one journal file, the report and the W&B trial command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from pipeline.sweep.storage import normalize_storage, open_storage

from conftest import FSS, write_study
from test_sweep_files import run_cli

pytestmark = pytest.mark.slow


def load(path: Path, name: str, storage: Path):
    return optuna.load_study(study_name=name, storage=open_storage(normalize_storage(str(storage))))


def points(study, state=TrialState.COMPLETE):
    return Counter(t.user_attrs["fss_point"] for t in study.get_trials(states=(state,)))


def test_grid_sweep_end_to_end_rerun_and_report(tmp_path, sweep_data, capsys):
    path = write_study(tmp_path / "grid.yaml", sweep_data, reference={"1.0": 50.0})
    code, out, err = run_cli(["sweep", "run", path], capsys)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["ran_now"]["COMPLETE"] == 2 and summary["trials"]["COMPLETE"] == 2
    study = load(path, "grid", tmp_path / "out" / "grid" / "study.db")
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert sorted(t.params["knobs.lam"] for t in trials) == [0.0, 1.0]
    for t in trials:  # the objective: the evaluation JSON on held-out validation episodes
        report = json.loads((Path(t.user_attrs["fss_run_dir"]) / "fold0" / "val.json").read_text())
        assert report["split"] == "holdout" and report["protocol_options"]["seeds"] == [123]
        assert report["knobs"]["lam"] == t.params["knobs.lam"] and report["episodes"] == 4
        assert t.value == pytest.approx(report["miou"]) == pytest.approx(t.user_attrs["fss_scores"]["1"]["0"])
    # the same command again: the grid is complete, nothing runs twice
    code, out, _ = run_cli(["sweep", "run", path], capsys)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["ran_now"]["COMPLETE"] == 0
    assert len(load(path, "grid", tmp_path / "out" / "grid" / "study.db").get_trials()) == 2

    code, out, err = run_cli(["sweep", "report", path, "--out", tmp_path / "report"], capsys)
    assert code == 0, err
    rep = tmp_path / "report"
    for name in ("table.csv", "table.md", "table.tex", "importance.png", "importance.html", "slice.png",
                 "slice.html", "trials.csv", "summary.json"):
        assert (rep / name).stat().st_size > 0, name
    table = pd.read_csv(rep / "table.csv")
    vs = "mean vs 0.0"
    assert list(table.columns) == ["lam", "fold0", "mean", "paper", "mean ±", "mean low", "mean high", vs,
                                   f"{vs} low", f"{vs} high", f"{vs} contains 0", "best"]
    # the interval over the 4 validation episodes holds the mean; the baseline against itself is 0
    assert (table["mean low"] <= table["mean"] + 1e-3).all() and (table["mean"] <= table["mean high"] + 1e-3).all()
    assert table[vs].tolist()[0] == 0 and table[f"{vs} contains 0"].tolist()[0]
    assert table[vs].tolist()[1] == pytest.approx(table["mean"].tolist()[1] - table["mean"].tolist()[0], abs=1e-3)
    assert "±" in (rep / "table.md").read_text() and "vs: paired difference" in (rep / "table.md").read_text()
    by_lam = {t.params["knobs.lam"]: 100 * t.value for t in trials}
    assert table["lam"].tolist() == [0.0, 1.0]
    assert table["mean"].tolist() == pytest.approx([round(by_lam[0.0], 4), round(by_lam[1.0], 4)])
    assert table["best"].tolist() == [by_lam[0.0] >= by_lam[1.0], by_lam[1.0] >= by_lam[0.0]]
    assert table["paper"].tolist()[1] == 50.0
    assert "**" in (rep / "table.md").read_text() and "\\textbf{" in (rep / "table.tex").read_text()
    html = (rep / "slice.html").read_text()
    assert "plotly" in html and "<script" in html and 'src="https://cdn' not in html  # self-contained
    frame = pd.read_csv(rep / "trials.csv")
    assert len(frame) == 2 and set(frame["state"]) == {"COMPLETE"} and "params_knobs.lam" in frame


def test_tuning_study_with_sampler_and_pruner(tmp_path, sweep_data, capsys):
    path = write_study(tmp_path / "tune.yaml", sweep_data, iterations=2, extra_set={"validation.every": 1},
                       params={"knobs.lam": {"low": 0.0, "high": 1.0}, "optim.lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True}},
                       mode="tune", n_trials=3, sampler={"name": "tpe", "seed": 0, "n_startup_trials": 2},
                       pruner={"name": "median", "n_startup_trials": 1})
    code, out, err = run_cli(["sweep", "run", path], capsys)
    assert code == 0, err
    study = load(path, "tune", tmp_path / "out" / "tune" / "study.db")
    done = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(done) == 3 and isinstance(study.sampler, optuna.samplers.TPESampler)
    assert isinstance(study.pruner, optuna.pruners.MedianPruner)
    for t in done:
        assert 0.0 <= t.params["knobs.lam"] <= 1.0 and 1e-3 <= t.params["optim.lr"] <= 1e-2
        assert set(t.intermediate_values) <= {1, 2} and 1 in t.intermediate_values  # validation checks
    # --n-trials raises the budget: exactly one more trial
    code, _, err = run_cli(["sweep", "run", path, "--n-trials", "4"], capsys)
    assert code == 0, err
    assert len(load(path, "tune", tmp_path / "out" / "tune" / "study.db").get_trials(
        states=(TrialState.COMPLETE, TrialState.PRUNED))) == 4


def test_test_time_knob_re_evaluates_the_checkpoint(tmp_path, sweep_data, capsys):
    from pipeline.config import resolve_run_config
    from pipeline.train import train_run

    from conftest import tiny_set

    sets = {k: v for k, v in tiny_set(sweep_data, 2).items() if k != "knobs.reduce_dim"}
    config = resolve_run_config(method="dpnet_pfenet", dataset="synthetic", fold=0, shot=1, backbone="small",
                                set_values=[f"{k}={v}" for k, v in sets.items()])
    train_run(config, tmp_path / "dpnet" / "fold0")
    weights = (tmp_path / "dpnet" / "fold0" / "model.pt").stat().st_mtime_ns
    path = tmp_path / "beta.yaml"
    path.write_text(yaml.safe_dump({
        "study": "beta", "method": "dpnet_pfenet", "dataset": "synthetic", "folds": [0], "backbone": "small",
        "set": sets, "checkpoint": str(tmp_path / "dpnet" / "fold{fold}"), "output": str(tmp_path / "out" / "{study}"),
        "params": {"knobs.beta_test": {"values": [0.0, 0.8]}}}))
    code, out, err = run_cli(["sweep", "run", path], capsys)
    assert code == 0, err
    study = load(path, "beta", tmp_path / "out" / "beta" / "study.db")
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        trial_dir = Path(t.user_attrs["fss_run_dir"])
        assert sorted(p.name for p in trial_dir.iterdir()) == ["val-fold0.json"]  # nothing trained
        report = json.loads((trial_dir / "val-fold0.json").read_text())
        assert report["knobs"]["beta_test"] == t.params["knobs.beta_test"] and report["knobs"]["beta_train"] == 0.5
        assert t.value == pytest.approx(report["miou"])
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2
    assert (tmp_path / "dpnet" / "fold0" / "model.pt").stat().st_mtime_ns == weights


def test_killed_sweep_resumes_without_losing_or_rerunning_trials(tmp_path, sweep_data, subprocess_env):
    path = write_study(tmp_path / "kill.yaml", sweep_data, iterations=200, extra_set={"train.checkpoint_every": 1},
                       params={"knobs.lam": {"values": [0.0, 0.5, 1.0]}})
    db = tmp_path / "out" / "kill" / "study.db"
    cmd = [FSS, "sweep", "run", str(path)]
    proc = subprocess.Popen(cmd, env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, victim = time.monotonic() + 400, None
    try:
        while time.monotonic() < deadline:  # a trial takes a few seconds: look often
            time.sleep(0.2)
            if not db.exists():
                continue
            try:
                study = load(path, "kill", db)
            except KeyError:  # the file exists, the study not yet
                continue
            trials = study.get_trials()  # one snapshot: two queries can straddle a trial's completion
            running = [t for t in trials if t.state == TrialState.RUNNING]
            complete = [t for t in trials if t.state == TrialState.COMPLETE]
            if not (complete and running and "fss_run_dir" in running[0].user_attrs and
                    (Path(running[0].user_attrs["fss_run_dir"]) / "fold0" / "checkpoint.pt").exists()):
                continue
            proc.send_signal(signal.SIGSTOP)  # frozen: the trial cannot finish between this check and the kill
            try:
                still_running = load(path, "kill", db).trials[running[0].number].state == TrialState.RUNNING
            except Exception:  # frozen inside a write: the file is locked; look again later
                still_running = False
            if still_running:
                victim = running[0]
                break
            proc.send_signal(signal.SIGCONT)
        assert victim is not None, "the sweep did not reach a second trial in time"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    study = load(path, "kill", db)
    before = {t.number: (t.value, t.user_attrs["fss_point"]) for t in study.get_trials(states=(TrialState.COMPLETE,))}
    stamps = {n: (Path(study.trials[n].user_attrs["fss_run_dir"]) / "fold0" / "val.json").stat().st_mtime_ns
              for n in before}
    assert study.trials[victim.number].state == TrialState.RUNNING  # left behind by the kill

    done = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    study = load(path, "kill", db)
    assert points(study) == Counter({k: 1 for k in {json.dumps({"knobs.lam": v}) for v in (0.0, 0.5, 1.0)}})
    after = {t.number: (t.value, t.user_attrs["fss_point"]) for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert all(after[n] == before[n] for n in before)  # completed trials kept as they were, not rerun
    for n in before:
        assert (Path(study.trials[n].user_attrs["fss_run_dir"]) / "fold0" / "val.json").stat().st_mtime_ns == stamps[n]
    dead = study.trials[victim.number]
    assert dead.state == TrialState.FAIL and dead.user_attrs["fss_dead_worker"]
    retry = next(t for t in study.get_trials(states=(TrialState.COMPLETE,)) if t.user_attrs.get("fss_retry_of") == dead.number)
    assert retry.user_attrs["fss_run_dir"] == dead.user_attrs["fss_run_dir"]  # training resumed there
    assert "resumed at iteration" in (Path(retry.user_attrs["fss_run_dir"]) / "fold0" / "train.log").read_text()


def test_two_workers_on_one_journal_run_every_point_once(tmp_path, sweep_data, subprocess_env):
    path = write_study(tmp_path / "two.yaml", sweep_data, params={"knobs.lam": {"values": [0.0, 0.25, 0.5, 0.75]}})
    done = subprocess.run([FSS, "sweep", "run", str(path), "--workers", "2"], env=subprocess_env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    study = load(path, "two", tmp_path / "out" / "two" / "journal.log")
    assert points(study) == Counter({json.dumps({"knobs.lam": v}): 1 for v in (0.0, 0.25, 0.5, 0.75)})
    assert not study.get_trials(states=(TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING))
    run_dirs = [t.user_attrs["fss_run_dir"] for t in study.trials]
    assert len(set(run_dirs)) == 4 and len(list((tmp_path / "out" / "two").glob("trial-*"))) == 4
    assert len({t.user_attrs["fss_pid"] for t in study.trials}) >= 1
    assert "worker 2: started" in done.stderr and "[worker 2] " in done.stderr


@pytest.mark.slow
def test_workers_run_as_jobs_of_submitits_local_executor(tmp_path, sweep_data, subprocess_env):
    """--engine submitit: each worker a submitit job (the local executor here, SLURM on a cluster)
    on the shared journal; every grid point runs once."""
    from pipeline.config import REPO_PARAMS

    params = yaml.safe_load(REPO_PARAMS.read_text())
    params["cluster"].update(backend="local", folder=str(tmp_path / "submitit"), time_minutes=10)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))  # ./params.yaml: the cluster section it reads
    path = write_study(tmp_path / "jobs.yaml", sweep_data, params={"knobs.lam": {"values": [0.0, 0.5, 1.0]}})
    done = subprocess.run([FSS, "sweep", "run", str(path), "--workers", "2", "--engine", "submitit"], cwd=tmp_path,
                          env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("submitted as local job") == 2, done.stderr[-3000:]
    study = load(path, "jobs", tmp_path / "out" / "jobs" / "journal.log")
    assert points(study) == Counter({json.dumps({"knobs.lam": v}): 1 for v in (0.0, 0.5, 1.0)})
    assert not study.get_trials(states=(TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING))


def test_trial_command_runs_one_point_from_wandb_args(tmp_path, sweep_data, capsys):
    path = write_study(tmp_path / "one.yaml", sweep_data)
    code, out, err = run_cli(["sweep", "trial", path, "--no-wandb", "knobs.lam=1.0"], capsys)  # W&B: ${args_no_hyphens}
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    report = json.loads((Path(result["run_dir"]) / "fold0" / "val.json").read_text())
    assert result["point"] == {"knobs.lam": 1.0} and result["objective"] == pytest.approx(report["miou"])
    code, _, err = run_cli(["sweep", "trial", path, "knobs.lam=0.3"], capsys)
    assert code == 2 and "not in the study's values" in err


def test_wandb_trial_logs_the_metric_its_early_termination_watches(tmp_path, sweep_data, subprocess_env):
    """The W&B sweep file of a study with a pruner stops runs on val/miou; an offline
    `fss sweep trial` logs it at every validation check, its summary keeping the best. The trial
    runs in its own process: wandb keeps the first WANDB_DIR a process used."""
    from pipeline.sweep.study import load_study
    from pipeline.sweep.wandb_file import wandb_sweep
    from tests.pipeline.wandb_records import OfflineRun

    path = write_study(tmp_path / "tune.yaml", sweep_data, iterations=3, extra_set={"validation.every": 1},
                       params={"knobs.lam": {"low": 0.0, "high": 1.0}}, mode="tune", n_trials=2,
                       sampler={"name": "tpe", "seed": 0}, pruner={"name": "median", "n_warmup_steps": 1})
    sweep = wandb_sweep(load_study(path))
    assert sweep["metric"] == {"name": "val/miou", "goal": "maximize"}
    assert sweep["early_terminate"] == {"type": "hyperband", "min_iter": 2}
    env = {**subprocess_env, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    done = subprocess.run([FSS, "sweep", "trial", str(path), "knobs.lam=0.25"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    run = OfflineRun(run_dir)
    checks = run.history("val/miou")
    assert run.name == "tune-lam-0.25" and len(checks) == 3
    assert run.summary["val/miou"] == {"max": max(checks)} and "objective" in run.summary
