"""The embedded synthetic benchmark: 20 classes in 4 folds, written in the PASCAL VOC layout.

``prepare_synthetic(out)`` generates one pool of images and writes::

    OUT/JPEGImages/<id>.jpg
    OUT/SegmentationClass/<id>.png      VOC palette PNG: 0 background, 1..20, 255 boundary band
    OUT/SegmentationObject/<id>.png     instance ids 1..n in paint order, same 255 band
    OUT/ImageSets/Segmentation/train.txt, val.txt

then builds the per-fold lists exactly as for PASCAL-5i (``fss.data.prepared``: area index,
pfenet list rule with the "pascal" convention, meta.json last), so ``PreparedDataset``
reads it like PASCAL.

Classes. Class ``c = 5k + j + 1`` (fold ``k`` = 0..3, position ``j`` = 0..4) combines three
attributes, each value of which appears in every fold, as novel and as base:

- shape ``SHAPES[j]`` (disc, square, triangle, ring, cross),
- hue family ``HUES[h]`` with ``h = (j + 2k) % 5`` (red, yellow, green, blue, purple),
- texture ``TEXTURES[(k + h) % 4]`` (plain, striped, checkered, dotted).

Every (shape, hue) and every (texture, hue) pair belongs to one class only, so a novel class
is a new combination of attributes that the base classes teach, and its colour and texture
together tell it from every other class (four pairs of classes share shape and texture and
differ in hue) (generator version 3; in version 2 some
classes shared texture and hue, and a fifth of the objects took a random hue, which left
every head but PANet support-blind: docs/results.md, "Do the methods use their support?").
The hue jitters and the pattern's second colour varies. Backgrounds are gradients with
low-frequency colour noise and distractors (thin bars, elongated speckled ellipses) whose
shapes and textures are none of the classes' but whose colours may be any hue.

Images. Each image has 1..3 class objects (classes drawn uniformly, repeats allowed) of
radius 0.2..0.38 times the nominal size (an episode's target covers about an eighth of the
image, as a typical PASCAL object does), with random position (may leave the frame),
rotation, slight stretch, and occlusion by later objects (a placement that would hide more
than 60% of an earlier object is redrawn), over 1..4 distractors.
Image sides vary in ``[size - size//6, size + size//6]`` so the resize-pad evaluation path is
exercised. The class and instance maps get a 255 band on every instance boundary, like VOC:
each pixel whose 8-neighbourhood holds another instance id (or background) is 255.

Novel-class objects appear in training images too (as background for that fold): the
train/val split is by image (first ``train_images`` indices train, the next ``val_images``
val, then ``holdout_images`` holdout) and the fold lists apply the area rule only. The
holdout lists (novel classes, like val) give validation episodes (``validation.split:
holdout``) whose images no test episode uses; PASCAL's and COCO's reference code validates
on the test list itself.

Pretraining pool. ``object_pool_image(seed, index, size)`` draws images the same way but
with objects of ``POOL_SHAPES`` (star, hexagon, crescent, L, half-disc: no class's shape, so
no pool object is of any benchmark class) and a class-agnostic mask (1 any object, 0
background, 255 band). It plays the role ImageNet plays for PASCAL: a separate labelled set
that the backbone is pretrained on (``fss pretrain --source objects``); its images come from
their own random stream, never the benchmark's. With ``classes=True`` each pool object is
labelled with its pool class instead (``pool_class_names``: a pool shape with the texture and
hue family of the benchmark class of the same id), the analogue of ImageNet's categories
(``fss pretrain --source pool_classes``): like ImageNet for PASCAL's classes, the pool teaches
every colour-texture identity, novel ones included, on objects of no benchmark class.

Small-object rule. PASCAL's 2048 pixels is for ~500x375 images; the default scales it with
the nominal image area: ``min_area = round(2048 * size * size / (500 * 375))`` (101 px at
size 96, 45 px at size 64). It is recorded in meta.json ``options``.

Determinism. Image ``i`` is drawn from ``numpy.random.Generator(PCG64(SeedSequence((
GENERATOR_VERSION, seed, i))))``, so it does not depend on generation order or on the
number of images; JPEG (quality ``JPEG_QUALITY``) and PNG encoding are deterministic, so the
same seed writes byte-identical files.
"""

from __future__ import annotations

import colorsys
import math
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from scipy import ndimage

from fss.data import classes as C
from fss.data.imageio import write_jpeg, write_mask
from fss.data.prepared import (
    _atomic_write_text,
    begin_prepare,
    class_areas,
    finish_prepare,
    write_areas,
    write_fold_lists,
)
from fss.errors import ConfigError

#: bump when the drawing changes: it seeds the generator and is recorded in meta.json
GENERATOR_VERSION = 3  # 2: fewer, larger objects (1..3, radius 0.2..0.38), 1..4 distractors;
#                        3: a unique (texture, hue) pair per class, no random-hue objects

DEFAULT_SIZE = 96
DEFAULT_TRAIN_IMAGES = 1200
DEFAULT_VAL_IMAGES = 400
DEFAULT_HOLDOUT_IMAGES = 0
MIN_SIZE = 32
JPEG_QUALITY = 90

SHAPES = ("disc", "square", "triangle", "ring", "cross")
#: shapes of the pretraining pool's objects, none of them a class's shape
POOL_SHAPES = ("star", "hexagon", "crescent", "ell", "halfdisc")
#: entropy tag of the pretraining pool's random stream (the benchmark's images have none)
POOL_STREAM = 1
TEXTURES = ("plain", "striped", "checkered", "dotted")
#: hue family name -> centre hue in degrees
HUES = (("red", 0.0), ("yellow", 55.0), ("green", 130.0), ("blue", 215.0), ("purple", 285.0))

HUE_JITTER_DEG = 12.0
OBJECTS_PER_IMAGE = (1, 3)  # inclusive range
DISTRACTORS_PER_IMAGE = (1, 4)
OBJECT_RADIUS = (0.2, 0.38)  # times the nominal size
MAX_HIDDEN_FRACTION = 0.6
PLACEMENT_TRIES = 6
IMAGE_DIR = "JPEGImages"
MASK_DIR = "SegmentationClass"
INSTANCE_DIR = "SegmentationObject"
ID_LIST_DIR = Path("ImageSets") / "Segmentation"

Track = Callable[[Iterable, str, int], Iterable]


def class_attributes(class_id: int) -> tuple[str, str, str]:
    """(shape, texture, hue family) of a 1-based class id."""
    if not 1 <= class_id <= 20:
        raise ConfigError(f"synthetic class id {class_id} is outside 1..20.")
    return _attributes(class_id, SHAPES)


def _attributes(class_id: int, shapes: tuple[str, ...]) -> tuple[str, str, str]:
    fold, j = divmod(class_id - 1, 5)
    hue = (j + 2 * fold) % 5
    return shapes[j], TEXTURES[(fold + hue) % 4], HUES[hue][0]


def pool_class_names() -> tuple[str, ...]:
    """Names of the pretraining pool's 20 classes (``hue-texture-shape``, shapes of ``POOL_SHAPES``).
    Pool class ``c`` has the texture and hue family of benchmark class ``c``, never its shape."""
    return tuple("-".join(reversed(_attributes(c, POOL_SHAPES))) for c in range(1, 21))


def _class_hue(class_id: int) -> float:
    fold, j = divmod(class_id - 1, 5)
    return HUES[(j + 2 * fold) % 5][1]


CLASS_NAMES = tuple("-".join(reversed(class_attributes(c))) for c in range(1, 21))


def default_min_area(size: int) -> int:
    """PASCAL's 2048-pixel rule (for ~500x375 images) scaled to a ``size`` x ``size`` image."""
    return int(round(2048 * size * size / (500 * 375)))


# ---------------------------------------------------------------- drawing


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, s, v), dtype=np.float32) * 255.0


def _local_coords(h: int, w: int, cx: float, cy: float, reach: float, angle: float):
    """Box slices around (cx, cy) within ``reach`` pixels and rotated pixel coords (u, v)."""
    y0, y1 = max(0, int(math.floor(cy - reach))), min(h, int(math.ceil(cy + reach)) + 1)
    x0, x1 = max(0, int(math.floor(cx - reach))), min(w, int(math.ceil(cx + reach)) + 1)
    if y0 >= y1 or x0 >= x1:
        return None
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
    cos, sin = math.cos(angle), math.sin(angle)
    u = cos * dx + sin * dy
    v = -sin * dx + cos * dy
    return (slice(y0, y1), slice(x0, x1)), u, v


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shape inside the unit circle in normalised local coordinates."""
    if shape == "disc":
        return u * u + v * v <= 1.0
    if shape == "ring":
        r2 = u * u + v * v
        inner = rng.uniform(0.5, 0.62)
        return (r2 <= 1.0) & (r2 >= inner * inner)
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "triangle":  # equilateral, circumradius 1.15: three half-planes at inradius
        inside = np.ones(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
        for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3):
            inside &= u * math.cos(a) + v * math.sin(a) <= 0.575
        return inside
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    return _pool_shape_mask(shape, u, v)


def _pool_shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A pretraining-pool shape (``POOL_SHAPES``) inside the unit circle."""
    if shape == "star":  # five points: radius 1 at the tips, 0.42 between them
        tip = np.abs(np.mod(np.arctan2(v, u) * (5 / (2 * math.pi)), 1.0) - 0.5) * 2
        return np.sqrt(u * u + v * v) <= 0.42 + 0.58 * tip
    if shape == "hexagon":
        inside = np.ones(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
        for a in (0.0, math.pi / 3, 2 * math.pi / 3):
            inside &= np.abs(u * math.cos(a) + v * math.sin(a)) <= 0.85
        return inside
    if shape == "crescent":
        return (u * u + v * v <= 1.0) & ((u - 0.5) ** 2 + v * v > 0.8 ** 2)
    if shape == "ell":
        return (((u >= -0.9) & (u <= -0.3) & (np.abs(v) <= 0.9))
                | ((u >= -0.9) & (u <= 0.9) & (v >= 0.3) & (v <= 0.9)))
    if shape == "halfdisc":
        return (u * u + (v + 0.35) ** 2 <= 1.0) & (v >= -0.35)
    raise AssertionError(shape)


def _texture_pattern(texture: str, pu: np.ndarray, pv: np.ndarray, radius: float,
                     rng: np.random.Generator) -> np.ndarray | None:
    """Where the texture's second colour goes (pixel-scale local coordinates), or None."""
    if texture == "plain":
        return None
    period = max(3.5, radius * rng.uniform(0.32, 0.45))
    ph_u, ph_v = rng.uniform(0, 1, size=2)
    if texture == "striped":
        return np.mod(pu / period + ph_u, 1.0) < 0.5
    if texture == "checkered":
        return ((np.floor(pu / period + ph_u) + np.floor(pv / period + ph_v)) % 2) == 1
    if texture == "dotted":
        period *= 1.25
        fu = np.mod(pu / period + ph_u, 1.0) - 0.5
        fv = np.mod(pv / period + ph_v, 1.0) - 0.5
        return fu * fu + fv * fv <= 0.3 * 0.3
    raise AssertionError(texture)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Linear gradient between two muted colours plus low-frequency colour noise."""
    c0 = _hsv(rng.uniform(0, 360), rng.uniform(0.05, 0.6), rng.uniform(0.25, 0.9))
    c1 = _hsv(rng.uniform(0, 360), rng.uniform(0.05, 0.6), rng.uniform(0.25, 0.9))
    angle = rng.uniform(0, 2 * math.pi)
    yy = np.arange(h, dtype=np.float32)[:, None] / h
    xx = np.arange(w, dtype=np.float32)[None, :] / w
    t = (math.cos(angle) * xx + math.sin(angle) * yy)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    image = c0 * (1 - t[..., None]) + c1 * t[..., None]
    grid = rng.normal(0.0, 22.0, size=(5, 5, 3)).astype(np.float32)
    rows = np.tensordot(_interp_matrix(h, 5), grid, axes=(1, 0))  # [h, 5, 3]
    image += np.matmul(_interp_matrix(w, 5), rows)  # [h, w, 3]
    return image


def _interp_matrix(n: int, k: int) -> np.ndarray:
    """``[n, k]`` weights of linear interpolation from ``k`` evenly spread knots to ``n`` pixels."""
    pos = np.clip((np.arange(n, dtype=np.float32) + 0.5) * (k / n) - 0.5, 0, k - 1)
    return np.maximum(0.0, 1.0 - np.abs(pos[:, None] - np.arange(k, dtype=np.float32)[None, :]))


def _draw_distractors(image: np.ndarray, rng: np.random.Generator, size: int) -> None:
    """Thin bars and elongated speckled ellipses: shapes and textures of no class."""
    h, w = image.shape[:2]
    for _ in range(rng.integers(DISTRACTORS_PER_IMAGE[0], DISTRACTORS_PER_IMAGE[1] + 1)):
        colour = _hsv(rng.uniform(0, 360), rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0))
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        angle = rng.uniform(0, math.pi)
        if rng.random() < 0.5:  # bar: 1.5-3 px wide, long
            half_len = rng.uniform(0.15, 0.45) * size
            half_wid = rng.uniform(0.75, 1.5)
            box = _local_coords(h, w, cx, cy, half_len + 2, angle)
            if box is None:
                continue
            sl, u, v = box
            mask = (np.abs(u) <= half_len) & (np.abs(v) <= half_wid)
            image[sl][mask] = colour
        else:  # ellipse, aspect 2.5..4, speckle noise
            a = rng.uniform(0.08, 0.2) * size
            b = a / rng.uniform(2.5, 4.0)
            box = _local_coords(h, w, cx, cy, a + 2, angle)
            if box is None:
                continue
            sl, u, v = box
            mask = (u / a) ** 2 + (v / b) ** 2 <= 1.0
            n = int(mask.sum())
            image[sl][mask] = colour + rng.normal(0.0, 35.0, size=(n, 3)).astype(np.float32)


def _object_colours(class_id: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Primary colour (class hue family, jittered) and the pattern's contrasting second colour."""
    hue = _class_hue(class_id) + rng.normal(0.0, HUE_JITTER_DEG)
    sat, val = rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0)
    second_val = val - rng.uniform(0.35, 0.5) if rng.random() < 0.7 else min(1.0, val + 0.4)
    second = _hsv(hue + rng.uniform(-40, 40), rng.uniform(0.1, 1.0), max(0.05, second_val))
    return _hsv(hue, sat, val), second


def _band(instances: np.ndarray) -> np.ndarray:
    """Pixels whose 8-neighbourhood holds a different instance id (both sides of each edge)."""
    band = np.zeros(instances.shape, dtype=bool)
    for (a, b) in (
        ((slice(None), slice(1, None)), (slice(None), slice(None, -1))),
        ((slice(1, None), slice(None)), (slice(None, -1), slice(None))),
        ((slice(1, None), slice(1, None)), (slice(None, -1), slice(None, -1))),
        ((slice(1, None), slice(None, -1)), (slice(None, -1), slice(1, None))),
    ):
        diff = instances[a] != instances[b]
        band[a] |= diff
        band[b] |= diff
    return band


def render_image(seed: int, index: int, size: int = DEFAULT_SIZE, *,
                 pool: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image ``index`` of the benchmark for ``seed``: RGB ``uint8 [H, W, 3]``, class map and
    instance map ``uint8 [H, W]`` (255 band). Depends only on (seed, index, size).

    ``pool``: an image of the pretraining pool instead (its own random stream, objects of
    ``POOL_SHAPES``; class ids 1..20 in its class map name pool shapes, not classes)."""
    entropy = (GENERATOR_VERSION, seed, index) + ((POOL_STREAM,) if pool else ())
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
    spread = size // 6
    h = int(rng.integers(size - spread, size + spread + 1))
    w = int(rng.integers(size - spread, size + spread + 1))
    image = _background(rng, h, w)
    _draw_distractors(image, rng, size)

    instances = np.zeros((h, w), dtype=np.int32)
    object_classes: list[int] = []
    full_area: list[int] = []
    visible: list[int] = []
    for _ in range(rng.integers(OBJECTS_PER_IMAGE[0], OBJECTS_PER_IMAGE[1] + 1)):
        class_id = int(rng.integers(1, 21))
        shape, texture, _ = _attributes(class_id, POOL_SHAPES if pool else SHAPES)
        for _try in range(PLACEMENT_TRIES):
            radius = rng.uniform(*OBJECT_RADIUS) * size
            cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
            angle = rng.uniform(0, 2 * math.pi)
            stretch = rng.uniform(0.85, 1.15, size=2)
            box = _local_coords(h, w, cx, cy, 1.2 * radius * stretch.max() + 1, angle)
            if box is None:
                continue
            sl, pu, pv = box
            mask = _shape_mask(shape, pu / (radius * stretch[0]), pv / (radius * stretch[1]), rng)
            area = int(mask.sum())
            if area == 0:
                continue
            lost = np.bincount(instances[sl][mask], minlength=len(visible) + 1)[1:]
            if all(visible[i] - lost[i] >= (1 - MAX_HIDDEN_FRACTION) * full_area[i] for i in range(len(visible))):
                break
        else:
            continue
        primary, second = _object_colours(class_id, rng)
        pattern = _texture_pattern(texture, pu, pv, radius, rng)
        light = rng.uniform(0, 2 * math.pi)  # soft linear shading across the object
        shade = 1.0 + rng.uniform(0.05, 0.2) * (pu * math.cos(light) + pv * math.sin(light)) / radius
        colours = np.broadcast_to(primary, pu.shape + (3,))
        if pattern is not None:
            colours = np.where(pattern[..., None], second, primary)
        patch = image[sl]
        patch[mask] = (colours * shade[..., None])[mask]
        for i, n in enumerate(lost):
            visible[i] -= int(n)
        instances[sl][mask] = len(visible) + 1
        object_classes.append(class_id)
        full_area.append(area)
        visible.append(area)

    # renumber visible instances 1..n in paint order; class of each
    new_id = np.zeros(len(visible) + 1, dtype=np.uint8)
    class_of = np.zeros(len(visible) + 1, dtype=np.uint8)
    kept = [i for i, n in enumerate(visible) if n > 0]
    for rank, i in enumerate(kept, start=1):
        new_id[i + 1] = rank
        class_of[i + 1] = object_classes[i]
    band = _band(instances)
    class_map = class_of[instances]
    class_map[band] = C.IGNORE_INDEX
    instance_map = new_id[instances]
    instance_map[band] = C.IGNORE_INDEX

    # photometric: soft edges, global gain, sensor noise
    image = ndimage.gaussian_filter(image, sigma=(0.6, 0.6, 0))
    image = image * rng.uniform(0.85, 1.15) + rng.normal(0.0, 5.0, size=image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), class_map, instance_map


def object_pool_image(seed: int, index: int, size: int, *, classes: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Image ``index`` of the pretraining pool and its object mask (1 any object, 0 background,
    255 band): ``uint8 [H, W, 3]`` and ``uint8 [H, W]``. ``classes``: the pool class map
    instead (1..20 pool classes, see ``pool_class_names``; 0 background, 255 band)."""
    image, class_map, _ = render_image(seed, index, size, pool=True)
    if classes:
        return image, class_map
    objects = (class_map > 0).astype(np.uint8)
    objects[class_map == C.IGNORE_INDEX] = C.IGNORE_INDEX
    return image, objects


# ---------------------------------------------------------------- the dataset


def image_id(index: int) -> str:
    return f"syn_{index:06d}"


def prepare_synthetic(
    out: str | Path,
    *,
    seed: int = 0,
    size: int = DEFAULT_SIZE,
    train_images: int = DEFAULT_TRAIN_IMAGES,
    val_images: int = DEFAULT_VAL_IMAGES,
    holdout_images: int = DEFAULT_HOLDOUT_IMAGES,
    min_area: int | None = None,
    track: Track | None = None,
) -> dict:
    """Generate the synthetic benchmark in the VOC layout under ``out`` and build its fold
    lists (pascal convention, pfenet area rule with ``min_area``, default
    ``default_min_area(size)``; holdout lists when ``holdout_images`` > 0). Returns a summary: image and list counts, min_area, seconds.
    """
    for name, value, low in (("seed", seed, 0), ("size", size, MIN_SIZE), ("train_images", train_images, 1),
                             ("val_images", val_images, 1), ("holdout_images", holdout_images, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"synthetic {name}={value!r} is invalid; use an integer >= {low}.")
    if min_area is None:
        min_area = default_min_area(size)
    if not isinstance(min_area, int) or min_area < 0:
        raise ConfigError(f"synthetic min_area={min_area!r} is invalid; use an integer >= 0 (0 disables the rule).")

    start = time.perf_counter()
    out = begin_prepare(Path(out))
    for sub in (IMAGE_DIR, MASK_DIR, INSTANCE_DIR):
        (out / sub).mkdir(parents=True, exist_ok=True)

    total = train_images + val_images + holdout_images
    indices: Iterable[int] = range(total)
    if track is not None:
        indices = track(indices, "generating synthetic images", total)
    areas: dict[str, dict[int, int]] = {}
    for index in indices:
        name = image_id(index)
        image, class_map, instance_map = render_image(seed, index, size)
        write_jpeg(out / IMAGE_DIR / f"{name}.jpg", image, quality=JPEG_QUALITY)
        write_mask(out / MASK_DIR / f"{name}.png", class_map)
        write_mask(out / INSTANCE_DIR / f"{name}.png", instance_map)
        areas[name] = class_areas(class_map)

    train_ids = [image_id(i) for i in range(train_images)]
    val_ids = [image_id(i) for i in range(train_images, train_images + val_images)]
    holdout_ids = [image_id(i) for i in range(train_images + val_images, total)]
    splits = (("train", train_ids), ("val", val_ids)) + ((("holdout", holdout_ids),) if holdout_ids else ())
    for split, ids in splits:
        _atomic_write_text(out / ID_LIST_DIR / f"{split}.txt", "".join(i + "\n" for i in ids))
    ordered_areas = {i: areas[i] for i in train_ids + val_ids + holdout_ids}
    write_areas(out, ordered_areas)
    counts = write_fold_lists(out, "synthetic", "pascal", train_ids, val_ids, ordered_areas,
                              min_area=min_area, holdout_ids=holdout_ids)
    options = {
        "seed": seed, "size": size, "train_images": train_images, "val_images": val_images,
        "holdout_images": holdout_images, "min_area": min_area, "generator_version": GENERATOR_VERSION, "jpeg_quality": JPEG_QUALITY,
    }
    finish_prepare(out, {
        "dataset": "synthetic",
        "num_classes": 20,
        "class_names": list(CLASS_NAMES),
        "image_dir": IMAGE_DIR,
        "image_ext": ".jpg",
        "mask_dir": MASK_DIR,
        "instance_dir": INSTANCE_DIR,
        "conventions": ["pascal"],
        "options": options,
    })
    return {
        "dataset": "synthetic",
        "out": str(out),
        "images": {"train": train_images, "val": val_images, "holdout": holdout_images},
        "lists": {"pascal": counts},
        "min_area": min_area,
        "seed": seed,
        "seconds": round(time.perf_counter() - start, 2),
    }


# ---------------------------------------------------------------- difficulty sanity check


def colour_prototype_miou(root: str | Path, fold: int = 0, *, shot: int = 1, episodes: int = 500,
                          seed: int = 0) -> float:
    """mIoU of a training-free baseline on the fold's val episodes: each query pixel takes the
    label of the nearer (Euclidean RGB) of two support prototypes, the mean colour of the
    support's class pixels and of its other non-ignored pixels. A check that the benchmark is
    not solved by colour alone; run by hand: ``python -m fss.data.synthetic ROOT``.
    """
    data = PreparedDataset(root, fold, "val")
    rng = np.random.Generator(np.random.PCG64(seed))
    classes = [c for c in data.classes if len(data.class_index[c]) > shot]
    inter = {c: 0 for c in classes}
    union = {c: 0 for c in classes}
    for _ in range(episodes):
        c = classes[rng.integers(len(classes))]
        picks = rng.choice(data.class_index[c], size=shot + 1, replace=False)
        fg, bg = [], []
        for i in picks[1:]:
            image, mask = data.load(int(i))
            pixels = image.reshape(-1, 3).astype(np.float64)
            fg.append(pixels[mask.reshape(-1) == c])
            bg.append(pixels[(mask.reshape(-1) != c) & (mask.reshape(-1) != C.IGNORE_INDEX)])
        proto_fg, proto_bg = np.concatenate(fg).mean(0), np.concatenate(bg).mean(0)
        image, mask = data.load(int(picks[0]))
        pixels = image.reshape(-1, 3).astype(np.float64)
        pred = ((pixels - proto_fg) ** 2).sum(1) < ((pixels - proto_bg) ** 2).sum(1)
        label = mask.reshape(-1)
        valid = label != C.IGNORE_INDEX
        target = label == c
        inter[c] += int((pred & target & valid).sum())
        union[c] += int(((pred | target) & valid).sum())
    return float(np.mean([inter[c] / max(union[c], 1) for c in classes]))


if __name__ == "__main__":  # pragma: no cover - a by-hand check
    root = sys.argv[1]
    for k in range(C.NUM_FOLDS):
        for shot in (1, 5):
            print(f"fold {k} {shot}-shot colour-prototype mIoU: "
                  f"{colour_prototype_miou(root, k, shot=shot):.3f}")
