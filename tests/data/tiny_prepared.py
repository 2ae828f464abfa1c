"""A tiny prepared dataset in the real on-disk format (JPEG images, VOC-palette PNG masks,
areas.tsv, fold lists, meta.json), for the episode / protocol tests.

Every image holds two rectangles of "counted" classes (area >= ``min_area``), one small
patch of a third class (present, not counted: below ``min_area``) and a 255 band around
the first rectangle. Image sizes vary (landscape and portrait) and stay under 70 px.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fss.data import classes as C
from fss.data.imageio import write_jpeg, write_mask
from fss.data.prepared import begin_prepare, class_areas, finish_prepare, write_areas, write_fold_lists

SIZES = ((40, 56), (56, 40), (48, 64), (64, 48), (44, 44))
MIN_AREA = 60


def tiny_label(i: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    label = np.zeros((h, w), np.uint8)
    first = i % 20 + 1
    second = (3 * i + 7) % 20 + 1
    if second == first:
        second = second % 20 + 1
    small = (7 * i + 11) % 20 + 1
    while small in (first, second):
        small = small % 20 + 1
    # first rectangle (>= 12x12 = 144 px) with a 255 band of width 1 around it
    t, l = int(rng.integers(2, h // 2 - 12)), int(rng.integers(2, w // 2 - 12))
    bh, bw = int(rng.integers(12, h // 2)), int(rng.integers(12, w // 2))
    label[t - 1:t + bh + 1, l - 1:l + bw + 1] = C.IGNORE_INDEX
    label[t:t + bh, l:l + bw] = first
    # second rectangle in the bottom-right quarter
    label[h // 2 + 2:h - 2, w // 2 + 2:w - 2] = second
    # small patch: present but under MIN_AREA
    label[h - 6:h - 1, 1:6] = small
    return label


def tiny_image(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colour by class (so objects are visible) plus noise."""
    base = (label.astype(np.int32) * 37) % 256
    image = np.stack([base, (base * 3) % 256, 255 - base], axis=-1)
    image = image + rng.integers(-10, 10, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def build_tiny_prepared(root: Path, n_images: int = 120, seed: int = 0, min_area: int = MIN_AREA,
                        with_instances: bool = True) -> Path:
    """Write the tiny synthetic dataset under ``root`` and return it; images 0..n/2-1 form
    the training ids, the rest the val ids. ``with_instances`` adds instance maps
    (meta ``instance_dir``)."""
    root = begin_prepare(Path(root))
    rng = np.random.default_rng(seed)
    areas = {}
    ids = []
    for i in range(n_images):
        h, w = SIZES[i % len(SIZES)]
        label = tiny_label(i, h, w, rng)
        image_id = f"img{i:04d}"
        write_jpeg(root / "images" / f"{image_id}.jpg", tiny_image(label, rng))
        write_mask(root / "masks" / f"{image_id}.png", label)
        if with_instances:  # one instance id per class region, 255 kept
            instances = np.zeros_like(label)
            for k, c in enumerate(sorted(class_areas(label)), start=1):
                instances[label == c] = k
            instances[label == C.IGNORE_INDEX] = C.IGNORE_INDEX
            write_mask(root / "instances" / f"{image_id}.png", instances)
        areas[image_id] = class_areas(label)
        ids.append(image_id)
    write_areas(root, areas)
    half = n_images // 2
    write_fold_lists(root, "synthetic", "pascal", ids[:half], ids[half:], areas, min_area=min_area)
    meta = {
        "dataset": "synthetic",
        "num_classes": 20,
        "class_names": [f"class{c}" for c in range(1, 21)],
        "image_dir": "images",
        "image_ext": ".jpg",
        "mask_dir": "masks",
        "conventions": ["pascal"],
        "options": {"min_area": min_area, "builder": "tests/data/tiny_prepared.py"},
    }
    if with_instances:
        meta["instance_dir"] = "instances"
    finish_prepare(root, meta)
    return root
