"""W&B tracking: offline runs are written; failures never stop a run; disabled is a no-op."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from pipeline.config import REPO_PARAMS, resolve_run_config
from pipeline.tracking import Tracker, wandb_mode
from pipeline.train import train_run

from pipeline_helpers import tiny_sets
from wandb_records import OfflineRun


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


@pytest.mark.slow
def test_offline_train_evaluate_and_aggregate_write_wandb_runs(synthetic_root, tmp_path, monkeypatch):
    """Real offline runs, read back from their record logs: names with method, dataset and
    fold; the summary's val/miou is the best check (define_metric); the selected weights as a
    model artifact that the evaluation names; per-class IoU as a table with class names; the
    paper table of fss aggregate as a table."""
    import torch

    from pipeline.aggregate import aggregate
    from fss.evaluation import EvalSettings
    from pipeline.evaluate import Evaluation, evaluate_one, make_protocol
    from pipeline.tracking import log_aggregate
    from pipeline.train_data import open_split

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = resolve_run_config(method="pfenet", dataset="synthetic", fold=1, shot=1, iterations=4, device="cpu",
                                set_values=tiny_sets(synthetic_root, **{"tracking.wandb": True, "validation.every": 1}),
                                params_path=REPO_PARAMS)
    out = tmp_path / "run"
    warnings: list[str] = []
    train_run(config, out, say=lambda m: warnings.append(m) if m.startswith("warning") else None)
    run_id = (out / "wandb_run_id.txt").read_text().strip()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(run_id)
    train = OfflineRun(runs[0])
    assert train.name == "pfenet-synthetic-fold1" and train.config["tracking"]["wandb"] is True
    assert len(train.history("train/loss")) == 4 and len(train.history("train/lr")) == 4
    checks = train.history("val/miou")
    assert len(checks) == 4 and train.summary["val/miou"] == {"max": max(checks)}  # the best, not the last
    assert [m.summary.max for m in train.of("metric") if m.name == "val/miou"] == [True]
    assert train.summary["final/iterations"] == 4
    model = next(a for a in train.of("artifact") if a.type == "model")
    assert model.name == "model-pfenet-synthetic-small-1shot-fold1"
    assert [e.ref for e in model.manifest.contents] == [(out / "model.pt").resolve().as_uri()]  # a reference

    ev = Evaluation(data=open_split(config, "val"), protocol=make_protocol("pfenet", "synthetic", episodes=4, size=33),
                    tracking=config.tracking, run_dir=out, group_shot=1, say=warnings.append)
    report = evaluate_one(ev, out / "model.pt", "last", EvalSettings(batch_size=2), tmp_path / "evals" / "eval.json")
    assert warnings == []
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    evaluation = OfflineRun(next(r for r in runs if not r.name.endswith(run_id)))
    assert evaluation.name == "pfenet-synthetic-fold1-1shot"
    assert evaluation.summary["miou"] == pytest.approx(report["miou"])
    assert evaluation.config["model_artifact"] == model.name  # offline: W&B refuses use_artifact
    table = evaluation.table("class_iou")
    names = open_split(config, "val").meta["class_names"]
    assert table["columns"] == ["class_id", "class", "fold", "shot", "iou", "episodes"]
    assert {row[0]: row[1] for row in table["data"]} == {int(k): names[int(k) - 1] for k in report["class_iou"]}
    assert [row[4] for row in table["data"]] == pytest.approx([report["class_iou"][str(row[0])] for row in table["data"]])
    assert evaluation.table("runs")["data"][0][3] == pytest.approx(report["runs"][0]["miou"])
    assert any(evaluation.dir.rglob("*.png")), "the sample predictions were not logged as images"

    aggregate(tmp_path / "evals", tmp_path / "results")
    log_aggregate(config.tracking, tmp_path / "results", warn=warnings.append)
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 3 and warnings == []
    tables = OfflineRun(max(runs, key=lambda r: r.stat().st_mtime))
    assert tables.name == "aggregate"
    paper = tables.table("table_miou")
    assert "Method" in paper["columns"] and paper["data"][0][paper["columns"].index("Method")] == "pfenet"
    assert len(tables.table("results")["data"]) == 1
    intervals = tables.table("intervals")  # one fold: the cell and its mean, each with its interval
    assert len(intervals["data"]) == 2 and {"low", "high"} <= set(intervals["columns"])
    assert "1-shot Mean ±" in paper["columns"]


def test_wandb_flag_of_every_tracking_command_turns_tracking_on(monkeypatch, tmp_path, capsys):
    """--wandb is --set tracking.wandb=true for train, and turns tracking on for evaluate's
    runs, aggregate's tables and a sweep's trials (the commands stop right after parsing)."""
    import pipeline.sweep.run as sweep_run
    import pipeline.tracking as tracking
    import pipeline.train as train

    from pipeline_helpers import run_fss

    seen = {}

    def fake_train_run(config, out, **kwargs):
        seen["train"] = config.tracking.wandb
        return {"status": "done"}

    monkeypatch.setattr(train, "train_run", fake_train_run)
    for flag, expected in (("--wandb", True), ("--no-wandb", False)):
        code, _, err = run_fss(["train", "--method", "pfenet", "--dataset", "synthetic", "--fold", "0",
                                "--out", tmp_path / "r", flag], capsys)
        assert code == 0 and seen.pop("train") is expected, err
    code, _, err = run_fss(["train", "--method", "pfenet", "--dataset", "synthetic", "--fold", "0",
                            "--out", tmp_path / "r", "--set", "tracking.wandb=true"], capsys)
    assert code == 0 and seen.pop("train") is True, err

    monkeypatch.setattr("pipeline.aggregate.log_aggregate", lambda t, out, warn: seen.update(aggregate=t.wandb))
    monkeypatch.setattr("pipeline.aggregate.aggregate", lambda runs, out, boot: {"evaluations": 0})
    (tmp_path / "table_miou.md").write_text("")
    code, _, err = run_fss(["aggregate", "--runs", tmp_path, "--out", tmp_path, "--wandb"], capsys)
    assert code == 0 and seen.pop("aggregate") is True, err

    monkeypatch.setattr(sweep_run, "work", lambda *a, **kw: seen.update(sweep=kw["wandb"]) or Counter())
    monkeypatch.setattr(sweep_run, "open_study", lambda *a, **kw: None)
    monkeypatch.setattr(sweep_run, "_summary", lambda *a, **kw: {})
    study = Path(__file__).resolve().parents[2] / "sweeps" / "embedded_apanet_lambda.yaml"
    code, _, err = run_fss(["sweep", "run", study, "--storage", tmp_path / "s.db", "--wandb"], capsys)
    assert code == 0 and seen.pop("sweep") is True, err
    assert "--wandb" in run_fss(["evaluate", "--help"], capsys)[1]


def test_online_evaluation_uses_the_training_runs_model_artifact(monkeypatch, tmp_path):
    """Online (faked: no server here), the evaluation run declares the same reference
    artifact training logs as its input; W&B then links evaluation and checkpoint."""
    import wandb

    used = []

    class FakeRun:
        id, dir, config = "abc", str(tmp_path), None

        def use_artifact(self, artifact):
            used.append(artifact)

        def finish(self, exit_code=0):
            pass

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(wandb, "init", lambda **kwargs: FakeRun())
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"weights")
    t = Tracker(enabled=True, project="p", job_type="evaluate", name="n", warn=pytest.fail)
    t.use_model(weights, "model-pfenet-synthetic-small-1shot-fold0")
    t.finish()
    (artifact,) = used
    assert artifact.name == "model-pfenet-synthetic-small-1shot-fold0" and artifact.type == "model"
    assert [e.ref for e in artifact.manifest.entries.values()] == [weights.as_uri()]
