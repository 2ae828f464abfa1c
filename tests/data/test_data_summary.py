"""`fss data summary`: images per class in each fold's lists, as JSON and as a table."""

from __future__ import annotations

import json
import shutil

import pytest

from fss.data.coco import prepare_coco
from fss.data.pascal import prepare_pascal
from fss.data.prepared import META_FILE
from tests.data.fixtures import (
    assert_one_line_error,
    coco_scenario,
    pascal_scenario,
    run_fss,
    run_main,
)


def full(classes, nonzero: dict[int, int]) -> dict[str, int]:
    """Every class of the split, zero unless listed."""
    return {str(c): nonzero.get(c, 0) for c in classes}


def base(fold: int, num: int = 20, novel=None) -> list[int]:
    novel = novel if novel is not None else range(5 * fold + 1, 5 * fold + 6)
    return [c for c in range(1, num + 1) if c not in set(novel)]


# from the hand-computed PASCAL lists (test_pascal.PFENET_LISTS): counted classes per image
PASCAL_EXPECTED = {
    "fold0": {"train": full(base(0), {6: 1, 12: 1, 19: 1}), "val": full(range(1, 6), {2: 1, 3: 1})},
    "fold1": {"train": full(base(1), {1: 1, 12: 1, 19: 1, 3: 1}), "val": full(range(6, 11), {8: 1})},
    "fold2": {"train": full(base(2), {1: 1, 6: 1, 19: 1, 3: 1}), "val": full(range(11, 16), {13: 1})},
    "fold3": {"train": full(base(3), {1: 1, 6: 1, 12: 1, 3: 1}), "val": full(range(16, 21), {17: 1})},
}


@pytest.fixture(scope="module")
def pascal_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("summary_pascal")
    raw = pascal_scenario(tmp / "raw")
    prepare_pascal(raw.voc_root, tmp / "prepared", sbd_root=raw.sbd_root)
    return tmp / "prepared"


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("summary_coco")
    prepare_coco(coco_scenario(tmp / "raw"), tmp / "prepared")
    return tmp / "prepared"


def test_pascal_json(pascal_dir, capsys):
    res = run_main(capsys, "data", "summary", "--dataset", "pascal", "--root", pascal_dir, "--json")
    assert res.code == 0, res.stderr
    assert json.loads(res.stdout) == PASCAL_EXPECTED
    assert list(json.loads(res.stdout)["fold0"]["train"])[:3] == ["6", "7", "8"]  # ordered by class id


def test_coco_json_both_conventions(coco_dir, capsys):
    res = run_main(capsys, "data", "summary", "--dataset", "coco", "--root", coco_dir, "--coco-split", "contiguous", "--json")
    assert res.code == 0, res.stderr
    got = json.loads(res.stdout)
    # contiguous fold 3: novel 61..80; val = tv (63), toothbrush (80); train = bicycle (2), person (1)
    assert got["fold3"]["val"] == full(range(61, 81), {63: 1, 80: 1})
    assert got["fold3"]["train"] == full(range(1, 61), {1: 1, 2: 1})
    assert got["fold1"]["train"] == full(base(1, 80, range(21, 41)), {1: 1, 2: 1, 80: 1})

    res = run_main(capsys, "data", "summary", "--dataset", "coco", "--root", coco_dir, "--json")
    got = json.loads(res.stdout)  # interleaved by default: fold 0 novel = 1, 5, ..., 77
    assert got["fold0"]["val"] == full(range(1, 81, 4), {1: 1, 21: 1})
    assert got["fold0"]["train"] == full(base(0, 80, range(1, 81, 4)), {2: 1, 80: 1})
    assert got["fold3"]["val"] == full(range(4, 81, 4), {80: 1})


def test_synthetic_json_matches_its_lists(tmp_path, capsys):
    from fss.data.synthetic import prepare_synthetic

    prepare_synthetic(tmp_path, size=48, train_images=24, val_images=16)
    res = run_main(capsys, "data", "summary", "--dataset", "synthetic", "--root", tmp_path, "--json")
    assert res.code == 0, res.stderr
    got = json.loads(res.stdout)
    for fold in range(4):
        for split in ("train", "val"):
            lines = (tmp_path / "lists" / "pascal" / f"fold{fold}" / f"{split}.txt").read_text().splitlines()
            expected: dict[str, int] = {}
            for line in lines:
                for c in line.split()[1].split(","):
                    expected[c] = expected.get(c, 0) + 1
            assert {c: n for c, n in got[f"fold{fold}"][split].items() if n} == expected
            assert len(got[f"fold{fold}"][split]) == (15 if split == "train" else 5)


def table_rows(stdout: str) -> dict[str, list[list[str]]]:
    """class name -> the fold cells of its row in each table (train table first, then val)."""
    rows: dict[str, list[list[str]]] = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) == 8 and cells[1].isdigit():
            rows.setdefault(cells[2], []).append(cells[3:7])
    return rows


def test_table_names_classes(coco_dir, pascal_dir, capsys):
    res = run_main(capsys, "data", "summary", "--dataset", "coco", "--root", coco_dir)
    assert res.code == 0, res.stderr
    assert "interleaved" in res.stdout and "fold3" in res.stdout
    rows = table_rows(res.stdout)
    assert len(rows) == 80
    # toothbrush (80): base in folds 0-2 (indexed by image 25 in each), novel in fold 3 (val image 4)
    assert rows["toothbrush"] == [["1", "1", "1", ""], ["", "", "", "1"]]
    res = run_main(capsys, "data", "summary", "--dataset", "pascal", "--root", pascal_dir)
    rows = table_rows(res.stdout)
    assert len(rows) == 20 and "diningtable" in rows and "tvmonitor" in rows
    # bus (6): base in folds 0, 2, 3 (image B), novel in fold 1 with no val image
    assert rows["bus"] == [["1", "", "1", "1"], ["", "0", "", ""]]


def test_errors_one_line(pascal_dir, coco_dir, tmp_path, capsys):
    def summary(*args):
        return run_main(capsys, "data", "summary", *args)

    assert_one_line_error(summary("--dataset", "coco", "--root", pascal_dir), "'pascal'", "--dataset pascal")
    assert_one_line_error(summary("--dataset", "voc", "--root", pascal_dir), "unknown dataset 'voc'")
    assert_one_line_error(summary("--dataset", "coco", "--root", coco_dir, "--coco-split", "fwb"),
                          "unknown fold convention 'fwb'")
    assert_one_line_error(summary("--dataset", "pascal", "--root", pascal_dir, "--coco-split", "contiguous"),
                          "coco only")
    assert_one_line_error(summary("--dataset", "pascal", "--root", tmp_path / "none"), "does not exist")
    incomplete = tmp_path / "incomplete"
    shutil.copytree(pascal_dir, incomplete)
    (incomplete / META_FILE).unlink()
    assert_one_line_error(summary("--dataset", "pascal", "--root", incomplete), "not a complete prepared dataset")


@pytest.mark.slow  # starts the console script
def test_console_script(pascal_dir):
    res = run_fss("data", "summary", "--dataset", "pascal", "--root", pascal_dir, "--json")
    assert res.code == 0, res.stderr
    assert json.loads(res.stdout) == PASCAL_EXPECTED
    res = run_fss("data", "summary", "--dataset", "coco", "--root", pascal_dir, "--json")
    assert res.code == 2
    assert_one_line_error(res, "not 'coco'")
