"""The one evaluation path: validation, a sweep trial's scoring and `fss evaluate` write reports
of the same builder, with the same fields."""

from __future__ import annotations

import json

import pytest

from fss.errors import CheckpointError
from pipeline import runs as R
from pipeline.config import REPO_PARAMS, resolve_run_config
from pipeline.sweep.run import evaluate_on_validation
from pipeline.train import train_run

from pipeline_helpers import run_fss, tiny_sets


def test_validation_sweep_trial_and_evaluate_reports_have_the_same_fields(synthetic_root, tmp_path, capsys):
    config = resolve_run_config(method="pfenet", dataset="synthetic", fold=0, shot=1, iterations=2, device="cpu",
                                set_values=tiny_sets(synthetic_root), params_path=REPO_PARAMS)
    run = tmp_path / "run"
    train_run(config, run)
    validation = json.loads((run / R.VAL_REPORT).read_text())
    miou = evaluate_on_validation(config, run / R.MODEL_SELECTED, 1, tmp_path / "trial.json")
    trial = json.loads((tmp_path / "trial.json").read_text())
    code, _, err = run_fss(["evaluate", "--run", run, "--out", tmp_path / "eval.json", "--figure", tmp_path / "e.png"],
                           capsys)
    assert code == 0, err
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    # the caches and the figure are what only `fss evaluate` has; every other field is shared
    only_evaluate = {"feature_cache", "image_cache", "figure"}
    assert set(validation) == set(trial) == set(evaluation) - only_evaluate
    assert validation["split"] == trial["split"] == config.validation.split and evaluation["split"] == "val"
    # validation and the trial score the same weights on the same validation episodes
    assert validation["miou"] == trial["miou"] == pytest.approx(miou)
    assert validation["protocol_options"] == trial["protocol_options"]
    assert validation["episodes"] == 4 and evaluation["episodes"] == 6


def test_a_sweep_trial_refuses_a_model_of_another_method(synthetic_root, tmp_path):
    config = resolve_run_config(method="pfenet", dataset="synthetic", fold=0, shot=1, iterations=1, device="cpu",
                                set_values=tiny_sets(synthetic_root, **{"validation.every": 0}),
                                params_path=REPO_PARAMS)
    train_run(config, tmp_path / "run")
    other = resolve_run_config(method="apanet", dataset="synthetic", fold=0, shot=1, iterations=1, device="cpu",
                               set_values=tiny_sets(synthetic_root), params_path=REPO_PARAMS)
    with pytest.raises(CheckpointError, match="holds a pfenet model, not apanet"):
        evaluate_on_validation(other, tmp_path / "run" / R.MODEL_SELECTED, 1, tmp_path / "t.json")
