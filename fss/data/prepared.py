"""The prepared-dataset format shared by PASCAL-5i, COCO-20i and the synthetic benchmark.

``fss prepare ...`` writes a directory ROOT::

    ROOT/meta.json                      written LAST (atomically): its presence marks ROOT complete
    ROOT/areas.tsv                      per image: "<id>\\t<class>:<pixels>,..." (classes != 0, 255)
    ROOT/lists/<convention>/fold<k>/train.txt, val.txt
    ROOT/<mask_dir>/<id>.png            class maps 0..C, 255 = ignore (for PASCAL/COCO: rendered masks)

A list line is ``<id> <counted> <present>``: ``counted`` are the classes of the split's
subset that pass the area rule for this image (the image is indexed under each of them;
'-' if none), ``present`` are all subset classes with any pixel in the mask (the query's
target class is drawn among them at episode time, protocol section 2). Class lists are
comma-separated 1-based ids. ``meta.json`` holds ``dataset``, ``format``, ``num_classes``,
``class_names``, ``image_dir`` (absolute, or relative to ROOT), ``image_ext``, ``mask_dir``,
``conventions`` and the ``options`` the lists were built with.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from fss.data import classes as C
from fss.data.imageio import read_image, read_mask
from fss.atomic import atomic_write_text
from fss.errors import DataError

FORMAT_VERSION = 1
META_FILE = "meta.json"
AREAS_FILE = "areas.tsv"
MIN_AREA = 2 * 32 * 32  # pfenet's small-object rule, at original resolution


@dataclass(frozen=True)
class Record:
    """One list entry: an image, the classes it is indexed under, the subset classes in it."""

    id: str
    counted: tuple[int, ...]
    present: tuple[int, ...]


# ---------------------------------------------------------------- areas and list building


def class_areas(mask: np.ndarray) -> dict[int, int]:
    """Pixel count of every class in a mask, 0 (background) and 255 (ignore) excluded."""
    values, counts = np.unique(mask, return_counts=True)
    return {int(v): int(n) for v, n in zip(values, counts) if v not in (0, C.IGNORE_INDEX)}


def build_list(
    ids: Iterable[str],
    areas: Mapping[str, Mapping[int, int]],
    subset: Sequence[int],
    *,
    min_area: int = MIN_AREA,
    exclude_classes: Sequence[int] = (),
) -> list[Record]:
    """Apply the pfenet list rule to ``ids`` (in order, duplicates already removed).

    An image enters the list when at least one class of ``subset`` covers ``min_area``
    pixels; it is indexed under every such class. ``exclude_classes`` (bam's
    ``filter_intersection``: the novel classes, for a training list) drops every image
    containing any pixel of them. ``min_area=0`` disables the rule (panet).
    """
    subset_set = set(subset)
    excluded = set(exclude_classes)
    out = []
    for image_id in ids:
        a = areas[image_id]
        if excluded and any(c in excluded for c in a):
            continue
        present = tuple(sorted(c for c in a if c in subset_set))
        counted = tuple(c for c in present if a[c] >= min_area)
        if counted:
            out.append(Record(image_id, counted, present))
    return out


def format_record(r: Record) -> str:
    def j(cs):
        return ",".join(map(str, cs)) if cs else "-"

    return f"{r.id} {j(r.counted)} {j(r.present)}"


def parse_record(line: str, path: Path, lineno: int) -> Record:
    parts = line.split()
    try:
        if len(parts) != 3:
            raise ValueError
        def p(s):
            return () if s == "-" else tuple(int(c) for c in s.split(","))
        return Record(parts[0], p(parts[1]), p(parts[2]))
    except ValueError:
        raise DataError(
            f"{path}:{lineno} is not a list line '<id> <classes> <classes>'; re-run 'fss prepare'."
        ) from None


def list_path(root: Path, convention: str, fold: int, split: str) -> Path:
    return Path(root) / "lists" / convention / f"fold{fold}" / f"{split}.txt"


# ---------------------------------------------------------------- writing a prepared dir


def read_id_file(path: Path) -> list[str]:
    """Image ids from a VOC/SBD style text file (first token per non-empty line)."""
    if not Path(path).is_file():
        raise DataError(f"list file {path} does not exist; check the dataset directory.")
    return [line.split()[0] for line in Path(path).read_text().splitlines() if line.strip()]


def unique_keep_first(ids: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for i in ids:
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


def write_areas(root: Path, areas: Mapping[str, Mapping[int, int]]) -> None:
    lines = [
        f"{i}\t" + ",".join(f"{c}:{n}" for c, n in sorted(a.items())) for i, a in areas.items()
    ]
    _atomic_write_text(Path(root) / AREAS_FILE, "\n".join(lines) + "\n")


def read_areas(root: Path) -> dict[str, dict[int, int]]:
    path = Path(root) / AREAS_FILE
    if not path.is_file():
        raise DataError(f"{path} does not exist; re-run 'fss prepare'.")
    out: dict[str, dict[int, int]] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        image_id, _, rest = line.partition("\t")
        out[image_id] = {int(c): int(n) for c, n in (kv.split(":") for kv in rest.split(",") if kv)}
    return out


def write_fold_lists(
    root: Path,
    dataset: str,
    convention: str,
    train_ids: Sequence[str],
    val_ids: Sequence[str],
    areas: Mapping[str, Mapping[int, int]],
    *,
    min_area: int = MIN_AREA,
    filter_intersection: bool = False,
    holdout_ids: Sequence[str] = (),
) -> dict[str, dict[str, int]]:
    """Write ``lists/<convention>/fold<k>/{train,val}.txt`` for the four folds, and
    ``holdout.txt`` (novel classes, like val) when ``holdout_ids`` are given: validation
    images that no test list holds.

    Returns the number of images per fold and split. A fold whose list comes out empty is
    an error (the dataset cannot serve that fold).
    """
    counts: dict[str, dict[str, int]] = {}
    for fold in range(C.NUM_FOLDS):
        novel = C.novel_classes(dataset, fold, convention)
        base = C.base_classes(dataset, fold, convention)
        lists = {
            "train": build_list(train_ids, areas, base, min_area=min_area,
                                exclude_classes=novel if filter_intersection else ()),
            "val": build_list(val_ids, areas, novel, min_area=min_area),
        }
        if holdout_ids:
            lists["holdout"] = build_list(holdout_ids, areas, novel, min_area=min_area)
        counts[f"fold{fold}"] = {}
        for split, records in lists.items():
            if not records:
                raise DataError(
                    f"fold {fold} ({convention}) has no eligible {split} image "
                    f"(min_area={min_area}); check the masks or lower --min-area."
                )
            path = list_path(root, convention, fold, split)
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(path, "".join(format_record(r) + "\n" for r in records))
            counts[f"fold{fold}"][split] = len(records)
    return counts


def begin_prepare(out: Path) -> Path:
    """Mark ``out`` incomplete before (re)writing it: remove a previous meta.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = out / META_FILE
    if meta.exists():
        meta.unlink()
    return out


def finish_prepare(out: Path, meta: dict) -> None:
    """Write meta.json last and atomically: from now on ``out`` counts as complete."""
    meta = {"format": FORMAT_VERSION, **meta}
    _atomic_write_text(Path(out) / META_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text, fsync=False)  # meta.json, written last, marks completion


def remove_tree(path: Path) -> None:
    if Path(path).exists():
        shutil.rmtree(path)


# ---------------------------------------------------------------- reading a prepared dir


def read_meta(root: str | os.PathLike) -> dict:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"prepared dataset directory {root} does not exist; run 'fss prepare' first.")
    path = root / META_FILE
    if not path.is_file():
        raise DataError(
            f"{root} is not a complete prepared dataset (no {META_FILE}); run 'fss prepare' again."
        )
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path} is not valid JSON; run 'fss prepare' again.") from None
    if meta.get("format") != FORMAT_VERSION:
        raise DataError(
            f"{path} has format {meta.get('format')!r}, this version reads {FORMAT_VERSION}; run 'fss prepare' again."
        )
    return meta


class PreparedDataset:
    """One fold and split of a prepared dataset: its records, class index and file access.

    ``split`` is ``train`` (base classes), ``val`` (novel classes, the test images) or
    ``holdout`` (novel classes, validation images outside every test list; synthetic only). ``class_index[c]``
    lists the positions in ``records`` of the images indexed under class ``c`` (the
    support pool of ``c``).
    """

    def __init__(self, root: str | os.PathLike, fold: int, split: str, convention: str | None = None):
        self.root = Path(root)
        self.meta = read_meta(self.root)
        self.dataset = self.meta["dataset"]
        self.fold = C.check_fold(fold)
        self.convention = C.check_convention(self.dataset, convention)
        self.split = split
        self.classes = C.split_classes(self.dataset, fold, split, self.convention)
        self.base_classes = C.base_classes(self.dataset, fold, self.convention)
        self.novel_classes = C.novel_classes(self.dataset, fold, self.convention)
        path = list_path(self.root, self.convention, fold, split)
        if not path.is_file() and split == "holdout":
            raise DataError(f"list {path} does not exist: {self.root} has no held-out validation images; "
                            "prepare it with --holdout-images N or set validation.split: val.")
        if not path.is_file():
            raise DataError(f"list {path} does not exist; run 'fss prepare' again.")
        lines = path.read_text().splitlines()
        self.records = [parse_record(l, path, n + 1) for n, l in enumerate(lines) if l.strip()]
        if not self.records:
            raise DataError(f"list {path} is empty: fold {fold} has no eligible {split} image.")
        self.class_index: dict[int, list[int]] = {c: [] for c in self.classes}
        for i, r in enumerate(self.records):
            for c in r.counted:
                if c not in self.class_index:
                    raise DataError(
                        f"{path} indexes {r.id} under class {c}, which is not a {split} class of fold {fold}; "
                        "run 'fss prepare' again."
                    )
                self.class_index[c].append(i)
        image_dir = Path(self.meta["image_dir"])
        self.image_dir = image_dir if image_dir.is_absolute() else self.root / image_dir
        self.mask_dir = self.root / self.meta["mask_dir"]
        self.image_ext = self.meta.get("image_ext", ".jpg")
        self.num_classes = int(self.meta["num_classes"])

    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, i: int) -> Path:
        return self.image_dir / (self.records[i].id + self.image_ext)

    def mask_path(self, i: int) -> Path:
        return self.mask_dir / (self.records[i].id + ".png")

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``uint8 [H, W, 3]`` and class map ``uint8 [H, W]`` of record ``i``, checked."""
        image = read_image(self.image_path(i))
        mask = read_mask(self.mask_path(i))
        if image.shape[:2] != mask.shape:
            raise DataError(
                f"mask {self.mask_path(i)} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                f"{image.shape[1]}x{image.shape[0]}; re-render the mask."
            )
        bad = (mask > self.num_classes) & (mask != C.IGNORE_INDEX)
        if bad.any():
            raise DataError(
                f"mask {self.mask_path(i)} holds class id {int(mask[bad].max())}, outside 0..{self.num_classes} and 255; "
                "fix the mask or re-run 'fss prepare'."
            )
        return image, mask

    def class_counts(self) -> dict[int, int]:
        """Number of images indexed under each class of the split."""
        return {c: len(v) for c, v in self.class_index.items()}
