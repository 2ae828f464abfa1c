"""Training, resuming, evaluating and aggregating through the real code paths and the CLI."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from fss.errors import CheckpointError, ConfigError
from pipeline import runs as R
from pipeline.config import REPO_PARAMS, resolve_run_config
from pipeline.train import train_run

from pipeline_helpers import FSS, assert_one_line_error, run_fss, tiny_sets


def _config(root, iterations=6, **extra):
    return resolve_run_config(method="pfenet", dataset="synthetic", fold=0, shot=1, iterations=iterations,
                              device="cpu", set_values=tiny_sets(root, **extra), params_path=REPO_PARAMS)


def _weights(run_dir: Path, name: str = R.MODEL_SELECTED) -> dict:
    blob = torch.load(run_dir / name, map_location="cpu", weights_only=True)
    return blob["state_dict"]


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rows(path: Path, drop=("seconds",)) -> list[dict]:
    with open(path, newline="") as fh:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def reference_run(synthetic_root, tmp_path_factory) -> Path:
    """An uninterrupted 6-iteration run (validation every 2 iterations)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    result = train_run(_config(synthetic_root), out)
    assert result["status"] == "done" and result["iteration"] == result["total_iterations"] == 6
    summary = result["summary"]
    assert summary["iterations"] == 6 and summary["selected"] == "last"
    return out


def test_run_directory_contents(reference_run):
    names = {p.name for p in reference_run.iterdir()}
    assert {R.CONFIG_FILE, R.CHECKPOINT_FILE, R.CURVES_FILE, R.VAL_FILE, R.MODEL_LAST, R.MODEL_BEST,
            R.MODEL_SELECTED, R.SUMMARY_FILE, R.LOG_FILE} <= names
    curves = _rows(reference_run / R.CURVES_FILE, drop=())
    assert [int(r["iteration"]) for r in curves] == [1, 2, 3, 4, 5, 6]
    assert {"lr", "loss", "main", "aux", "seconds"} <= set(curves[0])
    assert float(curves[-1]["lr"]) == 0.0  # poly: the last step's lr is 0, as PFENet
    vals = _rows(reference_run / R.VAL_FILE)
    assert [int(r["iteration"]) for r in vals] == [2, 4, 6] and all(r["val_episodes"] == "4" for r in vals)
    summary = json.loads((reference_run / R.SUMMARY_FILE).read_text())
    assert summary["validation"]["seed"] == 123 and summary["selection"] == "last"
    assert summary["validation"]["split"] == "holdout"  # the synthetic preset validates on held-out images
    assert _same_weights(_weights(reference_run), _weights(reference_run, R.MODEL_LAST))
    blob = R.load_checkpoint(reference_run / R.CHECKPOINT_FILE)  # weights_only load succeeds
    assert blob["iteration"] == 6 and blob["config"]["method"] == "pfenet"


def test_same_seed_same_weights_and_a_stopped_run_resumes_identically(synthetic_root, reference_run, tmp_path):
    again = tmp_path / "again"
    train_run(_config(synthetic_root), again)
    assert _same_weights(_weights(reference_run), _weights(again))

    resumed = tmp_path / "resumed"
    first = train_run(_config(synthetic_root), resumed, stop_after=3)
    assert first["status"] == "stopped" and first["iteration"] == 3
    assert not (resumed / R.MODEL_SELECTED).exists()
    # a killed run may have logged rows after its last checkpoint: they must be dropped
    with open(resumed / R.CURVES_FILE, "a") as fh:
        fh.write("4,0,0.1,9,9,9,9\n")
    train_run(_config(synthetic_root), resumed)
    assert _same_weights(_weights(reference_run), _weights(resumed))
    assert _rows(reference_run / R.CURVES_FILE) == _rows(resumed / R.CURVES_FILE)
    assert _rows(reference_run / R.VAL_FILE) == _rows(resumed / R.VAL_FILE)


def test_select_best_keeps_the_best_validation_weights(synthetic_root, tmp_path):
    out = tmp_path / "best"
    summary = train_run(_config(synthetic_root, **{"validation.select": "best"}), out)["summary"]
    vals = _rows(out / R.VAL_FILE)
    best = max(vals, key=lambda r: float(r["val_miou"]))  # first maximum wins ties
    assert summary["selected"] == "best" and summary["best_val_iteration"] == int(best["iteration"])
    assert _same_weights(_weights(out), _weights(out, R.MODEL_BEST))


def test_rerun_checks_the_saved_configuration(synthetic_root, reference_run, tmp_path):
    # the same command on a finished run only rewrites the final files
    summary = train_run(_config(synthetic_root), reference_run)["summary"]
    assert summary["iterations"] == 6
    with pytest.raises(ConfigError) as info:
        train_run(_config(synthetic_root, **{"optim.lr": 0.5}), reference_run)
    assert "optim.lr" in str(info.value) and "new --out" in str(info.value)
    # operational keys (device, workers, tracking, test settings) may differ
    train_run(_config(synthetic_root, **{"test.episodes": 9, "train.checkpoint_every": 3}), reference_run)
    other = tmp_path / "notarun"
    other.mkdir()
    (other / "something.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        train_run(_config(synthetic_root), other)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "model_file"])
def test_damaged_checkpoint_is_reported_and_not_loaded(synthetic_root, tmp_path, damage):
    out = tmp_path / "run"
    train_run(_config(synthetic_root), out, stop_after=2)
    ckpt = out / R.CHECKPOINT_FILE
    data = ckpt.read_bytes()
    if damage == "truncate":
        ckpt.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        ckpt.write_bytes(b"not a checkpoint at all" * 10)
    else:
        from fss.models.checkpoints import save_model_file
        from pipeline.train import build_model

        save_model_file(ckpt, build_model(_config(synthetic_root), with_weights=False), method="pfenet",
                        backbone="small", shot=1, knobs={})
    with pytest.raises(CheckpointError) as info:
        train_run(_config(synthetic_root), out)
    assert "\n" not in str(info.value) and str(ckpt) in str(info.value)


def test_one_evaluate_scores_each_shot_with_and_without_the_support_control(reference_run, tmp_path, capsys):
    out = tmp_path / "evals" / "pfenet" / "fold0-{shot}shot.json"
    code, _, err = run_fss(["evaluate", "--run", reference_run, "--shot", 1, "--shot", 5, "--support-control", "none",
                            "--support-control", "shifted", "--out", out], capsys)
    assert code == 0, err
    names = sorted(p.name for p in out.parent.glob("*.json"))
    assert names == sorted(f"fold0-{k}shot{c}{m}.json" for k in (1, 5) for c in ("", "-shifted-support")
                           for m in ("", ".metrics"))
    for k in (1, 5):
        own = json.loads((out.parent / f"fold0-{k}shot.json").read_text())
        shifted = json.loads((out.parent / f"fold0-{k}shot-shifted-support.json").read_text())
        assert "support_control" not in own and shifted["support_control"]["name"] == "shifted"
        assert shifted["shot"] == k and Path(shifted["figure"]).name == f"fold0-{k}shot-shifted-support.png"
        small = json.loads((out.parent / f"fold0-{k}shot-shifted-support.metrics.json").read_text())
        assert small["support_control"] == "shifted" and small["miou"] == shifted["miou"]
    code, _, err = run_fss(["evaluate", "--run", reference_run, "--support-control", "shifted",
                            "--support-control", "shifted"], capsys)
    assert code != 0 and "must not repeat a value" in err

    code, _, err = run_fss(["aggregate", "--runs", tmp_path / "evals", "--out", tmp_path / "results"], capsys)
    assert code == 0, err
    import pandas as pd

    table = pd.read_csv(tmp_path / "results" / "table_miou.csv")
    means = [c for c in table.columns if c.endswith("Mean")]
    assert means == ["1-shot Mean", "1-shot shifted support Mean", "5-shot Mean", "5-shot shifted support Mean"]
    metric = json.loads((tmp_path / "results" / "metrics" / "synthetic-small-pfenet"
                         / "pfenet-1shot-shifted-support.json").read_text())
    shifted = json.loads((out.parent / "fold0-1shot-shifted-support.json").read_text())
    assert metric["support_control"] == "shifted" and metric["miou"] == shifted["miou"]


def test_evaluate_and_aggregate_through_the_cli(reference_run, tmp_path, capsys):
    out = tmp_path / "evals" / "pfenet-fold0-{shot}shot.json"
    code, stdout, err = run_fss(["evaluate", "--run", reference_run, "--shot", 1, "--shot", 5, "--out", out], capsys)
    assert code == 0, err
    for k in (1, 5):
        report = json.loads(Path(str(out).format(shot=k)).read_text())
        assert report["kind"] == "fss-evaluation" and report["shot"] == k and report["train_shot"] == 1
        assert report["episodes"] == 6 and report["protocol"] == "pfenet"
        assert report["protocol_options"]["seeds"] == [321] and report["protocol_options"]["size"] == 33
        assert sorted(report["class_iou"]) == ["1", "2", "3", "4", "5"]
        assert sum(report["class_episodes"].values()) == 6
        assert 0.0 <= report["miou"] <= 1.0 and 0.0 < report["fb_iou"] <= 1.0
        assert report["checkpoint"].endswith("model.pt") and report["checkpoint_selection"] == "last"
        assert "miou_std" not in report  # one run
        assert Path(report["figure"]).is_file() and Path(report["figure"]).read_bytes()[:4] == b"\x89PNG"
    # a protocol with several runs gives per-run values and the standard deviation
    bam = tmp_path / "evals" / "bam.json"
    code, _, err = run_fss(["evaluate", "--run", reference_run, "--protocol", "bam", "--episodes", 3,
                            "--out", bam], capsys)
    assert code == 0, err
    report = json.loads(bam.read_text())
    assert report["num_runs"] == 5 and [r["seed"] for r in report["runs"]] == [510, 365, 382, 322, 988]
    miou = [r["miou"] for r in report["runs"]]
    assert report["miou"] == pytest.approx(sum(miou) / 5)
    assert report["miou_std"] == pytest.approx(float(torch.tensor(miou, dtype=torch.float64).std(unbiased=False)))
    # an imported model file (here: the run's own model file) evaluates with --model
    imported = tmp_path / "evals" / "imported.json"
    code, _, err = run_fss(["evaluate", "--model", reference_run / R.MODEL_SELECTED, "--dataset", "synthetic",
                            "--root", json.loads((tmp_path / "evals" / "pfenet-fold0-1shot.json").read_text())["data_root"],
                            "--fold", 0, "--episodes", 6, "--size", 33, "--out", imported], capsys)
    assert code == 0, err
    again = json.loads(imported.read_text())
    first = json.loads((tmp_path / "evals" / "pfenet-fold0-1shot.json").read_text())
    assert again["checkpoint_selection"] == "imported" and again["miou"] == first["miou"]

    code, _, err = run_fss(["aggregate", "--runs", tmp_path / "evals", "--out", tmp_path / "results"], capsys)
    assert code == 0, err
    import pandas as pd

    df = pd.read_csv(tmp_path / "results" / "results.csv")
    assert {"method", "dataset", "backbone", "shot", "fold", "miou", "fb_iou", "episodes", "protocol"} <= set(df.columns)
    assert sorted(df["protocol"]) == ["bam", "pfenet", "pfenet", "pfenet"]
    assert sorted(df["variant"]) == ["imported", "trained", "trained", "trained"]
    table = (tmp_path / "results" / "table_miou.md").read_text()
    assert "| pfenet |" in table and "| pfenet (imported) |" in table
    assert "1-shot Fold-0" in table and "5-shot Mean" in table


def test_cli_errors_are_one_line(reference_run, synthetic_root, tmp_path, capsys):
    base = ["train", "--dataset", "synthetic", "--fold", "0", "--out", tmp_path / "r", "--iterations", "2"]
    cases = [
        (["train", "--method", "nonet", *base[1:]], ["unknown method 'nonet'", "pfenet"]),
        (["train", "--method", "pfenet", *base[1:], "--backbone", "vgg99"], ["unknown backbone 'vgg99'"]),
        (["train", "--method", "pfenet", "--dataset", "voc", "--fold", "0", "--out", tmp_path / "r"], ["unknown dataset"]),
        (["train", "--method", "pfenet", *base[1:3], "--fold", "7", "--out", tmp_path / "r"], ["unknown fold 7"]),
        (["train", "--method", "apanet", *base[1:], "--set", "knobs.lamda=0.3"], ["no knob 'lamda'", "lam"]),
        (["train", "--method", "pfenet", *base[1:], "--set", "train.batch_size=many"], ["train.batch_size"]),
        (["train", "--method", "pfenet", *base[1:], "--set", f"data.root={tmp_path / 'nowhere'}"], ["does not exist"]),
        (["train", "--method", "pfenet", "--dataset", "synthetic", "--fold", "0", "--out", reference_run,
          "--iterations", "6", *sum((["--set", s] for s in tiny_sets(synthetic_root, **{"optim.lr": 0.3})), [])],
         ["new --out"]),
        (["evaluate", "--run", tmp_path / "missing"], ["not a training run directory"]),
        (["evaluate", "--run", reference_run, "--protocol", "bestever"], ["unknown test protocol", "pfenet"]),
        (["evaluate", "--run", reference_run, "--shot", "1", "--shot", "5", "--out", tmp_path / "x.json"], ["{shot}"]),
        (["evaluate", "--model", tmp_path / "none.pt", "--dataset", "synthetic", "--root", synthetic_root,
          "--fold", "0"], ["does not exist"]),
        (["aggregate", "--runs", tmp_path, "--out", tmp_path / "res"], ["no evaluation JSON"]),
    ]
    for args, needles in cases:
        code, _, err = run_fss(args, capsys)
        assert_one_line_error(code, err, *needles)


@pytest.mark.slow
def test_sigkill_then_resume_matches_the_uninterrupted_run(synthetic_root, tmp_path, subprocess_env):
    """Kill -9 a real `fss train` process after its first checkpoint; the rerun resumes."""
    iterations = 14
    sets = tiny_sets(synthetic_root, **{"train.checkpoint_every": 1})
    cmd = [FSS, "train", "--method", "pfenet", "--dataset", "synthetic", "--fold", "0", "--iterations",
           str(iterations), "--device", "cpu", "--params", str(REPO_PARAMS), "--out", str(tmp_path / "killed")]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / R.CHECKPOINT_FILE
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.is_file():
            try:
                if R.load_checkpoint(ckpt)["iteration"] >= 3:
                    break
            except CheckpointError:
                pass  # being replaced right now
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed; raise the iteration count"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = R.load_checkpoint(ckpt)["iteration"]
    assert 3 <= stopped_at < iterations
    done = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming {tmp_path / 'killed'} at iteration {stopped_at}/{iterations}" in done.stderr

    reference = tmp_path / "reference"
    train_run(resolve_run_config(method="pfenet", dataset="synthetic", fold=0, shot=1, iterations=iterations,
                                 device="cpu", set_values=sets, params_path=REPO_PARAMS), reference)
    assert _same_weights(_weights(reference), _weights(tmp_path / "killed"))
    assert _rows(reference / R.CURVES_FILE) == _rows(tmp_path / "killed" / R.CURVES_FILE)
    assert _rows(reference / R.VAL_FILE) == _rows(tmp_path / "killed" / R.VAL_FILE)


def test_the_training_free_floor_runs_through_train_evaluate_and_aggregate(synthetic_root, reference_run, tmp_path,
                                                                           capsys):
    """prototype: `fss train` writes a run with 0 steps (no optimiser), `fss evaluate` scores it,
    and the aggregated tables list it before the trained methods."""
    config = resolve_run_config(method="prototype", dataset="synthetic", fold=0, shot=1, iterations=6,
                                device="cpu", set_values=[v for v in tiny_sets(synthetic_root) if not v.startswith("knobs.")],
                                params_path=REPO_PARAMS)
    run = tmp_path / "prototype"
    summary = train_run(config, run)["summary"]
    assert summary["iterations"] == 0
    assert _rows(run / R.CURVES_FILE) == [] and (run / R.MODEL_SELECTED).is_file()
    evals = tmp_path / "evals"
    for name, source in (("prototype", run), ("pfenet", reference_run)):
        code, _, err = run_fss(["evaluate", "--run", source, "--out", evals / f"{name}.json"], capsys)
        assert code == 0, err
    assert 0.0 < json.loads((evals / "prototype.json").read_text())["miou"] <= 1.0
    code, _, err = run_fss(["aggregate", "--runs", evals, "--out", tmp_path / "results"], capsys)
    assert code == 0, err
    rows = [line.split("|")[1].strip() for line in (tmp_path / "results" / "table_miou.md").read_text().splitlines()
            if line.startswith("| ") and "Method" not in line and "---" not in line]
    assert rows[:2] == ["prototype", "pfenet"]
