"""COCO-20i preparation from COCO 2014 images and instance annotations (protocol 1-2).

Input ``coco_root`` holds ``train2014/``, ``val2014/`` and
``annotations/instances_{train,val}2014.json``. Every image with at least one annotation
to paint gets a semantic mask (0 background, 1..80 = position of its category id in the
sorted list of category ids), rendered once with pycocotools to
``OUT/masks/<split>/<file stem>.png``. Record ids are ``<split>/<file stem>`` (e.g.
``train2014/COCO_train2014_000000000009``), so meta ``image_dir`` is the absolute
``coco_root`` and ``image_ext`` the file names' suffix (``.jpg``).

Annotations are painted in the order the JSON lists them for the image (pycocotools
``getAnnIds`` order); a later annotation overwrites an earlier one. ``crowd`` handles
``iscrowd`` annotations: ``skip`` (default; CELP/PFENet's renderer, never writes 255),
``include`` (paint the crowd region with its class, as PANet's on-the-fly masks keep it) or
``ignore`` (paint 255). Images with nothing to paint (no annotation, or only crowd ones
under ``skip``) are skipped. Train lists come from train2014, val lists from val2014, for
both fold conventions (``interleaved``, ``contiguous``). No instance masks are written.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np

from fss.data import classes as C
from fss.data import prepared as P
from fss.data.imageio import write_mask
from fss.data.pascal import Track, with_progress, image_size
from fss.errors import ConfigError, DataError

CROWD_MODES = ("skip", "include", "ignore")
SPLITS = ("train2014", "val2014")
MASK_DIR = "masks"


def load_coco(path: Path):
    """A pycocotools ``COCO`` index of an instances JSON, with one-line errors and no prints."""
    from pycocotools.coco import COCO  # optional: COCO only

    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file {path} does not exist; check the COCO directory.")
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"annotation file {path} is not valid JSON ({type(exc).__name__}); re-download it.") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise DataError(f"annotation file {path} lacks the images/annotations/categories lists of a COCO instances file.")
    api = COCO()
    api.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress to stdout
        try:
            api.createIndex()
        except (KeyError, TypeError) as exc:
            raise DataError(f"annotation file {path} has a malformed entry ({type(exc).__name__}: {exc}).") from None
    return api


def category_classes(api, path: Path) -> tuple[list[int], list[str]]:
    """Sorted category ids (class index = position + 1) and their names."""
    cat_ids = sorted(api.getCatIds())
    if len(cat_ids) != C.NUM_CLASSES["coco"]:
        raise DataError(
            f"annotation file {path} defines {len(cat_ids)} categories, COCO-20i needs {C.NUM_CLASSES['coco']}; "
            "use the COCO 2014 instances files."
        )
    return cat_ids, [str(api.cats[c].get("name", c)) for c in cat_ids]


def render_semantic_mask(api, image_info: dict, annotations: list[dict], class_of: dict[int, int],
                         crowd: str, where: Path) -> np.ndarray:
    """Paint ``annotations`` in order onto a 0-background map; later ones overwrite earlier.

    Crowd annotations: skip, include (their class) or ignore (255).
    """
    height, width = int(image_info["height"]), int(image_info["width"])
    mask = np.zeros((height, width), np.uint8)
    for ann in annotations:
        category = ann.get("category_id")
        if category not in class_of:
            raise DataError(f"{where}: annotation {ann.get('id')} has unknown category_id {category!r}.")
        if ann.get("iscrowd", 0):
            if crowd == "skip":
                continue
            value = class_of[category] if crowd == "include" else C.IGNORE_INDEX
        else:
            value = class_of[category]
        try:
            binary = api.annToMask(ann)
        except Exception as exc:  # pycocotools raises assorted types for bad segmentations
            raise DataError(
                f"{where}: annotation {ann.get('id')} has an unreadable segmentation ({type(exc).__name__}); fix the annotation."
            ) from None
        if binary.shape != mask.shape:
            raise DataError(
                f"{where}: annotation {ann.get('id')} is {binary.shape[1]}x{binary.shape[0]} but image "
                f"{image_info.get('file_name')} is {width}x{height}; fix the annotation."
            )
        mask[binary > 0] = value
    return mask


def prepare_coco(
    coco_root,
    out,
    *,
    crowd: str = "skip",
    min_area: int = P.MIN_AREA,
    filter_intersection: bool = False,
    track: Track | None = None,
) -> dict:
    """Write a prepared COCO-20i directory at ``out`` (both fold conventions); return a summary."""
    coco_root = _check_inputs(coco_root, crowd, min_area)
    out = P.begin_prepare(Path(out))
    areas: dict[str, dict[int, int]] = {}
    split_ids: dict[str, list[str]] = {}
    skipped: dict[str, int] = {}
    cat_ids: list[int] | None = None
    class_names: list[str] = []
    image_ext: str | None = None
    for split in SPLITS:
        json_path = annotation_path(coco_root, split)
        api = load_coco(json_path)
        split_cats, split_names = category_classes(api, json_path)
        if cat_ids is None:
            cat_ids, class_names = split_cats, split_names
        elif split_cats != cat_ids:
            raise DataError(f"annotation file {json_path} has other category ids than the train file; use matching COCO 2014 files.")
        split_ids[split], skipped[split], image_ext = _write_split_masks(
            api, coco_root, split, out, areas, {c: i + 1 for i, c in enumerate(cat_ids)}, crowd, image_ext, track)
        del api

    P.write_areas(out, areas)
    options = {"crowd": crowd, "min_area": int(min_area), "filter_intersection": bool(filter_intersection)}
    counts = {
        convention: P.write_fold_lists(
            out, "coco", convention, split_ids["train2014"], split_ids["val2014"], areas,
            min_area=int(min_area), filter_intersection=bool(filter_intersection),
        )
        for convention in C.CONVENTIONS["coco"]
    }
    images = {"train": len(split_ids["train2014"]), "val": len(split_ids["val2014"])}
    meta = {
        "dataset": "coco",
        "num_classes": C.NUM_CLASSES["coco"],
        "class_names": class_names,
        "category_ids": cat_ids,
        "image_dir": str(coco_root.resolve()),
        "image_ext": image_ext or ".jpg",
        "mask_dir": MASK_DIR,
        "conventions": list(C.CONVENTIONS["coco"]),
        "options": options,
        "images": images,
        "skipped_images": skipped,
        "counts": counts,
    }
    P.finish_prepare(out, meta)
    return {
        "dataset": "coco",
        "out": str(out),
        **options,
        "images": images,
        "skipped_images": skipped,
        "lists": counts,
    }


def _check_inputs(coco_root, crowd: str, min_area: int) -> Path:
    """The COCO root, after checking the options and that both splits and their annotations exist."""
    if crowd not in CROWD_MODES:
        raise ConfigError(f"unknown crowd mode {crowd!r}; choose one of: {', '.join(CROWD_MODES)}.")
    if int(min_area) < 0:
        raise ConfigError(f"min_area must be >= 0, got {min_area}.")
    coco_root = Path(coco_root)
    if not coco_root.is_dir():
        raise DataError(f"COCO directory {coco_root} does not exist; pass the folder holding train2014/ and val2014/.")
    for split in SPLITS:
        if not (coco_root / split).is_dir():
            raise DataError(f"{coco_root / split} does not exist; --coco-root must hold train2014/ and val2014/.")
        json_path = annotation_path(coco_root, split)
        if not json_path.is_file():
            raise DataError(f"annotation file {json_path} does not exist; download the COCO 2014 instances annotations.")
    return coco_root


def _write_split_masks(api, coco_root: Path, split: str, out: Path, areas: dict, class_of: dict[int, int],
                       crowd: str, image_ext: str | None, track: Track | None) -> tuple[list[str], int, str | None]:
    """Write the semantic masks of one split (``areas`` filled per record); returns the record
    ids, the count of images skipped for having no annotation, and the image extension."""
    json_path = annotation_path(coco_root, split)
    ids: list[str] = []
    skipped = 0
    for img_id in with_progress(list(api.imgs), f"coco {split} masks", track):
        info = api.imgs[img_id]
        annotations = api.imgToAnns.get(img_id, [])  # JSON order, as getAnnIds returns them
        if crowd == "skip":
            annotations = [a for a in annotations if not a.get("iscrowd", 0)]
        if not annotations:
            skipped += 1
            continue
        file_name = Path(str(info.get("file_name", "")))
        if not file_name.name:
            raise DataError(f"{json_path}: image {img_id} has no file_name; fix the annotation file.")
        if image_ext is None:
            image_ext = file_name.suffix
        elif file_name.suffix != image_ext:
            raise DataError(f"{json_path}: image {file_name} does not end in {image_ext} like the others; rename it.")
        image_path = coco_root / split / file_name
        width, height = image_size(image_path)
        if (width, height) != (info.get("width"), info.get("height")):
            raise DataError(
                f"image {image_path} is {width}x{height} but {json_path.name} says "
                f"{info.get('width')}x{info.get('height')}; the masks would not fit: replace the image."
            )
        mask = render_semantic_mask(api, info, annotations, class_of, crowd, json_path)
        stem = file_name.with_suffix("").as_posix()
        write_mask(out / MASK_DIR / split / f"{stem}.png", mask)
        record_id = f"{split}/{stem}"
        areas[record_id] = P.class_areas(mask)
        ids.append(record_id)
    return ids, skipped, image_ext


def annotation_path(coco_root: Path, split: str) -> Path:
    return Path(coco_root) / "annotations" / f"instances_{split}.json"
