"""COCO-20i preparation from a tiny COCO 2014 tree (see coco_scenario in fixtures.py).

Class index = position of the category id in the sorted id list: person 1 -> 1, bicycle 2 ->
2, car 3 -> 3, elephant 22 -> 21, bottle 44 -> 40, cup 47 -> 42, tv 72 -> 63, toothbrush 90 -> 80.
Interleaved fold k novel = {k+1, k+5, ...}; contiguous fold k novel = 20k+1 .. 20k+20.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fss.data.coco import prepare_coco
from fss.data.imageio import read_mask, write_jpeg
from fss.data.prepared import META_FILE, PreparedDataset, read_areas
from fss.errors import ConfigError, DataError
from tests.data.fixtures import (
    assert_one_line_error,
    coco_scenario,
    jpeg_for,
    run_fss,
    run_main,
    truncate,
)

T = "train2014/COCO_train2014_0000000000"
V = "val2014/COCO_val2014_0000000000"
T9, T25, T42, T49, T57 = (f"{T}{n:02d}" for n in (9, 25, 42, 49, 57))
V1, V2, V3, V4, V5 = (f"{V}{n:02d}" for n in (1, 2, 3, 4, 5))

# crowd=skip areas: T9 {2:2500, 63:80}, T25 {40:25, 80:2475}, T42 {3:100}, T57 {1:2500}
INTERLEAVED = {
    0: {"train": [f"{T9} 2 2,63", f"{T25} 80 40,80"], "val": [f"{V1} 1 1", f"{V5} 21 21"]},
    1: {"train": [f"{T25} 80 40,80", f"{T57} 1 1"], "val": [f"{V2} 42 42"]},
    2: {"train": [f"{T9} 2 2", f"{T25} 80 40,80", f"{T57} 1 1"], "val": [f"{V3} 63 63"]},
    3: {"train": [f"{T9} 2 2,63", f"{T57} 1 1"], "val": [f"{V4} 80 80"]},
}
CONTIGUOUS = {
    0: {"train": [f"{T25} 80 40,80"], "val": [f"{V1} 1 1"]},
    1: {"train": [f"{T9} 2 2,63", f"{T25} 80 80", f"{T57} 1 1"], "val": [f"{V5} 21 21"]},
    2: {"train": [f"{T9} 2 2,63", f"{T25} 80 40,80", f"{T57} 1 1"], "val": [f"{V2} 42 42"]},
    3: {"train": [f"{T9} 2 2", f"{T57} 1 1"], "val": [f"{V3} 63 63", f"{V4} 80 80"]},
}


def lists(out: Path, convention: str) -> dict:
    base = Path(out) / "lists" / convention
    return {f: {s: (base / f"fold{f}" / f"{s}.txt").read_text().splitlines() for s in ("train", "val")}
            for f in range(4)}


def mask_of(out: Path, record_id: str) -> np.ndarray:
    split, stem = record_id.split("/")
    return read_mask(Path(out) / "masks" / split / f"{stem}.png")


def t25_expected(crowd_value: int | None) -> np.ndarray:
    """Toothbrush (80) RLE, then the crowd person region, then the bottle (40) on top."""
    m = np.zeros((60, 70), np.uint8)
    m[2:52, 2:52] = 80
    if crowd_value is not None:
        m[40:60, 40:70] = crowd_value
    m[45:50, 45:50] = 40
    return m


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return coco_scenario(tmp_path_factory.mktemp("coco_raw"))


@pytest.fixture(scope="module")
def prepared_skip(coco_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("coco_skip") / "prepared"
    return out, prepare_coco(coco_root, out)


def test_lists_both_conventions(prepared_skip):
    out, summary = prepared_skip
    assert lists(out, "interleaved") == INTERLEAVED
    assert lists(out, "contiguous") == CONTIGUOUS
    assert summary["images"] == {"train": 4, "val": 5}
    assert summary["skipped_images"] == {"train2014": 2, "val2014": 0}  # 30: no annotation, 49: crowd only
    assert summary["lists"]["contiguous"]["fold3"] == {"train": 2, "val": 2}


def test_skip_mode_masks_and_areas(prepared_skip):
    out, _ = prepared_skip
    np.testing.assert_array_equal(mask_of(out, T25), t25_expected(None))  # no crowd, no 255
    areas = read_areas(out)
    assert areas[T25] == {40: 25, 80: 2475}
    assert areas[T9] == {2: 2500, 63: 80}   # polygon 50x50 and compressed RLE 8x10
    assert areas[T57] == {1: 2500}          # two-part polygon
    m57 = mask_of(out, T57)
    assert (m57[2:52, 2:27] == 1).all() and (m57[:, 27:30] == 0).all() and (m57[2:52, 30:55] == 1).all()
    assert set(areas) == {T9, T25, T42, T57, V1, V2, V3, V4, V5}
    assert not (out / "masks" / "train2014" / "COCO_train2014_000000000030.png").exists()
    assert not (out / "masks" / "train2014" / "COCO_train2014_000000000049.png").exists()


def test_meta(prepared_skip, coco_root):
    out, _ = prepared_skip
    meta = json.loads((out / META_FILE).read_text())
    assert meta["dataset"] == "coco" and meta["num_classes"] == 80
    names = meta["class_names"]
    assert len(names) == 80 and names[0] == "person" and names[11] == "stop sign"
    assert names[20] == "elephant" and names[39] == "bottle" and names[62] == "tv" and names[79] == "toothbrush"
    assert meta["conventions"] == ["interleaved", "contiguous"]
    assert meta["options"] == {"crowd": "skip", "min_area": 2048, "filter_intersection": False}
    assert meta["image_dir"] == str(coco_root.resolve()) and meta["image_ext"] == ".jpg"
    assert "instance_dir" not in meta
    assert meta["counts"]["interleaved"]["fold0"] == {"train": 2, "val": 2}


def test_prepared_dataset_reads_both_conventions(prepared_skip):
    out, _ = prepared_skip
    ds = PreparedDataset(out, 3, "val", "contiguous")
    assert [r.id for r in ds.records] == [V3, V4]
    image, mask = ds.load(1)
    assert image.shape == (60, 70, 3) and mask.shape == (60, 70) and mask[10, 10] == 80
    assert ds.class_counts()[63] == 1 and ds.class_counts()[61] == 0
    assert PreparedDataset(out, 0, "val").class_counts()[21] == 1  # interleaved is the default
    with pytest.raises(ConfigError, match="unknown fold convention 'pascal'"):
        PreparedDataset(out, 0, "val", "pascal")


def test_crowd_include_paints_class(coco_root, tmp_path):
    out = tmp_path / "p"
    summary = prepare_coco(coco_root, out, crowd="include")
    np.testing.assert_array_equal(mask_of(out, T25), t25_expected(1))
    areas = read_areas(out)
    assert areas[T25] == {1: 575, 40: 25, 80: 2356}
    assert areas[T49] == {1: 4200}
    assert summary["skipped_images"]["train2014"] == 1
    assert lists(out, "interleaved")[1]["train"] == [f"{T25} 80 1,40,80", f"{T49} 1 1", f"{T57} 1 1"]
    assert json.loads((out / META_FILE).read_text())["options"]["crowd"] == "include"


def test_crowd_ignore_paints_255(coco_root, tmp_path):
    out = tmp_path / "p"
    prepare_coco(coco_root, out, crowd="ignore")
    np.testing.assert_array_equal(mask_of(out, T25), t25_expected(255))
    assert (mask_of(out, T49) == 255).all()
    areas = read_areas(out)
    assert areas[T25] == {40: 25, 80: 2356} and areas[T49] == {}
    assert lists(out, "interleaved")[1]["train"] == [f"{T25} 80 40,80", f"{T57} 1 1"]


def test_filter_intersection(coco_root, tmp_path):
    out = tmp_path / "p"
    prepare_coco(coco_root, out, filter_intersection=True)
    inter, contig = lists(out, "interleaved"), lists(out, "contiguous")
    assert inter[2]["train"] == [f"{T25} 80 40,80", f"{T57} 1 1"]   # T9 holds tv (63), novel
    assert inter[3]["train"] == INTERLEAVED[3]["train"]
    assert contig[1]["train"] == [f"{T9} 2 2,63", f"{T57} 1 1"]     # T25 holds bottle (40), novel
    assert contig[3]["train"] == [f"{T57} 1 1"]
    assert inter[0]["val"] == INTERLEAVED[0]["val"]


@pytest.mark.slow  # starts the console script
def test_cli_prepare_coco_console_script(coco_root, tmp_path):
    out = tmp_path / "p"
    res = run_fss("prepare", "coco", "--coco-root", coco_root, "--out", out, "--crowd", "ignore")
    assert res.code == 0, res.stderr
    summary = json.loads(res.stdout)  # pycocotools' prints must not reach stdout
    assert summary["crowd"] == "ignore" and summary["lists"]["contiguous"]["fold3"]["val"] == 2
    assert lists(out, "contiguous") == CONTIGUOUS


# ---------------------------------------------------------------- bad input


@pytest.fixture()
def raw(tmp_path):
    return coco_scenario(tmp_path / "raw")


def _prepare(capsys, root, out, *extra):
    return run_main(capsys, "prepare", "coco", "--coco-root", root, "--out", out, *extra)


def test_missing_parts(raw, tmp_path, capsys):
    out = tmp_path / "p"
    assert_one_line_error(_prepare(capsys, tmp_path / "nowhere", out), "nowhere", "does not exist")
    image = raw / "train2014" / "COCO_train2014_000000000025.jpg"
    image.rename(tmp_path / "moved.jpg")
    with pytest.raises(DataError, match="COCO_train2014_000000000025.jpg does not exist"):
        prepare_coco(raw, out)
    (tmp_path / "moved.jpg").rename(image)
    (raw / "annotations" / "instances_val2014.json").unlink()
    assert_one_line_error(_prepare(capsys, raw, out), "instances_val2014.json", "does not exist")
    (raw / "val2014").rename(raw / "val.bak")
    with pytest.raises(DataError, match="val2014 does not exist"):
        prepare_coco(raw, out)


def test_truncated_jpeg(raw, tmp_path, capsys):
    truncate(raw / "train2014" / "COCO_train2014_000000000009.jpg")
    assert_one_line_error(_prepare(capsys, raw, tmp_path / "p"), "COCO_train2014_000000000009.jpg", "truncated")


def test_image_size_differs_from_annotation(raw, tmp_path, capsys):
    write_jpeg(raw / "val2014" / "COCO_val2014_000000000002.jpg", jpeg_for((61, 70), 0))
    assert_one_line_error(_prepare(capsys, raw, tmp_path / "p"), "COCO_val2014_000000000002.jpg", "70x61", "70x60")


def test_bad_annotation_file(raw, tmp_path):
    path = raw / "annotations" / "instances_train2014.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["category_id"] = 12  # a gap in COCO's ids
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="unknown category_id 12"):
        prepare_coco(raw, tmp_path / "p")
    data["annotations"][0]["category_id"] = 2
    data["annotations"][1]["segmentation"] = {"size": [30, 70], "counts": data["annotations"][1]["segmentation"]["counts"]}
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="annotation 1002"):
        prepare_coco(raw, tmp_path / "p")
    path.write_text('{"images": [')
    with pytest.raises(DataError, match="not valid JSON"):
        prepare_coco(raw, tmp_path / "p")
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "person"}]}))
    with pytest.raises(DataError, match="defines 1 categories"):
        prepare_coco(raw, tmp_path / "p")


def test_fold_without_eligible_image(coco_root, tmp_path, capsys):
    assert_one_line_error(_prepare(capsys, coco_root, tmp_path / "p", "--min-area", "2500", "--filter-intersection"),
                          "fold 0 (contiguous) has no eligible train image")


def test_bad_options():
    with pytest.raises(ConfigError, match="unknown crowd mode 'drop'"):
        prepare_coco("x", "y", crowd="drop")
    with pytest.raises(ConfigError, match="min_area"):
        prepare_coco("x", "y", min_area=-5)


def test_interrupted_prepare_leaves_no_complete_output(raw, tmp_path, capsys):
    out = tmp_path / "p"
    prepare_coco(raw, out)
    truncate(raw / "val2014" / "COCO_val2014_000000000005.jpg")  # the last image processed
    assert_one_line_error(_prepare(capsys, raw, out), "COCO_val2014_000000000005.jpg")
    assert not (out / META_FILE).exists()
    with pytest.raises(DataError, match="not a complete prepared dataset"):
        PreparedDataset(out, 0, "val")
