"""A real `dvc repro` of the generated dvc.yaml on a tiny grid (2 methods x 1 fold), and
of its real-data form on a PASCAL fixture in the release formats with a ResNet-50 file.

The repository's params.yaml, shrunk (tiny data, a few iterations), and the dvc.yaml that
`fss graph` writes for it go into a fresh git + DVC repository with the code they depend on.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.config import REPO_PARAMS
from pipeline.graph import render

from pipeline_helpers import DVC, FSS
from tests.conftest import TINY_SYNTHETIC

REPO = REPO_PARAMS.parent
METHODS = ["pfenet", "panet"]


def _tiny_params() -> dict:
    p = yaml.safe_load(REPO_PARAMS.read_text())
    p["benchmark"].update(methods=METHODS, folds=[0], pretrain_backbones=["small"], device="cpu")
    p["prepare"].update(TINY_SYNTHETIC)
    p["pretrain"].update(epochs=1, size=33, batch_size=8, images=24)
    syn = p["datasets"]["synthetic"]
    syn["data"]["train_size"] = 33
    syn["train"].update(iterations=4, batch_size=2)
    syn["validation"] = {"episodes": 4, "every": 2}
    syn["test"].update(episodes=6, size=33, batch_size=3)
    for m in ("pfenet",):
        p["methods"][m]["datasets"]["synthetic"]["knobs"]["reduce_dim"] = 16
    return p


def _run(cmd, cwd, env, timeout=600) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _dvc_repo(work: Path, params: dict, env: dict, *, with_code: bool = True) -> Path:
    """A fresh git + DVC repository at ``work`` with ``params`` as its params.yaml, the dvc.yaml
    `fss graph` writes for it and (``with_code``) a copy of the code the stages run."""
    work.mkdir(parents=True, exist_ok=True)
    if with_code:
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for name in ("fss", "pipeline", "sweeps"):
            shutil.copytree(REPO / name, work / name, ignore=ignore)
    (work / "dvc.yaml").write_text(render(params))
    shutil.copy(REPO / ".gitignore", work / ".gitignore")
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], work, env)
    _run([DVC, "init", "-q"], work, env)
    return work


@pytest.mark.slow
def test_dvc_repro_tiny_grid(tmp_path, subprocess_env):
    """The tiny grid end to end: every stage runs, a second repro is a no-op, metrics and curves
    are in git and the other outputs in the DVC remote, one knob invalidates one stage, and an
    experiment shows in `dvc exp show` and `dvc plots diff` next to the baseline."""
    work = _dvc_repo(tmp_path / "repo", _tiny_params(), subprocess_env)

    stages = _run([DVC, "stage", "list", "--name-only"], work, subprocess_env).stdout.split()
    assert stages == ["prepare", "pretrain@small", "train-pfenet", "train-panet", "evaluate-pfenet", "evaluate-panet",
                      "aggregate", "sweep-embedded_apanet_lambda", "sweep_report-embedded_apanet_lambda"]

    first = _run([DVC, "repro"], work, subprocess_env)
    for stage in stages:
        assert f"Running stage '{stage}'" in first.stdout, stage
    assert (work / "pretrained" / "small-pool.pt").is_file()
    for m in METHODS:
        run = work / "runs" / m / "fold0"
        assert {"config.yaml", "model.pt", "checkpoint.pt", "curves.csv"} <= {p.name for p in run.iterdir()}
        assert yaml.safe_load((run / "config.yaml").read_text())["backbone_weights"] == "pretrained/small-pool.pt"
        for k in (1, 5):
            report = json.loads((work / "evals" / m / f"fold0-{k}shot.json").read_text())
            assert report["shot"] == k and report["episodes"] == 6 and report["protocol"] == "pfenet"
            assert (work / "evals" / m / f"fold0-{k}shot.png").is_file()
            control = json.loads((work / "evals" / m / f"fold0-{k}shot-shifted-support.json").read_text())
            assert control["shot"] == k and control["support_control"]["name"] == "shifted"
        assert (work / "plots" / "train" / f"{m}-fold0" / "curves.csv").is_file()
    results = (work / "results" / "results.csv").read_text().splitlines()
    assert results[0].startswith("method,dataset,backbone,shot,fold,miou,fb_iou") and len(results) == 9
    assert "1-shot shifted support" in (work / "results" / "table_miou.md").read_text()
    sweep_table = work / "results" / "sweeps" / "embedded_apanet_lambda" / "table.md"
    assert sweep_table.is_file() and "0.5" in sweep_table.read_text()
    lock = yaml.safe_load((work / "dvc.lock").read_text())
    assert lock["stages"]["train-panet"]["params"]["params.yaml"]["methods.panet"]["knobs"]["lambda_par"] == 1.0

    second = _run([DVC, "repro"], work, subprocess_env)
    assert "Running stage" not in second.stdout and "up to date" in second.stdout
    _metrics_travel_with_git_and_the_remote(work, tmp_path, subprocess_env)

    # a knob of one method invalidates that method's stages only
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["methods"]["panet"]["knobs"]["lambda_par"] = 0.5
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = _run([DVC, "status", "--json"], work, subprocess_env).stdout
    assert list(json.loads(status)) == ["train-panet"]
    dry = _run([DVC, "repro", "--dry"], work, subprocess_env).stdout
    ran = [line.split("'")[1] for line in dry.splitlines() if line.startswith("Running stage")]
    assert "train-panet" in ran and not any("pfenet" in s for s in ran)
    _run(["git", "checkout", "params.yaml"], work, subprocess_env)

    # an experiment: `dvc exp show` lists mIoU for it and for the baseline commit
    exp = _run([DVC, "exp", "run", "-S", "methods.panet.knobs.lambda_par=0.5"], work, subprocess_env).stdout
    ran = [line.split("'")[1] for line in exp.splitlines() if line.startswith("Running stage")]
    assert ran == ["train-panet", "evaluate-panet", "aggregate"], exp[-3000:]
    (baseline,) = [r for r in json.loads(_run([DVC, "exp", "show", "--json"], work, subprocess_env).stdout)
                   if r["rev"] != "workspace"]
    (experiment,) = [rev for e in baseline["experiments"] for rev in e["revs"]]
    for row, lam in ((baseline, 1.0), (experiment, 0.5)):
        assert row["data"]["params"]["params.yaml"]["data"]["methods"]["panet"]["knobs"]["lambda_par"] == lam
        for k in (1, 5):
            metrics = row["data"]["metrics"][f"evals/panet/fold0-{k}shot.metrics.json"]["data"]
            assert 0.0 <= metrics["miou"] <= 1.0 and metrics["shot"] == k
    # the training curves of both revisions, in one plot per file
    plots = json.loads(_run([DVC, "plots", "diff", "HEAD", experiment["name"], "--json"], work, subprocess_env).stdout)
    assert not plots.get("errors"), plots["errors"]
    (curves,) = plots["data"]["plots/train/panet-fold0/curves.csv"]
    assert {row["rev"] for row in curves["content"]["data"]["values"]} == {"HEAD", experiment["name"]}


def _metrics_travel_with_git_and_the_remote(work: Path, tmp_path: Path, env: dict) -> None:
    """Small metrics and curves are in git; the reports, tables, runs and data in the DVC remote:
    `dvc metrics show` prints short rows, and a fresh clone's `dvc pull` restores every output."""
    shown = json.loads(_run([DVC, "metrics", "show", "--json"], work, env).stdout)
    files = shown[""]["data"] if "" in shown else next(iter(shown.values()))["data"]
    assert sorted(files) == sorted(
        [f"evals/{m}/fold0-{k}shot{c}.metrics.json" for m in METHODS for k in (1, 5) for c in ("", "-shifted-support")]
        + [f"results/metrics/synthetic-small-pfenet/{m}-{k}shot{c}.json" for m in METHODS for k in (1, 5)
           for c in ("", "-shifted-support")])
    for name, row in files.items():
        data = row["data"]
        assert 0.0 <= data["miou"] <= 1.0 and 0.0 <= data["miou_low"] <= data["miou_high"] <= 1.0, (name, row)
        assert len(data) <= 9, (name, row)
    _run([DVC, "remote", "add", "-d", "local", str(tmp_path / "remote")], work, env)
    _run(["git", "add", "-A"], work, env)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results"], work, env)
    tracked = set(_run(["git", "ls-files"], work, env).stdout.split())
    assert {"dvc.lock", "evals/panet/fold0-1shot.metrics.json", "plots/train/panet-fold0/curves.csv"} <= tracked
    assert not any(f.startswith("runs/") or f.endswith((".png", ".pt")) or f == "evals/panet/fold0-1shot.json"
                   for f in tracked), sorted(tracked)
    _run([DVC, "push"], work, env)
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(work), str(clone)], tmp_path, env)
    _run([DVC, "pull"], clone, env)
    for f in ("evals/panet/fold0-5shot.json", "evals/pfenet/fold0-1shot.png", "results/table_miou.md",
              "results/chart_miou.png", "runs/pfenet/fold0/model.pt", "pretrained/small-pool.pt",
              "results/sweeps/embedded_apanet_lambda/table.md"):
        assert (clone / f).read_bytes() == (work / f).read_bytes(), f
    assert "up to date" in _run([DVC, "status"], clone, env).stdout


def test_real_data_grid_has_no_synthetic_stages(tmp_path, subprocess_env, monkeypatch):
    """Pointed at prepared real data with a downloaded backbone (README "Real data"), the graph
    pretrains nothing and runs no embedded sweep; the stages read the real root and weights."""
    p = yaml.safe_load(REPO_PARAMS.read_text())
    p["benchmark"].update(dataset="pascal", root="data/pascal", backbone="resnet50v2",
                          weights="pretrained/resnet50_v2.pth", folds=[0, 1], methods=["apanet"],
                          pretrain_backbones=[], sweeps={}, device="cuda")
    work = _dvc_repo(tmp_path / "repo", p, subprocess_env, with_code=False)
    stages = _run([DVC, "stage", "list", "--name-only"], work, subprocess_env).stdout.split()
    assert stages == ["prepare", "train-apanet", "evaluate-apanet", "aggregate"]
    from dvc.repo import Repo

    monkeypatch.chdir(work)  # DVC reads params.yaml relative to the working directory
    with Repo(str(work)) as repo:
        (stage,) = repo.stage.collect("train-apanet")
    assert "--dataset pascal --fold 0 --fold 1" in stage.cmd and "--backbone resnet50v2 --device cuda" in stage.cmd
    assert "data.root=data/pascal" in stage.cmd and "backbone_weights=pretrained/resnet50_v2.pth" in stage.cmd
    assert {str(d.def_path) for d in stage.deps} >= {"data/pascal", "pretrained"}


@pytest.mark.slow
def test_base_class_backbones_per_fold_feed_the_train_stages(tmp_path, subprocess_env):
    """benchmark.pretrain_base_classes adds one pretrain_base stage per backbone and fold; with
    benchmark.weights pointing at its {fold} file, each train stage starts from its own fold's
    base-class backbone, which saw that fold's novel classes only as background."""
    import torch

    p = _tiny_params()
    p["benchmark"].update(methods=["prototype"], folds=[0, 1], pretrain_backbones=[], sweeps={},
                          pretrain_base_classes=["small"], weights="pretrained/{backbone}-base-fold{fold}.pt")
    work = _dvc_repo(tmp_path / "repo", p, subprocess_env)
    stages = _run([DVC, "stage", "list", "--name-only"], work, subprocess_env).stdout.split()
    assert stages[:3] == ["prepare", "pretrain_base@small-0", "pretrain_base@small-1"]
    _run([DVC, "repro", "train-prototype"], work, subprocess_env)
    about = json.loads((work / "pretrained" / "small-base-fold1.json").read_text())
    assert (about["source"], about["fold"]) == ("base_classes", 1)
    assert about["novel_classes_seen_as_background"] == [6, 7, 8, 9, 10]
    run = yaml.safe_load((work / "runs" / "prototype" / "fold1" / "config.yaml").read_text())
    assert run["backbone_weights"] == "pretrained/small-base-fold1.pt"
    weights = torch.load(work / "pretrained" / "small-base-fold1.pt")
    model = torch.load(work / "runs" / "prototype" / "fold1" / "model.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(model[f"backbone.{k}"], v) for k, v in weights.items() if f"backbone.{k}" in model)
    assert sum(f"backbone.{k}" in model for k in weights) > 10


def _raw_pascal(root: Path):
    """VOC2012 + SBD in their release formats, enough for fold-0 episodes: every base class
    (6-20) in 2 VOC-train images (also SBD train), every fold-0 novel class (1-5) in 6 VOC-val
    images (a 5-shot episode needs 6), the other novel classes in 1. One 50x50 object per
    60x70 image (2500 px, above the 2048-pixel rule)."""
    from tests.data.fixtures import Img, Rect, build_sbd, build_voc

    def image(cls):
        return Img((60, 70), (Rect(cls, 4, 6, 50, 50),))

    train = {f"2008_{100 + 2 * c + k:06d}": image(c) for c in range(6, 21) for k in range(2)}
    val = {f"2009_{100 + 6 * c + k:06d}": image(c) for c in range(1, 21) for k in range(6 if c <= 5 else 1)}
    voc = build_voc(root / "VOC2012", {**train, **val}, {}, list(train), list(val))
    sbd = build_sbd(root / "benchmark_RELEASE" / "dataset", train, list(train), [])
    return voc, sbd


@pytest.mark.slow
def test_dvc_repro_on_prepared_pascal_with_a_released_backbone_file(tmp_path, subprocess_env):
    """README "Real data", end to end: raw VOC + SBD -> `fss prepare pascal` -> a backbone file
    in PFENet's released resnet50_v2.pth format under pretrained/ -> params.yaml pointed at
    both -> `dvc repro` trains, evaluates (1 and 5 shots) and aggregates a pascal/resnet50v2
    table. Tiny sizes and a few iterations; random backbone weights of the real key layout."""
    import torch

    from tests.models.test_backbones import listing, synthetic_state_dict

    p = _tiny_params()
    p["benchmark"].update(dataset="pascal", root="data/pascal", backbone="resnet50v2",
                          weights="pretrained/resnet50_v2.pth", methods=["pfenet"], folds=[0],
                          pretrain_backbones=[], sweeps={}, device="cpu", protocol="pfenet")
    p["datasets"]["pascal"] = {"data": {"root": "data/pascal", "num_workers": 0, "train_size": 33},
                               "train": {"iterations": 2, "batch_size": 2},
                               "validation": {"episodes": 4, "every": 0},
                               "test": {"episodes": 4, "size": 33, "batch_size": 2}}
    p["methods"]["pfenet"]["datasets"]["pascal"] = {"knobs": {"reduce_dim": 16, "pyramid_bins": [1.0, 0.5, 0.25, 0.125]}}
    work = _dvc_repo(tmp_path / "repo", p, subprocess_env)
    voc, sbd = _raw_pascal(tmp_path / "raw")
    _run([FSS, "prepare", "pascal", "--voc-root", str(voc), "--sbd-root", str(sbd),
          "--out", str(work / "data" / "pascal")], work, subprocess_env)
    (work / "pretrained").mkdir()
    torch.save(synthetic_state_dict(listing("resnet50_v2_backbone.txt")), work / "pretrained" / "resnet50_v2.pth")
    first = _run([DVC, "repro"], work, subprocess_env)
    for stage in ("prepare", "train-pfenet", "evaluate-pfenet", "aggregate"):
        assert f"Running stage '{stage}'" in first.stdout, stage

    config = yaml.safe_load((work / "runs" / "pfenet" / "fold0" / "config.yaml").read_text())
    assert (config["dataset"], config["backbone"], config["backbone_weights"]) == \
        ("pascal", "resnet50v2", "pretrained/resnet50_v2.pth")
    for k in (1, 5):
        report = json.loads((work / "evals" / "pfenet" / f"fold0-{k}shot.json").read_text())
        assert (report["dataset"], report["shot"], report["episodes"]) == ("pascal", k, 4)
        assert 0.0 <= report["miou"] <= 1.0
    import pandas as pd

    results = pd.read_csv(work / "results" / "results.csv")
    assert set(results["dataset"]) == {"pascal"} and set(results["backbone"]) == {"resnet50v2"}
    assert sorted(results["shot"]) == [1, 1, 5, 5] and set(results["fold"]) == {0}
    assert sorted(results["support"]) == ["own", "own", "shifted", "shifted"]
    assert "Running stage" not in _run([DVC, "repro"], work, subprocess_env).stdout
