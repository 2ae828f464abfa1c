"""`fss train` under torchrun: 2 gloo processes on CPU (issue #6, multi-GPU / multi-machine).

Each test launches real processes with ``python -m torch.distributed.run --standalone``
(a free port) on tiny synthetic runs.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddp_helpers import subprocess_env, torchrun, torchrun_command, train_args, train_sets

from pipeline import runs as R

pytestmark = pytest.mark.slow

ITERATIONS = 12
RUN_FILES = {R.CONFIG_FILE, R.CHECKPOINT_FILE, R.CURVES_FILE, R.VAL_FILE, R.MODEL_LAST, R.MODEL_BEST,
             R.MODEL_SELECTED, R.SUMMARY_FILE, R.LOG_FILE, R.VAL_REPORT}


def pfenet_args(root: Path, out: Path) -> list:
    """PFENet (dropout: per-rank randomness), validation every 4 steps keeping the best."""
    return train_args("pfenet", root, out, ITERATIONS, **{
        "validation.every": 4, "validation.episodes": 4, "validation.select": "best", "knobs.reduce_dim": 16,
    })


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def state_dict(path: Path) -> dict:
    from fss.models.checkpoints import safe_torch_load

    return safe_torch_load(path)["state_dict"]


@pytest.fixture(scope="module")
def ddp_run(synthetic_data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    cwd = tmp_path_factory.mktemp("ddp-cwd")
    out = cwd / "run"
    proc = torchrun(pfenet_args(synthetic_data, out), cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_two_processes_train_and_only_rank0_writes(ddp_run):
    out, proc = ddp_run
    assert {p.name for p in out.iterdir()} == RUN_FILES
    assert sorted(p.name for p in out.parent.iterdir()) == ["run"]  # nothing written beside the run
    summaries = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # rank 0 alone reports
    result = json.loads(summaries[0])
    assert result["status"] == "done" and result["iteration"] == ITERATIONS and result["rank"] == 0
    summary = result["summary"]
    assert summary["world_size"] == 2 and summary["iterations"] == ITERATIONS
    assert summary["best_val_iteration"] in (4, 8, 12)
    assert json.loads((out / R.SUMMARY_FILE).read_text()) == summary
    log = (out / R.LOG_FILE).read_text()
    assert log.count("started:") == 1 and log.count("finished:") == 1 and log.count("validation at") == 3
    curves = rows(out / R.CURVES_FILE)
    assert [int(r["iteration"]) for r in curves] == list(range(1, ITERATIONS + 1))
    assert [int(r["iteration"]) for r in rows(out / R.VAL_FILE)] == [4, 8, 12]
    assert (proc.stdout + proc.stderr).count("torchrun: 2 processes (gloo), 2 episodes each per step of 4") == 1


def test_ddp_weights_load_in_one_process_and_evaluate(ddp_run, capsys):
    from fss.models.checkpoints import load_model_file
    from pipeline.cli import main

    out, _ = ddp_run
    weights = state_dict(out / R.MODEL_SELECTED)
    assert not any(k.startswith("module.") for k in weights)
    model, meta = load_model_file(out / R.MODEL_SELECTED)  # strict load into a plain model
    assert meta["method"] == "pfenet"
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())

    result = out.parent / "eval.json"
    old = sys.argv
    sys.argv = ["fss", "evaluate", "--run", str(out), "--out", str(result), "--device", "cpu"]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = old
    capsys.readouterr()
    assert exit_info.value.code in (0, None)
    metrics = json.loads(result.read_text())
    assert 0.0 <= metrics["miou"] <= 1.0 and metrics["episodes"] == 6


def test_killed_and_resumed_under_torchrun_matches_uninterrupted(ddp_run, synthetic_data, tmp_path):
    """SIGTERM to torchrun mid-run: every rank stops at the same step, rank 0 checkpoints;
    rerunning the command resumes and ends with the uninterrupted run's weights and logs."""
    reference, _ = ddp_run
    out = tmp_path / "run"
    args = pfenet_args(synthetic_data, out)
    launcher = subprocess.Popen(torchrun_command(args), cwd=tmp_path, env=subprocess_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and launcher.poll() is None:
        if (out / R.CURVES_FILE).is_file() and len(rows(out / R.CURVES_FILE)) >= 2:
            break
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    output, _ = launcher.communicate(timeout=120)
    assert launcher.returncode != 0, output[-3000:]
    log = (out / R.LOG_FILE).read_text()
    assert "interrupted by signal" in log, output[-3000:]
    stopped_at = int(torch.load(out / R.CHECKPOINT_FILE, weights_only=True)["iteration"])
    assert 2 <= stopped_at < ITERATIONS

    resumed = torchrun(args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed at iteration {stopped_at}/{ITERATIONS}" in (out / R.LOG_FILE).read_text()

    want, got = state_dict(reference / R.MODEL_SELECTED), state_dict(out / R.MODEL_SELECTED)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    loss_columns = ("iteration", "lr", "loss", "main", "aux")
    assert [[r[c] for c in loss_columns] for r in rows(out / R.CURVES_FILE)] == \
        [[r[c] for c in loss_columns] for r in rows(reference / R.CURVES_FILE)]
    assert rows(out / R.VAL_FILE) == rows(reference / R.VAL_FILE)
    summary = json.loads((out / R.SUMMARY_FILE).read_text())
    assert summary["best_val_miou"] == json.loads((reference / R.SUMMARY_FILE).read_text())["best_val_miou"]


def test_two_processes_equal_one_process_with_the_same_global_batch(unbanded_data, tmp_path):
    """PANet (no training-time randomness; bn_eval off so its small backbone's BatchNorm trains): 2 ranks x 2
    episodes give the 1-process batch-4 weights, BatchNorm statistics and losses up to float
    reduction order (every pixel valid, so the mean of the rank losses is the batch loss)."""
    from pipeline.config import resolve_run_config
    from pipeline.train import build_model, seed_everything, train_run

    iterations = 6
    # the synthetic preset keeps BN statistics and turns PAR off; this test wants both to train.
    # Foreground weight 1: with another weight each rank divides its CE by its own pixels' weight
    # sum, so the mean of the rank losses is not the batch loss (docs/pipeline.md)
    sets = {"optim.lr": 0.01, "knobs.bn_eval": "false", "knobs.par": "true", "train.fg_weight": 1.0}
    one = tmp_path / "one"
    config = resolve_run_config(method="panet", dataset="synthetic", fold=0, shot=1, iterations=iterations,
                                device="cpu", set_values=train_sets(unbanded_data, **sets))
    train_run(config, one)
    two = tmp_path / "two"
    proc = torchrun(train_args("panet", unbanded_data, two, iterations, **sets), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    seed_everything(config.train.seed)
    initial = build_model(config).state_dict()
    a, b = state_dict(one / R.MODEL_SELECTED), state_dict(two / R.MODEL_SELECTED)
    assert a.keys() == b.keys()
    moved = 0.0
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
            moved = max(moved, float((a[key] - initial[key]).abs().max()))
        else:
            assert torch.equal(a[key], b[key]), key  # num_batches_tracked
    assert moved > 1e-3  # the runs trained: the comparison is not between two initial models
    bn_means = [k for k in a if k.endswith("running_mean")]
    assert bn_means and any(not torch.equal(a[k], initial[k]) for k in bn_means)
    for r1, r2 in zip(rows(one / R.CURVES_FILE), rows(two / R.CURVES_FILE), strict=True):
        for column in ("loss", "seg", "par"):
            assert float(r2[column]) == pytest.approx(float(r1[column]), rel=1e-5, abs=1e-6)
