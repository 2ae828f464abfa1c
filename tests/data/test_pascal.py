"""PASCAL-5i preparation from a tiny VOC2012 tree + SBD release (or SegmentationClassAug).

Expected lists are computed by hand from the scenario in tests/data/fixtures.py:
A=2007_000032 {1:2500, 15:80}, B=2007_000039 {6:2070, 7:2000}, C=2007_000063 {12:2500, 4:80}
(VOC train); V1=2007_000129 {2:2500, 16:80}, V2=2007_000170 {8}, V3=2007_000241 {13},
V4=2007_000256 {17:2500, 3:2500} (VOC val); SBD-only S2=2008_000003 {19}, S1=2008_000002
{3:2500, 18:80} (SBD train, in that order after C and V3), S3=2008_000008 {9} (SBD val).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from fss.data.imageio import read_mask, write_mask
from fss.data.pascal import prepare_pascal
from fss.data.prepared import META_FILE, PreparedDataset, read_areas
from fss.errors import ConfigError, DataError
from tests.data.fixtures import (
    SBD_IMAGES,
    VOC_IMAGES,
    assert_one_line_error,
    aug_scenario,
    expected_aug_mask,
    paint,
    pascal_scenario,
    run_fss,
    run_main,
    truncate,
    write_sbd_mat,
)

A, B, C_, V1, V2, V3, V4 = "2007_000032", "2007_000039", "2007_000063", "2007_000129", "2007_000170", "2007_000241", "2007_000256"
S1, S2, S3 = "2008_000002", "2008_000003", "2008_000008"

# pfenet train candidates in order: A, B, C, S2, S1 (C de-duplicated, V3 is VOC val).
PFENET_LISTS = {
    0: {"train": [f"{B} 6 6,7", f"{C_} 12 12", f"{S2} 19 19"],          # A: only 15 (80 px); S1: only 18
        "val": [f"{V1} 2 2", f"{V4} 3 3"]},
    1: {"train": [f"{A} 1 1,15", f"{C_} 12 4,12", f"{S2} 19 19", f"{S1} 3 3,18"],  # B: 6, 7 novel
        "val": [f"{V2} 8 8"]},
    2: {"train": [f"{A} 1 1", f"{B} 6 6,7", f"{S2} 19 19", f"{S1} 3 3,18"],        # C: 12 novel, 4 small
        "val": [f"{V3} 13 13"]},
    3: {"train": [f"{A} 1 1,15", f"{B} 6 6,7", f"{C_} 12 4,12", f"{S1} 3 3"],      # S2: 19 novel
        "val": [f"{V4} 17 17"]},                                                  # V1: 16 is 80 px
}


def read_list(out: Path, fold: int, split: str) -> list[str]:
    return (Path(out) / "lists" / "pascal" / f"fold{fold}" / f"{split}.txt").read_text().splitlines()


def all_lists(out: Path) -> dict:
    return {f: {s: read_list(out, f, s) for s in ("train", "val")} for f in range(4)}


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    return pascal_scenario(tmp_path_factory.mktemp("pascal_raw"))


@pytest.fixture(scope="module")
def prepared_sbd(scenario, tmp_path_factory):
    out = tmp_path_factory.mktemp("pascal_sbd") / "prepared"
    summary = prepare_pascal(scenario.voc_root, out, sbd_root=scenario.sbd_root)
    return out, summary


def test_pfenet_lists_from_sbd(prepared_sbd):
    out, summary = prepared_sbd
    assert all_lists(out) == PFENET_LISTS
    assert summary["images"] == {"train": 5, "val": 4}
    assert summary["lists"] == {"pascal": {"fold0": {"train": 3, "val": 2}, "fold1": {"train": 4, "val": 1},
                                       "fold2": {"train": 4, "val": 1}, "fold3": {"train": 4, "val": 1}}}
    areas = read_areas(out)
    assert areas[B] == {6: 2070, 7: 2000}  # 255 band excluded, band pixels not counted
    assert areas[C_] == {4: 80, 12: 2500}  # VOC's map, not SBD's class 10
    assert set(areas) == {A, B, C_, S2, S1, V1, V2, V3, V4}


def test_rendered_aug_masks_voc_takes_precedence(prepared_sbd):
    out, summary = prepared_sbd
    assert summary["masks_rendered"] == 9
    for image_id in [A, B, C_, S1, S2, V1, V2, V3, V4]:
        path = out / "SegmentationClassAug" / f"{image_id}.png"
        with Image.open(path) as img:
            assert img.mode == "P"
        np.testing.assert_array_equal(read_mask(path), expected_aug_mask(image_id))
    assert 255 in read_mask(out / "SegmentationClassAug" / f"{A}.png")      # VOC boundary band
    assert 5 not in read_mask(out / "SegmentationClassAug" / f"{A}.png")    # SBD's version ignored
    assert set(np.unique(read_mask(out / "SegmentationClassAug" / f"{S1}.png"))) == {0, 3, 18}
    assert not (out / "SegmentationClassAug" / f"{S3}.png").exists()        # not in the pfenet lists


def test_instance_masks_and_meta(prepared_sbd, scenario):
    out, summary = prepared_sbd
    meta = json.loads((out / META_FILE).read_text())
    assert meta["dataset"] == "pascal" and meta["num_classes"] == 20
    assert meta["class_names"][0] == "aeroplane" and meta["class_names"][19] == "tvmonitor"
    assert meta["conventions"] == ["pascal"]
    assert meta["options"] == {"train_list": "pfenet", "min_area": 2048, "filter_intersection": False, "source": "sbd"}
    assert meta["image_dir"] == str((scenario.voc_root / "JPEGImages").resolve())
    assert meta["mask_dir"] == "SegmentationClassAug"
    assert meta["counts"]["pascal"]["fold0"] == {"train": 3, "val": 2}
    assert meta["instance_dir"] == "SegmentationObjectAug"
    assert summary["instance_masks"] == 9
    # SBD instance map (GTinst): instance k = k-th object, no band
    img = SBD_IMAGES[S1]
    np.testing.assert_array_equal(read_mask(out / "SegmentationObjectAug" / f"{S1}.png"),
                                  paint(img.shape, img.rects, band=False, instances=True))
    img = VOC_IMAGES[A]
    np.testing.assert_array_equal(read_mask(out / "SegmentationObjectAug" / f"{A}.png"),
                                  paint(img.shape, img.rects, band=True, instances=True))


def test_prepared_dataset_reads_it(prepared_sbd):
    out, _ = prepared_sbd
    ds = PreparedDataset(out, 3, "val")
    assert [r.id for r in ds.records] == [V4]
    image, mask = ds.load(0)
    assert image.shape == (60, 120, 3) and mask.shape == (60, 120)
    assert ds.class_counts() == {16: 0, 17: 1, 18: 0, 19: 0, 20: 0}
    train = PreparedDataset(out, 1, "train")
    assert train.class_counts()[3] == 1 and train.class_counts()[1] == 1


def test_trainaug_adds_sbd_val(scenario, tmp_path):
    out = tmp_path / "p"
    summary = prepare_pascal(scenario.voc_root, out, sbd_root=scenario.sbd_root, train_list="trainaug")
    assert summary["images"]["train"] == 6  # A, B, C, S2, S1, S3 (A again in SBD val: dropped)
    lists = all_lists(out)
    for fold in (0, 2, 3):  # class 9 is a base class there
        assert lists[fold]["train"] == PFENET_LISTS[fold]["train"] + [f"{S3} 9 9"]
    assert lists[1]["train"] == PFENET_LISTS[1]["train"]
    assert all(lists[f]["val"] == PFENET_LISTS[f]["val"] for f in range(4))
    assert json.loads((out / META_FILE).read_text())["options"]["train_list"] == "trainaug"


def test_filter_intersection_drops_images_with_novel_pixels(scenario, tmp_path):
    out = tmp_path / "p"
    prepare_pascal(scenario.voc_root, out, sbd_root=scenario.sbd_root, filter_intersection=True)
    lists = all_lists(out)
    assert lists[0]["train"] == [f"{B} 6 6,7", f"{S2} 19 19"]                    # C holds 80 px of class 4
    assert lists[1]["train"] == PFENET_LISTS[1]["train"]
    assert lists[2]["train"] == [f"{B} 6 6,7", f"{S2} 19 19", f"{S1} 3 3,18"]    # A holds class 15
    assert lists[3]["train"] == [f"{A} 1 1,15", f"{B} 6 6,7", f"{C_} 12 4,12"]  # S1 holds class 18
    assert all(lists[f]["val"] == PFENET_LISTS[f]["val"] for f in range(4))


def test_min_area_zero_counts_small_objects(scenario, tmp_path):
    out = tmp_path / "p"
    prepare_pascal(scenario.voc_root, out, sbd_root=scenario.sbd_root, min_area=0)
    assert read_list(out, 0, "train") == [f"{A} 15 15", f"{B} 6,7 6,7", f"{C_} 12 12", f"{S2} 19 19", f"{S1} 18 18"]
    assert read_list(out, 3, "val") == [f"{V1} 16 16", f"{V4} 17 17"]


def test_track_reports_progress(scenario, tmp_path):
    calls = []

    def track(items, description, total):
        calls.append((description, total))
        yield from items

    prepare_pascal(scenario.voc_root, tmp_path / "p", sbd_root=scenario.sbd_root, track=track)
    assert calls == [("pascal masks", 9)]


# ---------------------------------------------------------------- a ready SegmentationClassAug


def test_aug_root_with_sbd_train_list_matches_sbd(scenario, tmp_path):
    aug = aug_scenario(tmp_path, "sbd_train.txt")
    out = tmp_path / "p"
    summary = prepare_pascal(scenario.voc_root, out, aug_root=aug)
    assert all_lists(out) == PFENET_LISTS
    assert summary["masks_rendered"] == 0 and not (out / "SegmentationClassAug").exists()
    meta = json.loads((out / META_FILE).read_text())
    assert meta["mask_dir"] == str(aug.resolve()) and meta["options"]["source"] == "aug"
    # instance maps only where VOC annotates the image
    assert summary["instance_masks"] == 7 and meta["instance_dir"] == "SegmentationObjectAug"
    assert not (out / "SegmentationObjectAug" / f"{S1}.png").exists()
    ds = PreparedDataset(out, 0, "train")
    assert ds.mask_path(0) == aug.resolve() / f"{B}.png"
    _, mask = ds.load(0)
    np.testing.assert_array_equal(mask, expected_aug_mask(B))


def test_aug_root_trainaug_list_file_order(scenario, tmp_path):
    aug = aug_scenario(tmp_path, "train_aug.txt")  # lists S3 then S2, as image/mask paths
    out = tmp_path / "p"
    prepare_pascal(scenario.voc_root, out, aug_root=aug, train_list="trainaug")
    assert read_list(out, 0, "train") == [f"{B} 6 6,7", f"{C_} 12 12", f"{S3} 9 9", f"{S2} 19 19"]


def test_aug_root_trainaug_without_list_takes_every_png(scenario, tmp_path):
    aug = aug_scenario(tmp_path)
    out = tmp_path / "p"
    summary = prepare_pascal(scenario.voc_root, out, aug_root=aug, train_list="trainaug")
    assert summary["images"]["train"] == 6  # VOC train, then sorted ids, VOC val removed
    assert read_list(out, 1, "train") == [f"{A} 1 1,15", f"{C_} 12 4,12", f"{S1} 3 3,18", f"{S2} 19 19"]


def test_aug_root_pfenet_needs_sbd_train_ids(scenario, tmp_path):
    with pytest.raises(DataError, match="sbd_train.txt"):
        prepare_pascal(scenario.voc_root, tmp_path / "p", aug_root=aug_scenario(tmp_path))


def test_aug_root_missing_mask(scenario, tmp_path):
    aug = aug_scenario(tmp_path, "sbd_train.txt")
    (aug / f"{V2}.png").unlink()
    with pytest.raises(DataError, match=f"{V2}.png does not exist"):
        prepare_pascal(scenario.voc_root, tmp_path / "p", aug_root=aug)


# ---------------------------------------------------------------- the CLI and bad input


@pytest.fixture()
def raw(tmp_path):
    """A fresh scenario the test may damage."""
    return pascal_scenario(tmp_path / "raw")


@pytest.mark.slow  # starts the console script (a few seconds of imports)
def test_cli_prepare_pascal_console_script(scenario, tmp_path):
    out = tmp_path / "p"
    res = run_fss("prepare", "pascal", "--voc-root", scenario.voc_root, "--sbd-root", scenario.sbd_root,
                  "--out", out, "--train-list", "trainaug", "--min-area", "2048")
    assert res.code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["lists"]["pascal"]["fold0"] == {"train": 4, "val": 2} and summary["train_list"] == "trainaug"
    assert read_list(out, 0, "train")[-1] == f"{S3} 9 9"


@pytest.mark.slow  # starts the console script
def test_cli_truncated_jpeg_console_script(raw, tmp_path):
    truncate(raw.voc_root / "JPEGImages" / f"{B}.jpg")
    res = run_fss("prepare", "pascal", "--voc-root", raw.voc_root, "--sbd-root", raw.sbd_root, "--out", tmp_path / "p")
    assert res.code == 2
    assert_one_line_error(res, f"{B}.jpg", "truncated")


def _prepare(capsys, raw, out, *extra):
    return run_main(capsys, "prepare", "pascal", "--voc-root", raw.voc_root, "--out", out, *extra)


def test_cli_errors_one_line(raw, tmp_path, capsys):
    out = tmp_path / "p"
    sbd = ("--sbd-root", raw.sbd_root)
    assert_one_line_error(_prepare(capsys, raw, out), "exactly one mask source")
    assert_one_line_error(_prepare(capsys, raw, out, *sbd, "--aug-root", tmp_path), "exactly one mask source")
    res = run_main(capsys, "prepare", "pascal", "--voc-root", tmp_path / "nowhere", "--out", out, *sbd)
    assert_one_line_error(res, "nowhere", "does not exist")
    assert_one_line_error(_prepare(capsys, raw, out, "--sbd-root", tmp_path / "nosbd"), "nosbd", "does not exist")
    assert not (out / META_FILE).exists()


def test_missing_voc_parts(raw, tmp_path):
    val_txt = raw.voc_root / "ImageSets" / "Segmentation" / "val.txt"
    val_txt.rename(val_txt.with_suffix(".bak"))
    with pytest.raises(DataError, match="val.txt does not exist"):
        prepare_pascal(raw.voc_root, tmp_path / "p", sbd_root=raw.sbd_root)
    val_txt.with_suffix(".bak").rename(val_txt)
    for sub in ("SegmentationClass", "JPEGImages"):
        (raw.voc_root / sub).rename(raw.voc_root / f"{sub}.bak")
        with pytest.raises(DataError, match=sub):
            prepare_pascal(raw.voc_root, tmp_path / "p", sbd_root=raw.sbd_root)
        (raw.voc_root / f"{sub}.bak").rename(raw.voc_root / sub)
    (raw.sbd_root / "cls").rename(raw.sbd_root / "cls.bak")
    with pytest.raises(DataError, match="cls"):
        prepare_pascal(raw.voc_root, tmp_path / "p", sbd_root=raw.sbd_root)


def test_missing_image_and_mask(raw, tmp_path):
    (raw.voc_root / "JPEGImages" / f"{S2}.jpg").unlink()
    with pytest.raises(DataError, match=f"{S2}.jpg does not exist"):
        prepare_pascal(raw.voc_root, tmp_path / "p", sbd_root=raw.sbd_root)
    raw2 = pascal_scenario(tmp_path / "raw2")
    (raw2.sbd_root / "cls" / f"{S1}.mat").unlink()
    with pytest.raises(DataError, match=f"no mask for image {S1}"):
        prepare_pascal(raw2.voc_root, tmp_path / "p", sbd_root=raw2.sbd_root)


def test_mask_size_mismatch(raw, tmp_path, capsys):
    write_mask(raw.voc_root / "SegmentationClass" / f"{B}.png", np.zeros((60, 70), np.uint8))
    line = assert_one_line_error(_prepare(capsys, raw, tmp_path / "p", "--sbd-root", raw.sbd_root),
                                 f"{B}.png", "70x60", "104x64")
    assert line.startswith("error:")
    raw2 = pascal_scenario(tmp_path / "raw2")
    write_sbd_mat(raw2.sbd_root / "cls" / f"{S2}.mat", "GTcls", np.zeros((61, 70), np.uint8), [])
    with pytest.raises(DataError, match=f"{S2}.mat is 70x61"):
        prepare_pascal(raw2.voc_root, tmp_path / "p2", sbd_root=raw2.sbd_root)


def test_class_id_out_of_range(raw, tmp_path, capsys):
    bad = expected_aug_mask(V2)
    bad[0, 0] = 21
    write_mask(raw.voc_root / "SegmentationClass" / f"{V2}.png", bad)
    assert_one_line_error(_prepare(capsys, raw, tmp_path / "p", "--sbd-root", raw.sbd_root),
                          f"{V2}.png", "class id 21")
    raw2 = pascal_scenario(tmp_path / "raw2")
    seg = np.full((60, 70), 30, np.uint8)
    write_sbd_mat(raw2.sbd_root / "cls" / f"{S1}.mat", "GTcls", seg, [30])
    with pytest.raises(DataError, match="class id 30"):
        prepare_pascal(raw2.voc_root, tmp_path / "p2", sbd_root=raw2.sbd_root)


def test_corrupt_or_foreign_mat(raw, tmp_path):
    (raw.sbd_root / "cls" / f"{S1}.mat").write_bytes(b"MATLAB 5.0 MAT-file, garbage")
    with pytest.raises(DataError, match=f"{S1}.mat is unreadable"):
        prepare_pascal(raw.voc_root, tmp_path / "p", sbd_root=raw.sbd_root)
    raw2 = pascal_scenario(tmp_path / "raw2")
    scipy.io.savemat(str(raw2.sbd_root / "cls" / f"{S1}.mat"), {"other": np.zeros((60, 70))})
    with pytest.raises(DataError, match="no struct GTcls"):
        prepare_pascal(raw2.voc_root, tmp_path / "p2", sbd_root=raw2.sbd_root)


def test_fold_without_eligible_image(raw, tmp_path, capsys):
    # without V4, fold 3's val list would hold only V1, whose class 16 covers 80 px
    (raw.voc_root / "ImageSets" / "Segmentation" / "val.txt").write_text(f"{V1}\n{V2}\n{V3}\n")
    assert_one_line_error(_prepare(capsys, raw, tmp_path / "p", "--sbd-root", raw.sbd_root),
                          "fold 3", "no eligible val image")
    with pytest.raises(DataError, match="fold 0 .* no eligible train image"):
        prepare_pascal(raw.voc_root, tmp_path / "p", sbd_root=raw.sbd_root, min_area=2600)


def test_bad_options():
    with pytest.raises(ConfigError, match="unknown train list 'voc'"):
        prepare_pascal("x", "y", sbd_root="z", train_list="voc")
    with pytest.raises(ConfigError, match="min_area"):
        prepare_pascal("x", "y", sbd_root="z", min_area=-1)


def test_interrupted_prepare_leaves_no_complete_output(raw, tmp_path, capsys):
    out = tmp_path / "p"
    prepare_pascal(raw.voc_root, out, sbd_root=raw.sbd_root)
    assert PreparedDataset(out, 0, "val").records
    truncate(raw.voc_root / "JPEGImages" / f"{V4}.jpg")  # the last image processed
    assert_one_line_error(_prepare(capsys, raw, out, "--sbd-root", raw.sbd_root), f"{V4}.jpg")
    assert not (out / META_FILE).exists()
    assert (out / "SegmentationClassAug" / f"{V3}.png").exists()  # it stopped in the middle
    with pytest.raises(DataError, match="not a complete prepared dataset"):
        PreparedDataset(out, 0, "val")
