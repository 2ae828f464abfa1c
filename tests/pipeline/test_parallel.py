"""Several folds at once (pipeline.parallel): the weights of serial runs, a failed fold that lets
the others finish, slots per device, and the folds as jobs of submitit's local executor."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from fss.errors import ConfigError
from pipeline import parallel as P
from pipeline.config import REPO_PARAMS

from pipeline_helpers import FSS, run_fss, tiny_sets

FOLDS = (0, 1, 2, 3)


def _train_args(root: Path, out: str, folds=FOLDS, *extra: str) -> list[str]:
    sets = tiny_sets(root, **{"validation.every": 0, "train.num_threads": 1})
    return ["train", "--method", "pfenet", "--dataset", "synthetic", *(a for k in folds for a in ("--fold", str(k))),
            "--iterations", "3", "--device", "cpu", "--out", out, *(a for s in sets for a in ("--set", s)), *extra]


def _weights(run: Path) -> dict:
    return torch.load(run / "model.pt", weights_only=True)["state_dict"]


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def serial_runs(synthetic_root, tmp_path_factory):
    """Each fold trained alone, one `fss train` after the other: the reference weights."""
    base = tmp_path_factory.mktemp("serial")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    for k in FOLDS:
        done = subprocess.run([FSS, *_train_args(synthetic_root, str(base / f"fold{k}"), (k,))], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    return {k: _weights(base / f"fold{k}") for k in FOLDS}


@pytest.mark.slow
def test_four_folds_on_two_slots_give_the_weights_of_four_serial_runs(synthetic_root, serial_runs, tmp_path):
    done = subprocess.run([FSS, *_train_args(synthetic_root, str(tmp_path / "fold{fold}"), FOLDS, "--slots", "2")],
                          env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True, text=True, timeout=300)
    err = done.stderr
    assert done.returncode == 0, err[-3000:]
    # one process per slot, each training its share of the folds one after another
    assert "4 folds on 2 slots of this machine" in err and err.count("started (pid") == 2, err[-3000:]
    assert "fold 0, fold 2: started" in err and "fold 1, fold 3: started" in err, err[-3000:]
    assert "[fold 3] train pfenet-synthetic-small-1shot fold 3" in err  # each fold's lines carry its name
    for k in FOLDS:
        assert _equal(_weights(tmp_path / f"fold{k}"), serial_runs[k]), f"fold {k}"
        assert json.loads((tmp_path / f"fold{k}" / "train_summary.json").read_text())["fold"] == k


@pytest.mark.slow
def test_a_failed_fold_lets_the_others_finish_and_is_named_in_one_line(synthetic_root, tmp_path, capsys):
    (tmp_path / "fold1").mkdir()
    (tmp_path / "fold1" / "stray.txt").write_text("not a run")  # fold 1's --out is refused
    code, _, err = run_fss(_train_args(synthetic_root, str(tmp_path / "fold{fold}"), (0, 1, 2), "--slots", "2"), capsys)
    assert code == 2, err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("error: fold 1 (exit code 2) failed") and "the others ran to their end" in last, last
    assert all((tmp_path / f"fold{k}" / "model.pt").is_file() for k in (0, 2))
    assert not (tmp_path / "fold1" / "model.pt").exists()


def test_slots_follow_the_gpus_or_the_cpu_cores(monkeypatch):
    monkeypatch.setattr(P, "usable_cores", lambda: 8)  # pipeline.parallel imported it from pipeline.config
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    cpu = P.slot_envs("auto", 4, "cpu", threads_per_job=2)
    assert len(cpu) == 4 and {e["OMP_NUM_THREADS"] for e in cpu} == {"2"}
    assert {e["FSS_CPU_SHARE"] for e in cpu} == {"2"}  # its loading workers (data.num_workers: auto) follow it
    assert [e["OMP_NUM_THREADS"] for e in P.slot_envs("auto", 4, "cpu", threads_per_job=0)] == ["2"] * 4
    assert len(P.slot_envs("auto", 4, "cpu", threads_per_job=4)) == 2
    assert len(P.slot_envs("3", 2, "cpu")) == 2  # never more slots than commands
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    gpu = P.slot_envs("auto", 4, "cuda")
    assert [e["CUDA_VISIBLE_DEVICES"] for e in gpu] == ["3", "5"] and {e["FSS_CPU_SHARE"] for e in gpu} == {"4"}
    assert [e["CUDA_VISIBLE_DEVICES"] for e in P.slot_envs("4", 4, "cuda")] == ["3", "5", "3", "5"]
    for bad in ("0", "-2", "many"):
        with pytest.raises(ConfigError, match="must be auto or a positive integer"):
            P.slot_envs(bad, 4, "cpu")


@pytest.mark.slow
def test_one_slot_trains_the_folds_one_after_another_in_this_process(synthetic_root, serial_runs, tmp_path, capsys):
    """--slots 1 (what each slot's process runs): no child process, the serial runs' weights, and a
    failed fold still lets the next one train."""
    (tmp_path / "fold2").mkdir()
    (tmp_path / "fold2" / "stray.txt").write_text("not a run")
    code, _, err = run_fss(_train_args(synthetic_root, str(tmp_path / "fold{fold}"), (1, 2, 3), "--slots", "1"), capsys)
    assert code == 2 and "started (pid" not in err, err
    assert [line for line in err.splitlines() if line.strip()][-1].startswith("error: fold 2 (exit code 2) failed")
    for k in (1, 3):
        assert _equal(_weights(tmp_path / f"fold{k}"), serial_runs[k]), f"fold {k}"


def test_several_folds_need_a_fold_placeholder(synthetic_root, tmp_path, capsys):
    code, _, err = run_fss(_train_args(synthetic_root, str(tmp_path / "run"), (0, 1)), capsys)
    assert code == 2 and "{fold} in --out" in err, err


@pytest.mark.slow
def test_folds_run_as_jobs_of_submitits_local_executor(synthetic_root, serial_runs, tmp_path, monkeypatch, capsys):
    """engine submitit with cluster.backend local: each fold a submitit job on this machine,
    the same code path as SLURM's executor, the serial runs' weights."""
    params = yaml.safe_load(REPO_PARAMS.read_text())
    params["cluster"].update(backend="local", folder=str(tmp_path / "submitit"), time_minutes=10)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    args = _train_args(synthetic_root, str(tmp_path / "fold{fold}"), (0, 2), "--engine", "submitit",
                       "--params", str(tmp_path / "params.yaml"))
    code, _, err = run_fss(args, capsys)
    assert code == 0, err
    assert err.count("submitted as local job") == 2, err  # one job per fold
    for k in (0, 2):
        assert _equal(_weights(tmp_path / f"fold{k}"), serial_runs[k]), f"fold {k}"
    assert list((tmp_path / "submitit").glob("*_log.out")), "submitit wrote no job log"


@pytest.mark.slow
def test_several_runs_evaluated_at_once_write_each_runs_reports(synthetic_root, tmp_path, capsys):
    code, _, err = run_fss(_train_args(synthetic_root, str(tmp_path / "runs" / "fold{fold}"), (0, 1)), capsys)
    assert code == 0, err
    runs = [a for k in (0, 1) for a in ("--run", str(tmp_path / "runs" / f"fold{k}"))]
    code, _, err = run_fss(["evaluate", *runs, "--shot", "1", "--shot", "2", "--episodes", "4", "--device", "cpu",
                            "--out", str(tmp_path / "evals" / "fold{fold}-{shot}shot.json"), "--slots", "2"], capsys)
    assert code == 0, err
    for k in (0, 1):
        for s in (1, 2):
            report = json.loads((tmp_path / "evals" / f"fold{k}-{s}shot.json").read_text())
            assert (report["fold"], report["shot"], report["episodes"]) == (k, s, 4)
