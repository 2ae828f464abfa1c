"""W&B tracking: offline runs are written; failures never stop a run; disabled is a no-op."""

from __future__ import annotations

import time

import pytest

from pipeline.config import REPO_PARAMS, resolve_run_config
from pipeline.tracking import Tracker, wandb_mode
from pipeline.train import train_run

from pipeline_helpers import tiny_sets


def test_mode_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert wandb_mode() == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_mode() == "offline"  # no credentials -> offline, never online
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"


def test_disabled_tracker_is_a_no_op():
    t = Tracker(enabled=False, project="p", group="g", job_type="train", name="n")
    assert not t.active
    t.log({"a": 1}, step=1)
    t.summary({"b": 2})
    t.images("x", [{"image": None, "prediction": None, "ground_truth": None}])
    t.finish()


def test_a_failing_wandb_never_stops_the_run(monkeypatch):
    import wandb

    def broken_init(**kwargs):
        raise RuntimeError("network unreachable")

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(wandb, "init", broken_init)
    warnings = []
    t = Tracker(enabled=True, project="p", group="g", job_type="train", name="n", warn=warnings.append)
    assert not t.active and len(warnings) == 1 and "network unreachable" in warnings[0]
    t.log({"a": 1})
    t.finish()


@pytest.mark.slow
def test_an_unreachable_wandb_server_turns_tracking_off_within_seconds(tmp_path, subprocess_env):
    """Credentials present (so online mode), server unreachable: the real wandb.init gives up
    after init_timeout and the run goes on untracked (issue 17: never a hung run). In a
    subprocess: wandb keeps its settings per process, which would leak into later tests."""
    import json
    import subprocess
    import sys

    env = dict(subprocess_env, WANDB_API_KEY="0" * 40, WANDB_BASE_URL="http://127.0.0.1:9", WANDB_DIR=str(tmp_path))
    env.pop("WANDB_MODE", None)
    code = ("import json; from pipeline.tracking import Tracker\n"
            "w = []\n"
            "t = Tracker(enabled=True, project='p', group='g', job_type='train', name='n', init_timeout=5, warn=w.append)\n"
            "t.log({'a': 1}); t.finish(); print(json.dumps([t.active, w]))")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and time.monotonic() - start < 90, done.stderr[-2000:]
    active, warnings = json.loads(done.stdout.strip().splitlines()[-1])
    assert not active and len(warnings) == 1 and warnings[0].startswith("warning: W&B init failed")


def _wait_for_records(path, keys, timeout=30.0):
    """The .wandb log holds protobuf records (keys as plain strings); the W&B service may
    still be flushing it when finish() returns, so poll for a while."""
    deadline = time.monotonic() + timeout
    while True:
        data = path.read_bytes()
        missing = [k for k in keys if k not in data]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not missing, (missing, len(data))


@pytest.mark.slow
def test_offline_train_and_evaluate_write_wandb_runs(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = resolve_run_config(method="pfenet", dataset="synthetic", fold=1, shot=1, iterations=2, device="cpu",
                                set_values=tiny_sets(synthetic_root, **{"tracking.wandb": True}), params_path=REPO_PARAMS)
    out = tmp_path / "run"
    warnings: list[str] = []
    train_run(config, out, say=lambda m: warnings.append(m) if m.startswith("warning") else None)
    run_id = (out / "wandb_run_id.txt").read_text().strip()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(run_id)
    logs = list(runs[0].glob("*.wandb"))
    assert len(logs) == 1, "the offline run holds no .wandb log"
    _wait_for_records(logs[0], (b"train/loss", b"train/lr", b"val/miou", b"final/iterations",
                                b"pfenet-synthetic-small-1shot"))

    from pipeline.evaluate import evaluate_one, make_protocol
    from pipeline.train_data import open_split

    import torch

    report = evaluate_one(
        model_path=out / "model.pt", selection="last", method_meta=None, data=open_split(config, "val"),
        dataset="synthetic", fold=1, shot=1, protocol=make_protocol("pfenet", "synthetic", episodes=4, size=33),
        device=torch.device("cpu"), batch_size=2, num_workers=0, precision="fp32", ways=1,
        out=tmp_path / "eval.json", figure=None, figure_episodes=0, tracking=config.tracking, run_dir=out,
        group_shot=1, say=warnings.append,
    )
    assert warnings == []
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    newest = next(r for r in runs if not r.name.endswith(run_id))
    keys = (b"miou", b"fb_iou", b"class_iou/6", b"predictions", b"evaluate", b"fold1-1shot")
    _wait_for_records(next(newest.glob("*.wandb")), keys)
    assert any(newest.rglob("*.png")), "the sample predictions were not logged as images"
    assert 0.0 <= report["miou"] <= 1.0
