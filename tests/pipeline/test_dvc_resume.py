"""Resume under DVC: the train stages' run folders are `persist: true` and `fss train` runs with
`--restart-on-change`, so a forced or interrupted `dvc repro` resumes from the run's
checkpoint, and a changed configuration starts the run afresh instead of resuming a stale one.

A fresh git + DVC repository with the repository's dvc.yaml on a shrunk grid (PFENet, fold 0,
tiny images, 40 iterations with a checkpoint after each); the stages run the copied code
(PYTHONPATH), so edits elsewhere in the checkout cannot change the runs' code digest.
"""

from __future__ import annotations

import subprocess
import time

import pytest
import torch
import yaml

from pipeline_helpers import DVC
from test_dvc_pipeline import _dvc_repo, _run, _tiny_params

STAGE = "train@pfenet-0"
ITERATIONS = 40


def _params() -> dict:
    p = _tiny_params()
    p["benchmark"].update(methods=["pfenet"], sweeps={})
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


def _is_trainer(process) -> bool:
    import psutil

    try:
        return "--restart-on-change" in " ".join(process.cmdline())
    except psutil.Error:  # exited while looking
        return False


def _kill_training_after_a_checkpoint(work, env, run) -> int:
    """`dvc repro STAGE` with the training process SIGKILLed once it has written a checkpoint;
    returns the checkpoint's iteration."""
    import psutil

    dvc = subprocess.Popen([DVC, "repro", STAGE], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    deadline = time.monotonic() + 300
    trainers, checkpoint = [], run / "checkpoint.pt"
    # find the training process(es: a shell may wrap it) while they start, the scan being slow,
    # then kill them as soon as the first checkpoint is on disk, long before the last iteration
    while time.monotonic() < deadline and dvc.poll() is None:
        if not trainers:
            trainers = [p for p in psutil.Process(dvc.pid).children(recursive=True) if _is_trainer(p)]
        elif checkpoint.is_file():
            break
        time.sleep(0.001)
    assert trainers and checkpoint.is_file() and dvc.poll() is None, \
        f"no training process with a checkpoint to kill:\n{dvc.communicate()[0][-3000:]}"
    for p in trainers:
        p.kill()
    out, _ = dvc.communicate(timeout=120)
    assert dvc.returncode != 0, out[-3000:]
    iteration = torch.load(run / "checkpoint.pt", weights_only=True)["iteration"]
    assert 0 < iteration < ITERATIONS, f"killed at iteration {iteration}: not mid-training"
    return iteration


@pytest.mark.slow
def test_dvc_repro_resumes_a_forced_or_killed_train_stage(tmp_path, subprocess_env):
    env = dict(subprocess_env)
    work = _dvc_repo(tmp_path / "repo", _params(), env)
    env["PYTHONPATH"] = str(work)
    run = work / "runs" / "pfenet" / "fold0"

    _repro(work, env, STAGE)
    reference = _weights(run)

    # forced: the finished run is kept and resumed with nothing left to do, same weights
    forced = _repro(work, env, "-f", "-s", STAGE)
    assert "was already trained" in forced and "starting afresh" not in forced, forced[-3000:]
    assert _same(_weights(run), reference)
    assert (work / "plots" / "train" / "pfenet-fold0" / "curves.csv").is_file()

    # killed mid-training, then `dvc repro` again: resumed from the checkpoint, same weights
    _run(["rm", "-rf", str(run)], work, env)
    iteration = _kill_training_after_a_checkpoint(work, env, run)
    again = _repro(work, env, STAGE)
    assert f"resuming runs/pfenet/fold0 at iteration {iteration}/{ITERATIONS}" in again, again[-3000:]
    assert _same(_weights(run), reference)
    assert "Running stage" not in _repro(work, env, STAGE)

    # another configuration: the kept run folder is not resumed but trained afresh
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["datasets"]["synthetic"]["optim"]["lr"] = 0.002
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = _repro(work, env, STAGE)
    assert "holds a run of other inputs (optim.lr=0.001, now 0.002); starting afresh" in changed, changed[-3000:]
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 0.002
    assert "resumed" not in (run / "train.log").read_text()
    assert not _same(_weights(run), reference)
