"""Tiny raw datasets in their real on-disk formats, for the data-preparation tests.

- :func:`build_voc`: a VOC2012 tree (JPEGImages/*.jpg, SegmentationClass and
  SegmentationObject palette PNGs with 255 boundary bands, ImageSets/Segmentation/*.txt).
- :func:`build_sbd`: an SBD release ``dataset/`` folder (cls/*.mat with MATLAB struct GTcls,
  inst/*.mat with GTinst, written by scipy.io.savemat; img/*.jpg; train.txt, val.txt).
- :func:`aug_scenario`: a ready SegmentationClassAug folder (grey PNGs, as commonly shipped).
- :func:`pascal_scenario` / :func:`coco_scenario`: the scenarios the tests hand-compute
  their expectations from (see the docstrings).
- :func:`build_coco`: COCO 2014 (train2014/, val2014/ JPEGs, annotations/instances_*.json
  with polygon, compressed and uncompressed RLE and crowd annotations).

Objects are axis-aligned rectangles ``Rect(cls, y, x, h, w)``; masks are painted in order.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from fss.data.imageio import write_jpeg, write_mask


@dataclass(frozen=True)
class Rect:
    cls: int
    y: int
    x: int
    h: int
    w: int

    @property
    def area(self) -> int:
        return self.h * self.w


@dataclass(frozen=True)
class Img:
    """An image of ``shape`` (H, W) holding ``rects`` (painted in order)."""

    shape: tuple[int, int]
    rects: tuple[Rect, ...]


def paint(shape, rects, *, band: bool, instances: bool = False) -> np.ndarray:
    """Class map (or instance map: k-th rect = k) with an optional 1-px 255 ring (VOC boundary)."""
    mask = np.zeros(shape, np.uint8)
    for k, r in enumerate(rects, start=1):
        if band:
            mask[max(r.y - 1, 0):r.y + r.h + 1, max(r.x - 1, 0):r.x + r.w + 1] = 255
        mask[r.y:r.y + r.h, r.x:r.x + r.w] = k if instances else r.cls
    return mask


def jpeg_for(shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)


def _write_ids(path: Path, ids) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


def build_voc(root: Path, annotated: dict[str, Img], extra_images: dict[str, Img], train, val) -> Path:
    """VOC2012 folder. ``annotated`` get SegmentationClass/Object PNGs; ``extra_images`` only
    a JPEG (VOC's JPEGImages also holds the SBD-only images)."""
    root = Path(root)
    for n, (image_id, img) in enumerate({**annotated, **extra_images}.items()):
        write_jpeg(root / "JPEGImages" / f"{image_id}.jpg", jpeg_for(img.shape, n))
    for image_id, img in annotated.items():
        write_mask(root / "SegmentationClass" / f"{image_id}.png", paint(img.shape, img.rects, band=True))
        write_mask(root / "SegmentationObject" / f"{image_id}.png",
                   paint(img.shape, img.rects, band=True, instances=True))
    _write_ids(root / "ImageSets" / "Segmentation" / "train.txt", train)
    _write_ids(root / "ImageSets" / "Segmentation" / "val.txt", val)
    return root


def write_sbd_mat(path: Path, struct: str, segmentation: np.ndarray, categories) -> None:
    """An SBD-style .mat: struct ``GTcls`` (Segmentation, CategoriesPresent, Boundaries) or
    ``GTinst`` (Segmentation, Categories, Boundaries)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    boundaries = np.empty((len(categories), 1), dtype=object)
    for k in range(len(categories)):
        boundaries[k, 0] = np.zeros((1, 1), np.uint8)
    fields = {"Segmentation": segmentation.astype(np.uint8), "Boundaries": boundaries}
    fields["CategoriesPresent" if struct == "GTcls" else "Categories"] = np.asarray(categories, np.uint8).reshape(-1, 1)
    scipy.io.savemat(str(path), {struct: fields})


def build_sbd(root: Path, images: dict[str, Img], train, val) -> Path:
    """SBD ``benchmark_RELEASE/dataset`` folder (no 255 band in SBD masks)."""
    root = Path(root)
    for n, (image_id, img) in enumerate(images.items()):
        write_jpeg(root / "img" / f"{image_id}.jpg", jpeg_for(img.shape, 100 + n))
        write_sbd_mat(root / "cls" / f"{image_id}.mat", "GTcls", paint(img.shape, img.rects, band=False),
                      sorted({r.cls for r in img.rects}))
        write_sbd_mat(root / "inst" / f"{image_id}.mat", "GTinst",
                      paint(img.shape, img.rects, band=False, instances=True), [r.cls for r in img.rects])
    _write_ids(root / "train.txt", train)
    _write_ids(root / "val.txt", val)
    return root


# ---------------------------------------------------------------- the PASCAL scenario

SMALL = 80  # 8x10 pixels: below the 2048-pixel rule


def _big(cls, x=2, h=50, w=50):
    return Rect(cls, 2, x, h, w)


def _small(cls, x=58):
    return Rect(cls, 5, x, 8, 10)


#: VOC-annotated images (VOC PNG masks, 255 bands)
VOC_IMAGES = {
    "2007_000032": Img((60, 70), (_big(1), _small(15))),                     # A: VOC train
    "2007_000039": Img((64, 104), (Rect(6, 2, 2, 45, 46), Rect(7, 2, 52, 40, 50))),  # B: 2070 / 2000 px
    "2007_000063": Img((60, 70), (_big(12), _small(4))),                     # C: VOC train, in SBD train
    "2007_000129": Img((60, 70), (_big(2), _small(16))),                     # V1: VOC val
    "2007_000170": Img((60, 70), (_big(8),)),                                # V2: VOC val
    "2007_000241": Img((60, 70), (_big(13),)),                               # V3: VOC val, in SBD train
    "2007_000256": Img((60, 120), (_big(17), _big(3, x=60))),                # V4: VOC val
}
VOC_TRAIN = ["2007_000032", "2007_000039", "2007_000063"]
VOC_VAL = ["2007_000129", "2007_000170", "2007_000241", "2007_000256"]

#: SBD maps; C, V3 and A are VOC-annotated too, with a different SBD map (VOC wins)
SBD_IMAGES = {
    "2008_000003": Img((60, 70), (_big(19),)),              # S2: SBD train
    "2007_000063": Img((60, 70), (_big(10),)),              # C (SBD version: class 10)
    "2007_000241": Img((60, 70), (_big(13),)),              # V3
    "2008_000002": Img((60, 70), (_big(3), _small(18))),    # S1: SBD train
    "2008_000008": Img((60, 70), (_big(9),)),               # S3: SBD val
    "2007_000032": Img((60, 70), (_big(5),)),               # A (SBD version: class 5)
}
SBD_TRAIN = ["2008_000003", "2007_000063", "2007_000241", "2008_000002"]
SBD_VAL = ["2008_000008", "2007_000032"]
SBD_ONLY = ["2008_000003", "2008_000002", "2008_000008"]


def expected_aug_mask(image_id: str) -> np.ndarray:
    """SegmentationClassAug: VOC's map (with band) where VOC annotates, else SBD's."""
    if image_id in VOC_IMAGES:
        img = VOC_IMAGES[image_id]
        return paint(img.shape, img.rects, band=True)
    img = SBD_IMAGES[image_id]
    return paint(img.shape, img.rects, band=False)


@dataclass
class PascalPaths:
    voc_root: Path
    sbd_root: Path


def pascal_scenario(tmp: Path) -> PascalPaths:
    """VOC2012 + SBD release for the hand-computed PASCAL expectations.

    pfenet train = A, B, C, S2, S1 (C dup and V3 in VOC val dropped); trainaug adds S3 (A dup).
    """
    tmp = Path(tmp)
    extra = {i: SBD_IMAGES[i] for i in SBD_ONLY}
    voc = build_voc(tmp / "VOC2012", VOC_IMAGES, extra, VOC_TRAIN, VOC_VAL)
    sbd = build_sbd(tmp / "benchmark_RELEASE" / "dataset", SBD_IMAGES, SBD_TRAIN, SBD_VAL)
    return PascalPaths(voc, sbd)


def aug_scenario(tmp: Path, list_file: str | None = None) -> Path:
    """A SegmentationClassAug folder equal to what the SBD scenario renders (all 10 ids).

    ``list_file``: also write ``sbd_train.txt`` (SBD train ids) or ``train_aug.txt``.
    """
    ids = list(VOC_IMAGES) + SBD_ONLY
    root = Path(tmp) / "SegmentationClassAug"
    root.mkdir(parents=True, exist_ok=True)
    for image_id in ids:
        write_mask(root / f"{image_id}.png", expected_aug_mask(image_id), palette=False)
    if list_file == "sbd_train.txt":
        _write_ids(root / list_file, SBD_TRAIN)
    elif list_file == "train_aug.txt":
        # the usual download's format: image and mask paths per line
        lines = [f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png" for i in ["2008_000008", "2008_000003"]]
        (root / list_file).write_text("\n".join(lines) + "\n")
    return root


# ---------------------------------------------------------------- COCO

#: the 80 COCO category ids and names (ids have gaps: class index = sorted position + 1)
COCO_CATEGORIES = [
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"),
    (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"),
    (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"),
    (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"), (54, "sandwich"),
    (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"),
    (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone"),
    (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator"), (84, "book"),
    (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
]


def rect_mask(shape, y, x, h, w) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[y:y + h, x:x + w] = 1
    return m


def uncompressed_rle(binary: np.ndarray) -> dict:
    """COCO's uncompressed RLE (column-major run lengths, starting with a 0-run)."""
    flat = np.asarray(binary, np.uint8).flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": [int(binary.shape[0]), int(binary.shape[1])], "counts": [int(c) for c in counts]}


def compressed_rle(binary: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(binary.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def polygon(y, x, h, w) -> list[list[float]]:
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def build_coco(root: Path, splits: dict[str, list[dict]]) -> Path:
    """COCO 2014 folder. ``splits[split]`` = images ``{"id", "shape", "anns": [...]}`` where an
    ann is ``{"cat": category id, "seg": polygon list or RLE dict, "crowd": 0/1}``."""
    root = Path(root)
    categories = [{"id": cid, "name": name, "supercategory": "x"} for cid, name in COCO_CATEGORIES]
    random.Random(0).shuffle(categories)  # the index must come from the sorted ids, not JSON order
    ann_id = 1000
    for split, images in splits.items():
        data = {"info": {}, "licenses": [], "images": [], "annotations": [], "categories": categories}
        for img in images:
            file_name = f"COCO_{split}_{img['id']:012d}.jpg"
            h, w = img["shape"]
            write_jpeg(root / split / file_name, jpeg_for((h, w), img["id"]))
            data["images"].append({"id": img["id"], "file_name": file_name, "height": h, "width": w})
            for ann in img["anns"]:
                ann_id += 1
                data["annotations"].append({
                    "id": ann_id, "image_id": img["id"], "category_id": ann["cat"],
                    "segmentation": ann["seg"], "iscrowd": ann.get("crowd", 0), "area": 0.0, "bbox": [0, 0, 1, 1],
                })
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


COCO_SHAPE = (60, 70)


def coco_scenario(tmp: Path) -> Path:
    """COCO scenario (class index in brackets):

    train2014
      9:  polygon bicycle [2] 50x50 at (2,2); RLE-compressed tv [63] 8x10 (80 px) at (5,58)
      25: compressed RLE toothbrush [80] rows 2..51 x cols 2..51 (2500 px); crowd person [1]
          (uncompressed RLE) rows 40..59 x cols 40..69 (600 px, 144 over the toothbrush);
          uncompressed RLE bottle [40] rows 45..49 x cols 45..49 (25 px), painted last
      30: no annotations (skipped)
      42: compressed RLE car [3] 10x10 (100 px): rendered, in no list
      49: only a crowd person [1] over the whole image: skipped under crowd=skip
      57: two-part polygon person [1]: rows 2..51 x cols 2..26 and 30..54 (2500 px)
    val2014
      1: person [1] big; 2: cup [42] big; 3: tv [63] big; 4: toothbrush [80] big; 5: elephant [21] big
    """
    shape = COCO_SHAPE
    big = rect_mask(shape, 2, 2, 50, 50)
    train = [
        {"id": 9, "shape": shape, "anns": [
            {"cat": 2, "seg": polygon(2, 2, 50, 50)},
            {"cat": 72, "seg": compressed_rle(rect_mask(shape, 5, 58, 8, 10))},
        ]},
        {"id": 25, "shape": shape, "anns": [
            {"cat": 90, "seg": compressed_rle(big)},
            {"cat": 1, "seg": uncompressed_rle(rect_mask(shape, 40, 40, 20, 30)), "crowd": 1},
            {"cat": 44, "seg": uncompressed_rle(rect_mask(shape, 45, 45, 5, 5))},
        ]},
        {"id": 30, "shape": shape, "anns": []},
        {"id": 42, "shape": shape, "anns": [{"cat": 3, "seg": compressed_rle(rect_mask(shape, 20, 20, 10, 10))}]},
        {"id": 49, "shape": shape, "anns": [
            {"cat": 1, "seg": uncompressed_rle(rect_mask(shape, 0, 0, 60, 70)), "crowd": 1}]},
        {"id": 57, "shape": shape, "anns": [{"cat": 1, "seg": polygon(2, 2, 50, 25) + polygon(2, 30, 50, 25)}]},
    ]
    val = [
        {"id": n, "shape": shape, "anns": [{"cat": cat, "seg": compressed_rle(big) if n % 2 else polygon(2, 2, 50, 50)}]}
        for n, cat in ((1, 1), (2, 47), (3, 72), (4, 90), (5, 22))
    ]
    return build_coco(Path(tmp) / "coco", {"train2014": train, "val2014": val})


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a file to a fraction of its bytes (a truncated download)."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])


def image_shape(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size[::-1]


# ---------------------------------------------------------------- running the CLI

FSS = str(Path(__import__("sys").executable).parent / "fss")


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


def run_fss(*args) -> CliResult:
    """The real console script in a subprocess (slow to start: use for a few checks)."""
    import subprocess

    res = subprocess.run([FSS, *map(str, args)], capture_output=True, text=True, timeout=300)
    return CliResult(res.returncode, res.stdout, res.stderr)


def run_main(capsys, *args) -> CliResult:
    """The console-script entry ``pipeline.cli.main`` in process, argv as a user types it."""
    import sys

    from pipeline.cli import main

    capsys.readouterr()
    argv = sys.argv
    sys.argv = ["fss", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return CliResult(code, out.out, out.err)


def assert_one_line_error(res: CliResult, *fragments: str) -> str:
    """Non-zero exit, exactly one non-empty line on stderr naming ``fragments``, no traceback."""
    assert res.code != 0, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
