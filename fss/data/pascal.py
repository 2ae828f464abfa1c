"""PASCAL-5i preparation from VOC2012 plus SBD or a ready SegmentationClassAug (protocol 1-2).

Inputs
------
``voc_root``: VOC2012 (``JPEGImages/``, ``SegmentationClass/``, ``ImageSets/Segmentation/
{train,val}.txt``; ``SegmentationObject/`` is used when present). Images are referenced in
place (meta ``image_dir`` = absolute ``JPEGImages`` path). Exactly one mask source:

- ``sbd_root`` (SBD release ``benchmark_RELEASE/dataset``: ``cls/<id>.mat`` with struct
  ``GTcls.Segmentation``, optional ``inst/<id>.mat`` with ``GTinst.Segmentation``,
  ``train.txt``, ``val.txt``). The aug masks are rendered to ``OUT/SegmentationClassAug``:
  VOC's own ``SegmentationClass`` PNG wherever VOC annotates the image, else the SBD map.
- ``aug_root``: a ready ``SegmentationClassAug`` folder (``<id>.png``, palette or grey),
  referenced in place (meta ``mask_dir`` is its absolute path, nothing is copied). SBD's
  split files are not part of such a folder, so the training candidates come from:
  ``train_list="pfenet"`` needs ``aug_root/sbd_train.txt`` (SBD's ``train.txt`` under that
  name); ``train_list="trainaug"`` reads ``aug_root/train_aug.txt`` when present (the list
  shipped with the usual SegmentationClassAug download), else takes every ``<id>.png`` in
  ``aug_root`` (sorted). List lines may be bare ids or paths (``/JPEGImages/<id>.jpg ...``);
  the first token's file stem is the id.

Lists: pfenet train = VOC train + SBD train, minus VOC val, duplicates removed keeping the
first; trainaug = VOC train + SBD train + SBD val, minus VOC val; val = VOC val. Per-fold
lists follow the 2*32*32 rule (``min_area``) via :func:`fss.data.prepared.write_fold_lists`.

Instance masks (for weak annotations: boxes, scribbles) are written to
``OUT/SegmentationObjectAug/<id>.png`` from the same source as the class mask (VOC
``SegmentationObject`` for VOC-annotated images, SBD ``inst/<id>.mat`` for the others) and
meta ``instance_dir`` is set; it is absent when no instance mask was found.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from fss.data import classes as C
from fss.data import prepared as P
from fss.data.imageio import read_mask, write_mask
from fss.errors import ConfigError, DataError

TRAIN_LISTS = ("pfenet", "trainaug")
MASK_DIR = "SegmentationClassAug"
INSTANCE_DIR = "SegmentationObjectAug"
AUG_SBD_TRAIN_FILE = "sbd_train.txt"
AUG_TRAIN_AUG_FILE = "train_aug.txt"

Track = Callable[[Iterable, str, Optional[int]], Iterable]


# ---------------------------------------------------------------- shared raw-file checks


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image file, checked to decode to the end.

    JPEGs are decoded at 1/8 scale (DCT scaling), which reads every byte of the file and so
    catches truncation at a fraction of the cost of a full decode.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image {path} does not exist; check the dataset directory.")
    try:
        with Image.open(path) as img:
            size = img.size
            img.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(
            f"image {path} is unreadable or truncated ({type(exc).__name__}); replace the file."
        ) from None
    return size


def check_mask(mask: np.ndarray, path: Path, num_classes: int, image_path: Path,
               size: tuple[int, int]) -> None:
    """One-line errors for a class map that does not fit its image or holds unknown ids."""
    width, height = size
    if mask.ndim != 2 or mask.shape != (height, width):
        shape = "x".join(map(str, mask.shape[::-1]))
        raise DataError(
            f"mask {path} is {shape} but its image {image_path} is {width}x{height}; fix or re-render the mask."
        )
    values = np.unique(mask)
    bad = values[(values > num_classes) & (values != C.IGNORE_INDEX)]
    if bad.size:
        raise DataError(
            f"mask {path} holds class id {int(bad[0])}, outside 0..{num_classes} and {C.IGNORE_INDEX}; fix the mask."
        )


def with_progress(items: list, description: str, track: Track | None) -> Iterable:
    return items if track is None else track(items, description, len(items))


def read_ids(path: Path) -> list[str]:
    """Ids from a split file; a token that is a path (``/JPEGImages/x.jpg``) gives its stem."""
    return [Path(token).stem if ("/" in token or "." in token) else token for token in P.read_id_file(path)]


# ---------------------------------------------------------------- SBD .mat files


def read_sbd_mat(path: Path, struct: str) -> np.ndarray:
    """The ``Segmentation`` field of the MATLAB struct ``struct`` (``GTcls``/``GTinst``)."""
    import scipy.io  # heavy: scipy, for SBD .mat files only

    try:
        mat = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)
    except Exception as exc:  # scipy raises many types for corrupt files
        raise DataError(f"SBD file {path} is unreadable ({type(exc).__name__}); replace the file.") from None
    obj = mat.get(struct)
    segmentation = getattr(obj, "Segmentation", None) if obj is not None else None
    if segmentation is None:
        raise DataError(f"SBD file {path} has no struct {struct} with a field Segmentation; is it an SBD {struct} file?")
    arr = np.asarray(segmentation)
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise DataError(f"SBD file {path}: {struct}.Segmentation is not a 2-D class map; replace the file.")
    if arr.size and (arr.min() < 0 or arr.max() > 255 or not np.all(arr == np.round(arr))):
        raise DataError(f"SBD file {path}: {struct}.Segmentation holds values outside 0..255; replace the file.")
    return arr.astype(np.uint8)


# ---------------------------------------------------------------- mask sources


class _Voc:
    def __init__(self, root: Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"VOC2012 directory {self.root} does not exist; pass the VOC2012 folder as --voc-root.")
        self.images = self.root / "JPEGImages"
        self.classes = self.root / "SegmentationClass"
        self.objects = self.root / "SegmentationObject"
        for d in (self.images, self.classes):
            if not d.is_dir():
                raise DataError(f"{d} does not exist; --voc-root must be the VOC2012 folder (JPEGImages, SegmentationClass).")
        split_dir = self.root / "ImageSets" / "Segmentation"
        self.train = read_ids(split_dir / "train.txt")
        self.val = read_ids(split_dir / "val.txt")

    def image(self, image_id: str) -> Path:
        return self.images / f"{image_id}.jpg"

    def class_png(self, image_id: str) -> Path:
        return self.classes / f"{image_id}.png"

    def object_png(self, image_id: str) -> Path:
        return self.objects / f"{image_id}.png"


class _SbdSource:
    """Aug masks rendered from VOC SegmentationClass (precedence) and SBD cls/*.mat."""

    name = "sbd"

    def __init__(self, root: Path, voc: _Voc):
        self.root = Path(root)
        self.voc = voc
        if not self.root.is_dir():
            raise DataError(f"SBD directory {self.root} does not exist; pass benchmark_RELEASE/dataset as --sbd-root.")
        self.cls = self.root / "cls"
        self.inst = self.root / "inst"
        if not self.cls.is_dir():
            raise DataError(f"{self.cls} does not exist; --sbd-root must be SBD's dataset folder (cls/, train.txt, val.txt).")
        self.train = read_ids(self.root / "train.txt")
        self.val = read_ids(self.root / "val.txt")
        self.mask_dir = MASK_DIR

    def train_candidates(self, train_list: str) -> list[str]:
        extra = self.train if train_list == "pfenet" else self.train + self.val
        return self.voc.train + extra

    def class_mask(self, image_id: str) -> tuple[np.ndarray, Path, str]:
        png = self.voc.class_png(image_id)
        if png.is_file():
            return read_mask(png), png, "voc"
        mat = self.cls / f"{image_id}.mat"
        if mat.is_file():
            return read_sbd_mat(mat, "GTcls"), mat, "sbd"
        raise DataError(f"no mask for image {image_id}: neither {png} nor {mat} exists; check the VOC and SBD folders.")

    def instance_mask(self, image_id: str, origin: str) -> tuple[np.ndarray, Path] | None:
        if origin == "voc":
            png = self.voc.object_png(image_id)
            return (read_mask(png), png) if png.is_file() else None
        mat = self.inst / f"{image_id}.mat"
        return (read_sbd_mat(mat, "GTinst"), mat) if mat.is_file() else None


class _AugSource:
    """A ready SegmentationClassAug folder, referenced in place."""

    name = "aug"

    def __init__(self, root: Path, voc: _Voc):
        self.root = Path(root).resolve()
        self.voc = voc
        if not self.root.is_dir():
            raise DataError(f"SegmentationClassAug directory {self.root} does not exist; check --aug-root.")
        self.mask_dir = str(self.root)

    def train_candidates(self, train_list: str) -> list[str]:
        if train_list == "pfenet":
            path = self.root / AUG_SBD_TRAIN_FILE
            if not path.is_file():
                raise DataError(
                    f"the pfenet train list needs SBD's train ids: copy benchmark_RELEASE/dataset/train.txt to {path}, "
                    "or pass --sbd-root, or use --train-list trainaug."
                )
            return self.voc.train + read_ids(path)
        path = self.root / AUG_TRAIN_AUG_FILE
        if path.is_file():
            return self.voc.train + read_ids(path)
        return self.voc.train + sorted(p.stem for p in self.root.glob("*.png"))

    def class_mask(self, image_id: str) -> tuple[np.ndarray, Path, str]:
        png = self.root / f"{image_id}.png"
        if not png.is_file():
            raise DataError(f"mask {png} does not exist; the SegmentationClassAug folder lacks image {image_id}.")
        return read_mask(png), png, "aug"

    def instance_mask(self, image_id: str, origin: str) -> tuple[np.ndarray, Path] | None:
        # VOC instance maps match the aug class map wherever VOC annotates the image.
        png = self.voc.object_png(image_id)
        if png.is_file() and self.voc.class_png(image_id).is_file():
            return read_mask(png), png
        return None


# ---------------------------------------------------------------- the preparation


def train_ids_for(candidates: list[str], voc_val: list[str]) -> list[str]:
    """pfenet/trainaug rule: candidates in order, minus VOC val, first occurrence kept."""
    val = set(voc_val)
    return [i for i in P.unique_keep_first(candidates) if i not in val]


def prepare_pascal(
    voc_root,
    out,
    *,
    sbd_root=None,
    aug_root=None,
    train_list: str = "pfenet",
    min_area: int = P.MIN_AREA,
    filter_intersection: bool = False,
    track: Track | None = None,
) -> dict:
    """Write a prepared PASCAL-5i directory at ``out`` (protocol sections 1-2); return a summary.

    ``train_list``: ``pfenet`` (VOC train + SBD train - VOC val) or ``trainaug`` (VOC train +
    SBD train + SBD val - VOC val). ``min_area``: pfenet's small-object rule (0 disables,
    panet). ``filter_intersection``: bam, drop training images containing a novel class.
    """
    if train_list not in TRAIN_LISTS:
        raise ConfigError(f"unknown train list {train_list!r}; choose one of: {', '.join(TRAIN_LISTS)}.")
    if int(min_area) < 0:
        raise ConfigError(f"min_area must be >= 0, got {min_area}.")
    if (sbd_root is None) == (aug_root is None):
        raise DataError(
            "give exactly one mask source: --sbd-root (SBD release) or --aug-root (a ready SegmentationClassAug folder)."
        )
    voc = _Voc(Path(voc_root))
    source = _SbdSource(Path(sbd_root), voc) if sbd_root is not None else _AugSource(Path(aug_root), voc)
    train_ids = train_ids_for(source.train_candidates(train_list), voc.val)
    val_ids = P.unique_keep_first(voc.val)
    all_ids = P.unique_keep_first(train_ids + val_ids)

    out = P.begin_prepare(Path(out))
    areas: dict[str, dict[int, int]] = {}
    rendered = instances = 0
    num_classes = C.NUM_CLASSES["pascal"]
    for image_id in with_progress(all_ids, "pascal masks", track):
        image_path = voc.image(image_id)
        size = image_size(image_path)
        mask, mask_path, origin = source.class_mask(image_id)
        check_mask(mask, mask_path, num_classes, image_path, size)
        if source.name == "sbd":
            write_mask(out / MASK_DIR / f"{image_id}.png", mask)
            rendered += 1
        instance = source.instance_mask(image_id, origin)
        if instance is not None:
            inst_mask, inst_path = instance
            check_mask(inst_mask, inst_path, C.IGNORE_INDEX - 1, image_path, size)
            write_mask(out / INSTANCE_DIR / f"{image_id}.png", inst_mask)
            instances += 1
        areas[image_id] = P.class_areas(mask)
    P.write_areas(out, areas)
    counts = P.write_fold_lists(
        out, "pascal", "pascal", train_ids, val_ids, areas,
        min_area=int(min_area), filter_intersection=bool(filter_intersection),
    )
    options = {
        "train_list": train_list,
        "min_area": int(min_area),
        "filter_intersection": bool(filter_intersection),
        "source": source.name,
    }
    images = {"train": len(train_ids), "val": len(val_ids)}
    meta = {
        "dataset": "pascal",
        "num_classes": num_classes,
        "class_names": list(C.VOC_CLASSES),
        "image_dir": str(voc.images.resolve()),
        "image_ext": ".jpg",
        "mask_dir": source.mask_dir,
        "conventions": ["pascal"],
        "options": options,
        "images": images,
        "counts": {"pascal": counts},
        "sources": {"voc_root": str(voc.root.resolve()), f"{source.name}_root": str(source.root.resolve())},
    }
    if instances:
        meta["instance_dir"] = INSTANCE_DIR
    P.finish_prepare(out, meta)
    return {
        "dataset": "pascal",
        "out": str(out),
        **options,
        "images": images,
        "masks_rendered": rendered,
        "instance_masks": instances,
        "lists": {"pascal": counts},
    }
