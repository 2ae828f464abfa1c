"""Pretraining of the small backbone (object pool, per-fold base classes), and the results tables."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from fss.data.prepared import PreparedDataset
from fss.errors import ConfigError
from pipeline.aggregate import aggregate, collect_results, find_evaluations, miou_table
from fss.data.synthetic import POOL_SHAPES
from pipeline.pretrain import load_split_tensors, object_pool_tensors, pretrain_backbone


def test_pretraining_labels_never_show_a_novel_class(synthetic_root):
    data = PreparedDataset(synthetic_root, 2, "train")
    base = list(data.base_classes)
    images, labels = load_split_tensors(data, base, size=33)
    assert images.shape == (len(data), 3, 33, 33) and labels.shape == (len(data), 33, 33)
    assert set(torch.unique(labels).tolist()) <= set(range(16)) | {255}
    # pixels of the fold's novel classes (11..15) are background (0), base class c -> index
    image, mask = data.load(0)
    raw = torch.from_numpy(mask.astype(np.int64))[None, None].float()
    small = torch.nn.functional.interpolate(raw, size=(33, 33), mode="nearest")[0, 0].long()
    for c in data.novel_classes:
        assert bool((labels[0][small == c] == 0).all())
    for i, c in enumerate(base):
        assert bool((labels[0][small == c] == i + 1).all())


def test_pretrain_writes_a_loadable_backbone(synthetic_root, tmp_path):
    from fss.models.backbones import build_backbone

    out = tmp_path / "small-fold1.pt"
    report = pretrain_backbone(out, source="base_classes", root=synthetic_root, fold=1, epochs=1, batch_size=8,
                               size=33, device="cpu", dataset="synthetic")["report"]
    assert report["base_classes"] == [c for c in range(1, 21) if not 6 <= c <= 10]
    assert report["novel_classes_seen_as_background"] == [6, 7, 8, 9, 10]
    assert math.isfinite(report["final_loss"]) and 0.0 <= report["train_pixel_accuracy"] <= 1.0
    net = build_backbone("small", weights=str(out))
    saved = torch.load(out, weights_only=True)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in saved.items())
    assert json.loads(out.with_suffix(".json").read_text())["fold"] == 1
    with pytest.raises(ConfigError, match="holds the synthetic dataset, not pascal"):
        pretrain_backbone(out, source="base_classes", root=synthetic_root, fold=1, epochs=1, dataset="pascal")
    with pytest.raises(ConfigError, match="needs --root and --fold"):
        pretrain_backbone(out, source="base_classes", root=synthetic_root, epochs=1)
    with pytest.raises(ConfigError, match="pretrain.source got 'imagenet'; choose one of: objects, pool_classes, base_classes"):
        pretrain_backbone(out, source="imagenet", epochs=1)


def test_object_pool_pretraining_sees_no_benchmark_class(tmp_path):
    """source=objects: a class-agnostic object/background task on the pool (no benchmark image,
    no class), one backbone for every fold; the report says what it was trained on."""
    from fss.models.backbones import build_backbone

    images, labels = object_pool_tensors(seed=0, images=12, image_size=32, size=33)
    assert images.shape == (12, 3, 33, 33) and set(torch.unique(labels).tolist()) == {0, 1, 255}
    out = tmp_path / "small-pool.pt"
    result = pretrain_backbone(out, source="objects", images=12, image_size=32, epochs=1, batch_size=4, size=33,
                               device="cpu")
    report = result["report"]
    assert result["status"] == "done" and result["iteration"] == result["total_iterations"] == 3
    assert report["benchmark_classes_seen"] == [] and report["pool"]["shapes"] == list(POOL_SHAPES)
    assert report["iterations"] == 3 and "fold" not in report and math.isfinite(report["final_loss"])
    build_backbone("small", weights=str(out))
    a, written = torch.load(out, weights_only=True), out.with_suffix(".json").read_bytes()
    assert result["seconds"] >= 0 and "seconds" not in json.loads(written)
    again = pretrain_backbone(out, source="objects", images=12, image_size=32, epochs=1, batch_size=4, size=33,
                              device="cpu", run_dir=tmp_path / "afresh")["report"]  # trained again, not resumed
    b = torch.load(out, weights_only=True)
    assert again["final_loss"] == report["final_loss"] and all(torch.equal(a[k], b[k]) for k in a)
    # the report holds no wall-clock time: the rerun leaves pretrained/ byte for byte, so DVC reruns no train stage
    assert out.with_suffix(".json").read_bytes() == written


def test_pool_class_pretraining_labels_each_pool_object_with_its_pool_class(tmp_path):
    """source=pool_classes: the same pool images, each object labelled with its pool class
    (1..20, a pool shape with a benchmark class's texture and hue family), background 0, band
    255; a 21-way head; still no benchmark image or class seen."""
    from fss.data.synthetic import SHAPES, class_attributes, pool_class_names

    images, objects = object_pool_tensors(seed=0, images=12, image_size=32, size=33)
    same, classes = object_pool_tensors(seed=0, images=12, image_size=32, size=33, classes=True)
    assert torch.equal(images, same)
    assert torch.equal(classes == 255, objects == 255) and torch.equal((classes > 0) & (classes < 255), objects == 1)
    assert len(set(torch.unique(classes).tolist()) - {0, 255}) > 4 and int(classes[classes < 255].max()) <= 20
    names = pool_class_names()
    assert len(set(names)) == 20 and not any(name.split("-")[2] in SHAPES for name in names)
    assert names[6].split("-")[:2] == list(reversed(class_attributes(7)[1:]))  # texture and hue of class 7
    report = pretrain_backbone(tmp_path / "pc.pt", source="pool_classes", images=12, image_size=32, epochs=1,
                               batch_size=4, size=33, device="cpu")["report"]
    assert report["source"] == "pool_classes" and report["pool"]["labels"] == list(names)
    assert report["benchmark_classes_seen"] == [] and math.isfinite(report["final_loss"])
    head = torch.load(tmp_path / "pc.pt", weights_only=True)
    assert not any(k.startswith("head") for k in head)  # only the backbone is written


def test_pretrain_channels_last_matches_the_default_layout(synthetic_root, tmp_path):
    """pretrain.channels_last changes the memory layout only: the same weights up to float
    rounding, saved in the default layout; a non-boolean value is refused by name."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    n = len(PreparedDataset(synthetic_root, 1, "train"))
    kw = dict(source="base_classes", root=synthetic_root, fold=1, epochs=1, batch_size=n // 3, size=33,
              device="cpu", dataset="synthetic")  # 3 steps: rounding stays small
    plain = pretrain_backbone(tmp_path / "a.pt", channels_last=False, **kw)["report"]
    cl = pretrain_backbone(tmp_path / "b.pt", channels_last=True, **kw)["report"]
    assert cl["channels_last"] is True and plain["channels_last"] is False and cl["iterations"] == 3
    a, b = torch.load(tmp_path / "a.pt", weights_only=True), torch.load(tmp_path / "b.pt", weights_only=True)
    assert a.keys() == b.keys() and all(v.is_contiguous() for v in b.values())
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4, rtol=1e-4) for k in a)
    assert abs(plain["final_loss"] - cl["final_loss"]) < 1e-4
    params = tmp_path / "params.yaml"
    params.write_text("pretrain:\n  channels_last: maybe\n")
    result = CliRunner().invoke(app, ["pretrain", "--fold", "1", "--out", str(tmp_path / "c.pt"), "--root",
                                      str(synthetic_root), "--params", str(params)])
    assert isinstance(result.exception, ConfigError)
    assert "pretrain.channels_last must be true or false" in str(result.exception)
    # the graph's pretrain@<backbone> stage passes no fold: params source base_classes points at pretrain_base
    params.write_text("pretrain:\n  source: base_classes\n")
    result = CliRunner().invoke(app, ["pretrain", "--out", str(tmp_path / "d.pt"), "--params", str(params)])
    assert isinstance(result.exception, ConfigError) and "benchmark.pretrain_base_classes" in str(result.exception)


def _evaluation(method, fold, shot, miou, fb=0.5, **extra) -> dict:
    """An evaluation file as `fss evaluate` writes it (the keys aggregate reads)."""
    return {"kind": "fss-evaluation", "version": 1, "method": method, "dataset": "synthetic", "backbone": "small",
            "fold": fold, "shot": shot, "train_shot": 1, "miou": miou, "fb_iou": fb, "episodes": 400,
            "num_runs": 1, "protocol": "pfenet", "checkpoint_selection": "last", **extra}


def _write_grid(root, rows):
    for i, d in enumerate(rows):
        p = root / d["method"] / f"{i}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(d))


def test_tables_follow_the_papers_layout(tmp_path):
    rows = [_evaluation(m, f, s, miou=0.1 * (f + 1) + (0.05 if s == 5 else 0) + (0.2 if m == "apanet" else 0),
                        fb=0.6 + 0.01 * f)
            for m in ("apanet", "pfenet") for f in range(4) for s in (1, 5)]
    rows.append(_evaluation("panet", 0, 1, 0.3, miou_std=0.02, fb_iou_std=0.01, num_runs=5, protocol="pfenet"))
    _write_grid(tmp_path / "evals", rows)
    (tmp_path / "evals" / "notes.json").write_text('{"kind": "something else"}')
    report = aggregate(tmp_path / "evals", tmp_path / "results")
    assert report["evaluations"] == len(rows)
    res = pd.read_csv(tmp_path / "results" / "results.csv")
    assert list(res.columns[:9]) == ["method", "dataset", "backbone", "shot", "fold", "miou", "fb_iou", "miou_std", "fb_iou_std"]
    assert {"episodes", "protocol"} <= set(res.columns) and len(res) == len(rows)
    assert res.loc[res["method"] == "panet", "miou_std"].item() == pytest.approx(0.02)

    table = pd.read_csv(tmp_path / "results" / "table_miou.csv").set_index("Method")
    assert table.loc["apanet", "1-shot Fold-0"] == pytest.approx(30.0)
    assert table.loc["apanet", "1-shot Mean"] == pytest.approx(100 * np.mean([0.3, 0.4, 0.5, 0.6]))
    assert table.loc["pfenet", "5-shot Mean"] == pytest.approx(100 * np.mean([0.15, 0.25, 0.35, 0.45]))
    assert math.isnan(table.loc["panet", "1-shot Fold-1"]) and table.loc["panet", "1-shot Mean"] == pytest.approx(30.0)
    fb = pd.read_csv(tmp_path / "results" / "table_fbiou.csv").set_index("Method")
    assert fb.loc["pfenet", "1-shot"] == pytest.approx(100 * np.mean([0.60, 0.61, 0.62, 0.63]))

    md = (tmp_path / "results" / "table_miou.md").read_text()
    assert "| apanet | **30.0** | **40.0** | **50.0** | **60.0** | **45.0** |" in md
    assert "| panet | 30.0 | – | – | – | 30.0 |" in md
    tex = (tmp_path / "results" / "table_miou.tex").read_text()
    assert r"\multicolumn{5}{c}{1-shot} & \multicolumn{5}{c}{5-shot}" in tex and r"\textbf{45.0}" in tex
    assert (tmp_path / "results" / "chart_miou.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert summary["synthetic/small/pfenet/apanet/1-shot"]["miou"] == pytest.approx(45.0)


def test_support_control_evaluations_get_their_own_column_group(tmp_path):
    rows = [_evaluation("pfenet", f, s, miou=0.3 + 0.01 * f) for f in range(4) for s in (1, 5)]
    rows += [_evaluation("pfenet", f, 1, miou=0.2, support_control={"name": "shifted", "same_class_episodes": 3})
             for f in range(4)]
    _write_grid(tmp_path / "evals", rows)
    aggregate(tmp_path / "evals", tmp_path / "results")
    table = miou_table(collect_results(find_evaluations(tmp_path / "evals")))
    assert list(dict.fromkeys(table.columns.get_level_values(0))) == ["1-shot", "1-shot shifted support", "5-shot"]
    assert table.loc["pfenet", ("1-shot shifted support", "Mean")] == pytest.approx(20.0)
    assert table.loc["pfenet", ("1-shot", "Mean")] == pytest.approx(31.5)
    metrics = tmp_path / "results" / "metrics" / "synthetic-small-pfenet"
    assert sorted(p.name for p in metrics.iterdir()) == [
        "pfenet-1shot-shifted-support.json", "pfenet-1shot.json", "pfenet-5shot.json"]
    res = pd.read_csv(tmp_path / "results" / "results.csv")
    assert sorted(res["support"].unique()) == ["own", "shifted"]
    # the same fold and shot twice with the same control is a duplicate, named with its setting
    _write_grid(tmp_path / "dup", [rows[-1], rows[-1]])
    with pytest.raises(ConfigError, match="several evaluations of pfenet fold 3 1-shot shifted support"):
        collect_results(find_evaluations(tmp_path / "dup"))


def test_aggregate_refuses_duplicates_and_empty_dirs(tmp_path):
    _write_grid(tmp_path / "evals", [_evaluation("pfenet", 0, 1, 0.3), _evaluation("pfenet", 0, 1, 0.4)])
    with pytest.raises(ConfigError, match="several evaluations of pfenet fold 0 1-shot"):
        collect_results(find_evaluations(tmp_path / "evals"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no evaluation JSON"):
        aggregate(tmp_path / "empty", tmp_path / "out")
    table = miou_table(collect_results(find_evaluations(tmp_path / "evals" / "pfenet" / "0.json")))
    assert table.loc["pfenet", ("1-shot", "Fold-0")] == pytest.approx(30.0)
