"""Resume under DVC: the train stages' run folders are `persist: true` and `fss train` runs with
`--restart-on-change`, so a forced or interrupted `dvc repro` resumes from the runs'
checkpoints, and a changed configuration starts the runs afresh instead of resuming stale ones.

A fresh git + DVC repository with the generated dvc.yaml on a shrunk grid (PFENet, folds 0 and
1 trained at once by one stage, tiny images, 40 iterations with a checkpoint after each); the
stages run the copied code (PYTHONPATH), so edits elsewhere in the checkout cannot change the
runs' code digest.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline_helpers import DVC
from test_dvc_pipeline import _dvc_repo, _run, _tiny_params

STAGE = "train-pfenet"
ITERATIONS = 40
FOLDS = (0, 1)


def _params() -> dict:
    p = _tiny_params()
    p["benchmark"].update(methods=["pfenet"], sweeps={}, folds=list(FOLDS), slots=2)
    syn = p["datasets"]["synthetic"]
    syn["train"].update(iterations=ITERATIONS, checkpoint_every=1, checkpoint_minutes=0)
    syn["validation"] = {"episodes": 4, "every": 0}
    return p


def _repro(work, env, *args) -> str:
    done = _run([DVC, "repro", *args], work, env)
    return done.stdout + done.stderr  # `fss` prints its messages on stderr


def _weights(run) -> dict:
    return torch.load(run / "model.pt", weights_only=True)["state_dict"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _trainers(work) -> list:
    """Every `fss train` process of this repository still running (stage or fold), shells aside."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline", "cwd"]):
        cmd = process.info["cmdline"] or []
        if "--restart-on-change" in cmd and process.info["cwd"] == str(work) and \
                Path(cmd[0]).name not in ("sh", "bash", "dash"):
            found.append(process)
    return found


def _kill_stage_after_checkpoints(work, env, runs) -> list[int]:
    """`dvc repro STAGE` with the stage's own process (the one training both folds at once)
    SIGKILLed once each fold has written a checkpoint; returns the checkpoints' iterations."""
    dvc = subprocess.Popen([DVC, "repro", STAGE], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    deadline, stage = time.monotonic() + 300, []
    while time.monotonic() < deadline and dvc.poll() is None:
        stage = [p for p in _trainers(work) if sum(a == "--fold" for a in p.info["cmdline"]) == len(FOLDS)]
        if stage and all((r / "checkpoint.pt").is_file() for r in runs):
            break
        time.sleep(0.01)
    assert stage and dvc.poll() is None, f"no stage process with checkpoints to kill:\n{dvc.communicate()[0][-3000:]}"
    stage[0].kill()
    out, _ = dvc.communicate(timeout=120)
    assert dvc.returncode != 0, out[-3000:]
    deadline = time.monotonic() + 60  # the folds got SIGTERM from the kernel: they checkpoint and stop
    while _trainers(work) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _trainers(work) == [], "fold processes left running after the stage was killed"
    iterations = [torch.load(r / "checkpoint.pt", weights_only=True)["iteration"] for r in runs]
    assert all(0 < i for i in iterations) and min(iterations) < ITERATIONS, f"killed at {iterations}: not mid-training"
    return iterations


@pytest.mark.slow
def test_dvc_repro_resumes_a_forced_or_killed_train_stage(tmp_path, subprocess_env):
    env = dict(subprocess_env)
    work = _dvc_repo(tmp_path / "repo", _params(), env)
    env["PYTHONPATH"] = str(work)
    runs = [work / "runs" / "pfenet" / f"fold{k}" for k in FOLDS]

    _repro(work, env, STAGE)
    reference = [_weights(r) for r in runs]

    # forced: the finished runs are kept and resumed with nothing left to do, same weights
    forced = _repro(work, env, "-f", "-s", STAGE)
    assert forced.count("was already trained") == len(FOLDS) and "starting afresh" not in forced, forced[-3000:]
    assert all(_same(_weights(r), w) for r, w in zip(runs, reference))
    assert (work / "plots" / "train" / "pfenet-fold1" / "curves.csv").is_file()

    # the stage SIGKILLed mid-training, then `dvc repro` again: every fold resumed, same weights
    for r in runs:
        _run(["rm", "-rf", str(r)], work, env)
    iterations = _kill_stage_after_checkpoints(work, env, runs)
    again = _repro(work, env, STAGE)
    for k, i in zip(FOLDS, iterations):
        if i < ITERATIONS:
            assert f"resuming runs/pfenet/fold{k} at iteration {i}/{ITERATIONS}" in again, again[-3000:]
    assert all(_same(_weights(r), w) for r, w in zip(runs, reference))
    assert "Running stage" not in _repro(work, env, STAGE)

    # another configuration: the kept run folders are not resumed but trained afresh
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["datasets"]["synthetic"]["optim"]["lr"] = 0.002
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = _repro(work, env, STAGE)
    assert "holds a run of other inputs (optim.lr=0.001, now 0.002); starting afresh" in changed, changed[-3000:]
    assert yaml.safe_load((runs[1] / "config.yaml").read_text())["optim"]["lr"] == 0.002
    assert "resumed" not in (runs[0] / "train.log").read_text()
    assert not _same(_weights(runs[0]), reference[0])
