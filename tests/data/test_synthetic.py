"""The embedded synthetic benchmark: VOC layout, fold lists, masks, determinism, CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fss.data import classes as C
from fss.data.imageio import read_image, read_mask
from fss.data.prepared import PreparedDataset, class_areas, list_path, read_areas, read_meta
from fss.data.synthetic import (
    CLASS_NAMES,
    class_attributes,
    default_min_area,
    image_id,
    prepare_synthetic,
    render_image,
)
from fss.errors import ConfigError, DataError

SMALL = dict(seed=0, size=64, train_images=120, val_images=60)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic") / "syn"
    summary = prepare_synthetic(out, **SMALL)
    return out, summary


def _all_ids(root: Path) -> list[str]:
    return [image_id(i) for i in range(SMALL["train_images"] + SMALL["val_images"])]


def test_class_attributes_are_shared_across_folds():
    assert len(set(CLASS_NAMES)) == 20
    for pair in ((0, 2), (1, 2)):  # (shape, hue) and (texture, hue) identify a class
        assert len({tuple(class_attributes(c)[i] for i in pair) for c in range(1, 21)}) == 20
    for fold in range(4):
        novel = C.novel_classes("synthetic", fold)
        base = C.base_classes("synthetic", fold)
        for attr in range(3):
            novel_values = {class_attributes(c)[attr] for c in novel}
            base_values = {class_attributes(c)[attr] for c in base}
            # every attribute a novel class has is taught by some base class
            assert novel_values <= base_values
    assert default_min_area(96) == 101 and default_min_area(64) == 45


def test_layout_meta_and_every_fold_split_reads(small):
    root, summary = small
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationObject"):
        assert len(list((root / sub).iterdir())) == 180
    split_ids = {s: (root / "ImageSets/Segmentation" / f"{s}.txt").read_text().split() for s in ("train", "val")}
    assert split_ids["train"] == [image_id(i) for i in range(120)]
    assert split_ids["val"] == [image_id(i) for i in range(120, 180)]

    meta = read_meta(root)
    assert meta["dataset"] == "synthetic" and meta["num_classes"] == 20
    assert meta["class_names"] == list(CLASS_NAMES)
    assert (meta["image_dir"], meta["image_ext"], meta["mask_dir"]) == ("JPEGImages", ".jpg", "SegmentationClass")
    assert meta["instance_dir"] == "SegmentationObject" and meta["conventions"] == ["pascal"]
    assert meta["options"]["min_area"] == 45 == summary["min_area"]
    assert {k: meta["options"][k] for k in SMALL} == SMALL

    for fold in range(4):
        for split in ("train", "val"):
            ds = PreparedDataset(root, fold, split)
            assert len(ds) == summary["lists"]["pascal"][f"fold{fold}"][split]
            image, mask = ds.load(0)
            assert image.dtype == np.uint8 and image.shape[:2] == mask.shape
            for record in ds.records:
                assert set(record.counted) <= set(ds.classes) and set(record.present) <= set(ds.classes)
                assert record.id in split_ids[split]


def test_masks_band_instances_and_classes(small):
    root, _ = small
    seen: set[int] = set()
    sizes = set()
    for name in _all_ids(root):
        cls = read_mask(root / "SegmentationClass" / f"{name}.png")
        inst = read_mask(root / "SegmentationObject" / f"{name}.png")
        image = read_image(root / "JPEGImages" / f"{name}.jpg")
        assert cls.shape == inst.shape == image.shape[:2]
        assert 64 - 10 <= cls.shape[0] <= 64 + 10 and 64 - 10 <= cls.shape[1] <= 64 + 10
        sizes.add(cls.shape)
        # the band and the background coincide in both maps
        assert np.array_equal(cls == 255, inst == 255) and np.array_equal(cls == 0, inst == 0)
        assert (cls == 255).any()
        ids = sorted(set(np.unique(inst).tolist()) - {0, 255})
        assert ids == list(range(1, len(ids) + 1)) and len(ids) >= 1
        for i in ids:  # one class per instance
            assert len(np.unique(cls[inst == i])) == 1
        # no two neighbouring labelled pixels of different instances: the 255 band separates them
        for a, b in ((inst[:, 1:], inst[:, :-1]), (inst[1:, :], inst[:-1, :]),
                     (inst[1:, 1:], inst[:-1, :-1]), (inst[1:, :-1], inst[:-1, 1:])):
            touching = (a != b) & (a != 255) & (b != 255)
            assert not touching.any(), name
        seen |= set(np.unique(cls).tolist())
    assert seen == set(range(0, 21)) | {255}
    assert len(sizes) > 5  # aspect and size vary


def test_areas_and_lists_follow_the_pascal_rule(small):
    root, _ = small
    areas = read_areas(root)
    for name in _all_ids(root):
        assert areas[name] == class_areas(read_mask(root / "SegmentationClass" / f"{name}.png"))
    min_area = 45
    train_ids = [image_id(i) for i in range(120)]
    val_ids = [image_id(i) for i in range(120, 180)]
    for fold in range(4):
        novel = C.novel_classes("synthetic", fold)
        for split, ids, subset in (("train", train_ids, C.base_classes("synthetic", fold)),
                                   ("val", val_ids, novel)):
            expected = [i for i in ids if any(areas[i].get(c, 0) >= min_area for c in subset)]
            ds = PreparedDataset(root, fold, split)
            assert [r.id for r in ds.records] == expected
            for r in ds.records:
                assert r.counted == tuple(c for c in subset if areas[r.id].get(c, 0) >= min_area)
        # every novel class is testable in every fold
        val = PreparedDataset(root, fold, "val")
        assert all(len(val.class_index[c]) >= 1 for c in novel), val.class_counts()


def test_novel_objects_appear_in_training_images_as_background(small):
    root, _ = small
    train = PreparedDataset(root, 0, "train")
    with_novel = []
    for i, record in enumerate(train.records):
        _, mask = train.load(i)
        if np.isin(mask, [1, 2, 3, 4, 5]).any():
            with_novel.append(record)
        assert not set(record.counted) & {1, 2, 3, 4, 5}
    assert len(with_novel) > len(train) // 4
    assert {c for r in with_novel for c in r.counted}  # indexed under base classes


def test_cli_writes_the_same_bytes_and_prints_json(small, tmp_path):
    root, summary = small
    out = tmp_path / "cli"
    fss = Path(sys.executable).parent / "fss"
    proc = subprocess.run(
        [str(fss), "prepare", "synthetic", "--out", str(out), "--seed", "0", "--size", "64",
         "--train-images", "120", "--val-images", "60"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed["lists"] == summary["lists"] and printed["min_area"] == 45
    # same seed, separate process: byte-identical files and lists
    for rel in ["meta.json", "areas.tsv", "ImageSets/Segmentation/val.txt"] + [
        f"{d}/{image_id(i)}.{e}" for i in (0, 77, 179)
        for d, e in (("JPEGImages", "jpg"), ("SegmentationClass", "png"), ("SegmentationObject", "png"))
    ] + [str(list_path(Path(), "pascal", k, s)) for k in range(4) for s in ("train", "val")]:
        assert (out / rel).read_bytes() == (root / rel).read_bytes(), rel


def test_images_depend_only_on_seed_and_index(small):
    root, _ = small
    # rendering image 77 alone gives the class map written in the pool
    _, cls, inst = render_image(0, 77, 64)
    assert np.array_equal(cls, read_mask(root / "SegmentationClass" / f"{image_id(77)}.png"))
    assert np.array_equal(inst, read_mask(root / "SegmentationObject" / f"{image_id(77)}.png"))
    a, b = render_image(0, 3, 64), render_image(0, 3, 64)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    other = render_image(1, 3, 64)
    assert a[0].shape != other[0].shape or not np.array_equal(a[0], other[0])
    assert not np.array_equal(render_image(0, 4, 64)[1], render_image(0, 3, 64)[1])


def test_interrupted_generation_leaves_no_meta(small, tmp_path):
    root, _ = small
    out = tmp_path / "copy"
    shutil.copytree(root, out)
    assert (out / "meta.json").is_file()

    def interrupting_track(iterable, description, total):
        for n, item in enumerate(iterable):
            if n == 10:
                raise KeyboardInterrupt
            yield item

    with pytest.raises(KeyboardInterrupt):
        prepare_synthetic(out, track=interrupting_track, **SMALL)
    assert not (out / "meta.json").exists()
    assert not [p for p in out.rglob("*.tmp")]
    with pytest.raises(DataError):
        PreparedDataset(out, 0, "train")


def test_progress_track_and_bad_arguments(tmp_path):
    calls = []

    def recording_track(iterable, description, total):
        calls.append((description, total))
        return iterable

    with pytest.raises(ConfigError, match="size"):
        prepare_synthetic(tmp_path / "bad", size=8)
    with pytest.raises(ConfigError, match="val_images"):
        prepare_synthetic(tmp_path / "bad", val_images=0)
    with pytest.raises(ConfigError, match="seed"):
        prepare_synthetic(tmp_path / "bad", seed=-1)
    with pytest.raises(ConfigError, match="min_area"):
        prepare_synthetic(tmp_path / "bad", min_area=-1)
    # too few images for the lists: a one-line DataError, and no meta.json
    with pytest.raises(DataError, match="fold"):
        prepare_synthetic(tmp_path / "tiny", size=32, train_images=2, val_images=1, track=recording_track)
    assert calls == [("generating synthetic images", 3)]
    assert not (tmp_path / "tiny" / "meta.json").exists()


def test_cli_user_error_is_one_line(tmp_path):
    fss = Path(sys.executable).parent / "fss"
    proc = subprocess.run([str(fss), "prepare", "synthetic", "--out", str(tmp_path / "x"), "--size", "8"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "size" in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_default_size_meets_the_sizing_targets(tmp_path):
    summary = prepare_synthetic(tmp_path / "default")
    assert summary["min_area"] == 101
    assert summary["images"] == {"train": 1200, "val": 400, "holdout": 0}
    for fold in range(4):
        train = PreparedDataset(tmp_path / "default", fold, "train")
        val = PreparedDataset(tmp_path / "default", fold, "val")
        # generator v2 (1-3 objects per image) gives 91-95 / 31-36 at this size and seed
        assert min(train.class_counts().values()) >= 85, train.class_counts()
        assert min(val.class_counts().values()) >= 28, val.class_counts()


def test_the_pretraining_pool_draws_no_class_shape(monkeypatch):
    """Pool images draw only POOL_SHAPES (none a class's shape) from their own random stream;
    benchmark images only class shapes. Their masks are class-agnostic (0, 1, 255)."""
    import fss.data.synthetic as S

    assert not set(S.POOL_SHAPES) & set(S.SHAPES)
    drawn: list[str] = []
    real = S._shape_mask
    monkeypatch.setattr(S, "_shape_mask", lambda shape, *a: drawn.append(shape) or real(shape, *a))
    pool = [S.object_pool_image(0, i, 48) for i in range(30)]
    assert set(drawn) == set(S.POOL_SHAPES)
    drawn.clear()
    bench = [S.render_image(0, i, 48) for i in range(30)]
    assert set(drawn) <= set(S.SHAPES)
    assert all(set(np.unique(m).tolist()) <= {0, 1, 255} for _, m in pool)
    assert all(1 in np.unique(m) for _, m in pool[:5])
    assert not any(p[0].shape == b[0].shape and np.array_equal(p[0], b[0]) for p, b in zip(pool, bench))



def test_holdout_lists_hold_no_test_image(small, tmp_path):
    """--holdout-images: validation lists of the novel classes over images that no val (test)
    list holds; a dataset without them says how to get them, in one line."""
    from fss.data.prepared import PreparedDataset
    from fss.errors import DataError

    root = tmp_path / "holdout"
    summary = prepare_synthetic(root, seed=0, size=48, train_images=30, val_images=40, holdout_images=40)
    assert summary["images"] == {"train": 30, "val": 40, "holdout": 40}
    assert json.loads((root / "meta.json").read_text())["options"]["holdout_images"] == 40
    for fold in range(4):
        val, hold = PreparedDataset(root, fold, "val"), PreparedDataset(root, fold, "holdout")
        assert hold.classes == val.classes == hold.novel_classes and len(hold) > 0
        held = {r.id for r in hold.records}
        assert not held & {r.id for r in val.records} and not held & {r.id for r in PreparedDataset(root, fold, "train").records}
        assert held <= {image_id(i) for i in range(70, 110)}
    with pytest.raises(DataError, match=r"has no held-out validation images; prepare it with --holdout-images N") as info:
        PreparedDataset(small[0], 0, "holdout")
    assert "\n" not in str(info.value)
