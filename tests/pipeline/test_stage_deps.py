"""dvc.yaml declares the code each stage runs: a stage whose code changed must rerun.

The deps are derived from the import graph (pipeline/codedeps.py, tests/pipeline/test_graph.py);
this checks the derivation against what really runs. Each stage's command (one fold's) is run
in-process on tiny data while a profiler records which of the repository's files had a
function called (module-level import code is not counted: the CLI imports every command's
module and every method registers itself, but only the code that runs can change a stage's
outputs). Every such file must be one of the stage's deps in the repository's dvc.yaml, apart
from the few files that cannot change an output (codedeps.NO_OUTPUT_EFFECT: error messages,
console printing, the CLI's dispatch).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from pipeline.codedeps import NO_OUTPUT_EFFECT
from pipeline.config import REPO_PARAMS

from pipeline_helpers import run_fss, tiny_sets

REPO = REPO_PARAMS.parent


def _stage_deps(name: str) -> list[str]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    spec = stages[name]
    spec = spec.get("do", spec)
    return [d for d in spec["deps"] if "${" not in d]


def _files_run(args: list[str], capsys) -> set[str]:
    """Repository files (relative paths) with a function called while `fss ARGS` ran."""
    import pipeline.cli  # noqa: F401  (every command module imported, so their import-time calls are not counted)

    called: set[str] = set()
    root = str(REPO) + "/"

    def profile(frame, event, _arg):
        if event == "call":
            code = frame.f_code
            if code.co_filename.startswith(root) and code.co_name != "<module>":
                called.add(code.co_filename[len(root):])

    old = sys.getprofile()
    sys.setprofile(profile)
    try:
        code, out, err = run_fss(args, capsys)
    finally:
        sys.setprofile(old)
    assert code == 0, out + err
    return {f for f in called if f.startswith(("fss/", "pipeline/"))}


def _assert_declared(stage: str, runs: list[list[str]], capsys, *, seen: set[str]) -> None:
    """Run each `fss` command of ``runs`` under the profiler; every project file whose code ran
    (``seen`` among them: the profiler saw the stage's own code) is a declared dep of ``stage``."""
    files: set[str] = set()
    for args in runs:
        files |= _files_run(args, capsys)
    assert seen <= files, sorted(seen - files)
    missing = _undeclared(files, _stage_deps(stage))
    assert missing == [], f"code run by stage {stage} but not among its dvc.yaml deps: {missing}"


def _undeclared(files: set[str], deps: list[str]) -> list[str]:
    def covered(f: str) -> bool:
        return any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)

    return sorted(f for f in files if not covered(f) and f not in NO_OUTPUT_EFFECT)


@pytest.fixture
def tiny_run(synthetic_root, tmp_path, capsys):
    """A finished 2-iteration pfenet run on the tiny synthetic data."""
    out = tmp_path / "run"
    sets = tiny_sets(synthetic_root, **{"validation.every": 0})
    code, stdout, err = run_fss(["train", "--method", "pfenet", "--dataset", "synthetic", "--fold", "0", "--iterations",
                                 "2", "--device", "cpu", "--out", str(out)] + [a for s in sets for a in ("--set", s)],
                                capsys)
    assert code == 0, stdout + err
    return out


@pytest.mark.parametrize("method", ["pfenet", "panet"])
def test_train_stage_declares_the_code_it_runs(method, synthetic_root, tmp_path, capsys):
    sets = tiny_sets(synthetic_root, **({"validation.every": 0} if method == "panet" else {}))
    if method == "panet":
        sets = [s for s in sets if not s.startswith("knobs.reduce_dim")]
    args = ["train", "--method", method, "--dataset", "synthetic", "--fold", "0", "--iterations", "2",
            "--device", "cpu", "--out", str(tmp_path / "run")] + [a for s in sets for a in ("--set", s)]
    _assert_declared(f"train-{method}", [args], capsys, seen={"pipeline/train.py", "fss/data/access.py"})


def test_evaluate_stage_declares_the_code_it_runs(tiny_run, tmp_path, capsys):
    args = ["evaluate", "--run", str(tiny_run), "--shot", "1", "--shot", "2", "--protocol", "pfenet",
            "--device", "cpu", "--episodes", "4", "--out", str(tmp_path / "ev-{shot}shot.json")]
    _assert_declared("evaluate-pfenet", [args], capsys, seen={"pipeline/figures.py", "fss/metrics.py"})


def test_pretrain_stage_declares_the_code_it_runs(tmp_path, capsys):
    args = ["pretrain", "--source", "objects", "--images", "16", "--backbone", "small", "--device", "cpu",
            "--epochs", "1", "--size", "33", "--batch-size", "16", "--out", str(tmp_path / "small.pt")]
    _assert_declared("pretrain", [args], capsys, seen={"pipeline/pretrain.py"})


def test_aggregate_stage_declares_the_code_it_runs(tiny_run, tmp_path, capsys):
    evals = tmp_path / "evals"
    code, out, err = run_fss(["evaluate", "--run", str(tiny_run), "--shot", "1", "--device", "cpu", "--episodes", "4",
                              "--out", str(evals / "pfenet" / "fold0-1shot.json")], capsys)
    assert code == 0, out + err
    _assert_declared("aggregate", [["aggregate", "--runs", str(evals), "--out", str(tmp_path / "results")]], capsys,
                     seen={"pipeline/aggregate.py"})


def test_the_lock_file_is_committed():
    """As in DVC's example-get-started, dvc.lock is versioned with the code: a clone knows which
    outputs (in the DVC remote) and metrics (in git) belong to its params and code, and
    `dvc exp show` / `dvc metrics diff` compare commits. docs/pipeline.md has what DVC's
    rewrite of the lock after each stage costs on the full grid."""
    import subprocess

    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "dvc.lock"], cwd=REPO, capture_output=True, text=True)
    assert tracked.returncode == 0, "dvc.lock is not tracked by git; run 'uv run dvc repro' and 'git add dvc.lock' (docs/pipeline.md, The DVC graph)"
    ignored = subprocess.run(["git", "check-ignore", "-q", "dvc.lock"], cwd=REPO)
    assert ignored.returncode == 1, "dvc.lock is git-ignored; remove it from .gitignore"


def test_dvc_reads_yaml_with_the_c_parser():
    """ruamel.yaml.clib is a dependency for DVC's sake: without it each read of a full dvc.lock
    took about 2 s of pure-Python parsing, several times per stage."""
    from ruamel.yaml import YAML

    assert "_ruamel_yaml" in YAML(typ="safe").Parser.__module__, \
        "ruamel.yaml runs without its C parser; 'uv sync' should install ruamel.yaml.clib (pyproject.toml)"


def test_prepare_stage_declares_the_code_it_runs(tmp_path, capsys):
    args = ["prepare", "synthetic", "--out", str(tmp_path / "syn"), "--seed", "0", "--size", "33",
            "--train-images", "20", "--val-images", "40"]
    _assert_declared("prepare", [args], capsys, seen={"fss/data/synthetic.py"})


def test_sweep_stage_declares_the_code_it_runs(synthetic_root, tmp_path, capsys):
    study = tmp_path / "tiny_lam.yaml"
    sets = dict(s.split("=", 1) for s in tiny_sets(synthetic_root, **{"validation.every": 0, "train.iterations": 2,
                                                                          "train.device": "cpu"}))
    study.write_text(yaml.safe_dump({
        "study": "tiny_lam", "method": "apanet", "dataset": "synthetic", "folds": [0], "shots": [1],
        "backbone": "small", "set": sets, "params": {"knobs.lam": {"values": [0.0]}},
        "output": str(tmp_path / "out" / "{study}"),
    }, sort_keys=False))
    _assert_declared("sweep-embedded_apanet_lambda", [["sweep", "run", str(study)]], capsys,
                     seen={"pipeline/sweep/run.py", "pipeline/train.py"})
    _assert_declared("sweep_report-embedded_apanet_lambda",
                     [["sweep", "report", str(study), "--out", str(tmp_path / "report")]], capsys,
                     seen={"pipeline/sweep/report.py"})
