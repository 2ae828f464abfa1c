"""`fss evaluate` with the feature cache: on by default, shared by the shots, off and on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cache_helpers import run_cli, small_model
from fss.models.checkpoints import save_model_file
from fss.models.feature_cache import DISK_SUFFIX
from fss.models.registry import get_method


@pytest.fixture(scope="module")
def model_and_params(tmp_path_factory, cache_synthetic_root) -> tuple[Path, Path, Path]:
    folder = tmp_path_factory.mktemp("cli")
    model_file = folder / "pfenet.pt"
    save_model_file(model_file, small_model("pfenet"), method="pfenet", backbone="small", shot=1,
                    knobs=get_method("pfenet").small_knobs, source="test")
    params = folder / "params.yaml"
    params.write_text(yaml.safe_dump({"datasets": {"synthetic": {
        "data": {"cache_images": True},
        "test": {"episodes": 6, "size": 33, "batch_size": 3, "figure_episodes": 0}}}}))
    return model_file, params, cache_synthetic_root


def _evaluate(model_and_params, out: Path, *extra, capsys):
    model_file, params, root = model_and_params
    args = ["evaluate", "--model", model_file, "--dataset", "synthetic", "--root", root, "--fold", "0",
            "--params", params, "--device", "cpu", "--out", out, *extra]
    return run_cli(args, capsys)


def _report(path: Path) -> dict:
    return json.loads(path.read_text())


def _scores(report: dict) -> tuple:
    return report["miou"], report["fb_iou"], report["class_iou"]


def test_evaluate_shares_cache_across_shots_and_matches_no_cache(tmp_path, model_and_params, capsys):
    code, _, err = _evaluate(model_and_params, tmp_path / "on-{shot}.json", "--shot", "1", "--shot", "5",
                             capsys=capsys)
    assert code == 0, err
    one, five = _report(tmp_path / "on-1.json"), _report(tmp_path / "on-5.json")
    assert one["feature_cache"]["misses"] > 0
    assert five["feature_cache"]["hits"] > 0  # the 5-shot model reuses what the 1-shot one computed

    code, _, err = _evaluate(model_and_params, tmp_path / "off-{shot}.json", "--shot", "1", "--shot", "5",
                             "--no-feature-cache", capsys=capsys)
    assert code == 0, err
    for k in (1, 5):
        off = _report(tmp_path / f"off-{k}.json")
        assert "feature_cache" not in off
        assert _scores(off) == _scores(_report(tmp_path / f"on-{k}.json"))


def test_evaluate_disk_cache_and_option_errors(tmp_path, model_and_params, capsys):
    store = tmp_path / "features"
    args = ("--feature-cache-dir", store, "--feature-cache-mb", "64")
    code, _, err = _evaluate(model_and_params, tmp_path / "a.json", *args, capsys=capsys)
    assert code == 0, err
    first = _report(tmp_path / "a.json")
    assert first["feature_cache"]["disk_writes"] == len(list(store.rglob(f"*{DISK_SUFFIX}"))) > 0
    code, _, err = _evaluate(model_and_params, tmp_path / "b.json", *args, capsys=capsys)  # a later command
    assert code == 0, err
    second = _report(tmp_path / "b.json")
    assert second["feature_cache"]["misses"] == 0 and second["feature_cache"]["disk_hits"] > 0
    assert _scores(second) == _scores(first)

    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    for extra, needle in ((("--feature-cache-mb", "0"), "--feature-cache-mb 0"),
                          (("--feature-cache-dir", blocker / "sub"), "feature cache directory")):
        code, _, err = _evaluate(model_and_params, tmp_path / "c.json", *extra, capsys=capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
