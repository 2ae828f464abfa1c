"""`fss aggregate` with the reports' per-episode counts: an interval for every cell and mean,
paired differences against the base, the floor and the support control, the seed spread,
and the README table between its markers."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest

from fss.errors import ConfigError
from fss.uncertainty import EpisodeCounts, paired_difference
from pipeline.aggregate import README_MARKERS, README_TABLE, aggregate, write_readme_table

CLASSES = (1, 2, 3, 4, 5)
EPISODES = 120


def _counts(fold: int, quality: float, seed: int) -> EpisodeCounts:
    """Episodes of fold ``fold`` (the same classes whatever the method: one episode list per fold)
    with a foreground IoU around ``quality``."""
    classes = np.random.default_rng(100 + fold).choice(CLASSES, size=(EPISODES, 1))
    rng = np.random.default_rng(seed)
    union = rng.integers(200, 400, size=(EPISODES, 2))
    inter = (union * np.clip(rng.normal(quality, 0.15, size=(EPISODES, 2)), 0, 1)).astype(np.int64)
    return EpisodeCounts(classes, inter, union, np.ones((EPISODES, 1), bool), CLASSES, episode_key=f"fold{fold}")


def _report(method, fold, shot, counts: EpisodeCounts, train_seed=0, support=None) -> dict:
    report = {"kind": "fss-evaluation", "version": 2, "method": method, "dataset": "synthetic", "backbone": "small",
              "fold": fold, "shot": shot, "train_shot": 1, "train_seed": train_seed, "miou": counts.miou(),
              "fb_iou": counts.fb_iou(), "episodes": EPISODES, "num_runs": 1, "protocol": "pfenet",
              "checkpoint_selection": "last", "runs": [{"episode_counts": counts.to_json()}]}
    if support:
        report["support_control"] = {"name": support, "same_class_episodes": 20}
    return report


QUALITY = {"prototype": 0.30, "pfenet": 0.40, "apanet": 0.40}


def _write(root, seeds=(0,)):
    n = 0
    for method, q in QUALITY.items():
        for fold in range(4):
            for seed in seeds:
                own = _counts(fold, q + 0.01 * seed, seed=1000 * seed + 10 * fold + len(method))
                reports = [_report(method, fold, 1, own, seed)]
                if method == "pfenet":  # blind to its support: the control scores the same counts
                    reports.append(_report(method, fold, 1, own, seed, support="shifted"))
                if method == "prototype":
                    reports.append(_report(method, fold, 1, _counts(fold, 0.2, seed=7 + fold), seed, support="shifted"))
                for r in reports:
                    n += 1
                    (root / f"{n}.json").write_text(json.dumps(r))


def test_every_cell_and_mean_has_an_interval_and_methods_get_paired_differences(tmp_path):
    (tmp_path / "evals").mkdir()
    _write(tmp_path / "evals")
    start = time.monotonic()
    aggregate(tmp_path / "evals", tmp_path / "out")
    seconds = time.monotonic() - start
    iv = pd.read_csv(tmp_path / "out" / "intervals.csv")
    assert len(iv) == 5 * 5 and iv[["low", "high"]].notna().all().all()  # 5 (row, setting) x (4 folds + mean)
    assert ((iv["low"] <= iv["miou"] + 1e-9) & (iv["miou"] <= iv["high"] + 1e-9)).all()
    mean = iv[(iv["fold"] == "Mean")].set_index(["row", "setting"])
    one = iv[(iv["fold"] == "0")].set_index(["row", "setting"])
    width = lambda t: t["high"] - t["low"]  # noqa: E731
    assert (width(mean) < width(one)).all()  # four folds resampled independently: narrower
    md = (tmp_path / "out" / "table_miou.md").read_text()
    assert "±" in md and "half the 95% interval" in md
    diffs = pd.read_csv(tmp_path / "out" / "table_differences.csv").set_index(["row", "versus", "comparison"])
    assert set(diffs.index) == {("apanet", "pfenet", "base"), ("apanet", "prototype", "floor"),
                                ("pfenet", "prototype", "floor"), ("pfenet", "pfenet", "own - shifted support"),
                                ("prototype", "prototype", "own - shifted support")}
    blind = diffs.loc[("pfenet", "pfenet", "own - shifted support")]
    assert blind["difference"] == 0 and blind["low"] == 0 and blind["high"] == 0 and blind["contains_zero"]
    assert not diffs.loc[("pfenet", "prototype", "floor")]["contains_zero"]  # 10 points over 480 episodes
    assert diffs.loc[("prototype", "prototype", "own - shifted support")]["low"] > 0
    expected = paired_difference([[_counts(f, 0.40, 10 * f + 6)] for f in range(4)],
                                 [[_counts(f, 0.30, 10 * f + 9)] for f in range(4)])
    assert diffs.loc[("pfenet", "prototype", "floor")]["difference"] == pytest.approx(100 * expected.estimate, abs=1e-3)
    assert diffs.loc[("pfenet", "prototype", "floor")]["low"] == pytest.approx(100 * expected.low, abs=1e-3)
    assert "°" in (tmp_path / "out" / "table_differences.md").read_text()
    metrics = json.loads((tmp_path / "out" / "metrics" / "synthetic-small-pfenet" / "pfenet-1shot.json").read_text())
    assert metrics["miou_low"] < metrics["miou"] < metrics["miou_high"]
    assert seconds < 30, f"the aggregate of 20 reports took {seconds:.1f} s"


def test_several_training_seeds_give_the_seed_spread(tmp_path):
    (tmp_path / "evals").mkdir()
    _write(tmp_path / "evals", seeds=(0, 1))
    aggregate(tmp_path / "evals", tmp_path / "out")
    iv = pd.read_csv(tmp_path / "out" / "intervals.csv")
    mean = iv[(iv["fold"] == "Mean") & (iv["setting"] == "1-shot")].set_index("row")
    assert (mean["seeds"] == 2).all() and (mean["seed_std"] > 0).all()  # each seed's counts differ
    assert "(seed sd " in (tmp_path / "out" / "table_miou.md").read_text()


def test_the_readme_table_goes_between_its_markers(tmp_path):
    (tmp_path / "evals").mkdir()
    _write(tmp_path / "evals")
    aggregate(tmp_path / "evals", tmp_path / "out")
    table = (tmp_path / "out" / README_TABLE).read_text()
    assert table.splitlines()[0].startswith("| Method | 1-shot F0 | F1 | F2 | F3 | **Mean** | other support |")
    assert table.splitlines()[2].startswith("| prototype (floor) |")  # the floor first, with its display name
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_MARKERS[0]}\nold table\n{README_MARKERS[1]}\nafter\n")
    write_readme_table(readme, table)
    assert readme.read_text() == f"intro\n{README_MARKERS[0]}\n{table}{README_MARKERS[1]}\nafter\n"
    readme.write_text("no markers\n")
    with pytest.raises(ConfigError, match="must hold the lines"):
        write_readme_table(readme, table)
