"""Weak support annotations: bounding boxes and scribbles (PANet Section 4.4, Table 6).

At test time the support's dense mask can be replaced by a weaker annotation generated
automatically from it (protocol section 8). :func:`weak_support_mask` returns an HxW
uint8 mask in the support-mask convention: 1 = foreground, 0 = background, and
``unlabelled`` (default 255) = neither.

**Note for models.** A pixel marked ``unlabelled`` must be left out of the foreground AND
the background prototype. Models that treat 255 as background (this project's PANet, like
its reference, counts support 255 pixels as background and only excludes its
``OTHER_EPISODE_CLASS`` value 2) need ``unlabelled=2`` for the box and scribble masks to
mean what the reference feeds them (separate fg and bg masks).

Instances: ``instance_map`` holds instance ids (0 background, 255 ignore, e.g. VOC
``SegmentationObject``/SBD ``inst``). The instances of the class are the ids with pixels
in the class mask (``binary_mask == 1``); each instance's region is restricted to the class
mask (PANet's ``inst_mask[fg_mask == 0] = 0``). When ``instance_map`` is None, or no id
overlaps the class mask, the 8-connected components of the class mask
(``scipy.ndimage.label``) are used as instances instead.

**bbox** (PANet ``util/utils.py: get_bbox``): foreground = the filled bounding box of one
instance; background = every pixel outside the boxes of ALL instances of the class; pixels
inside another instance's box but outside the chosen box are ``unlabelled``
(``bbox_background="outside_all_boxes"``, the reference) or background
(``"outside_box"``). The dense mask's 255 pixels are not carried over (a box has no ignore
band; the reference ignores them too). Which instance: ``bbox_instance="random"`` (default:
the paper's "one randomly chosen instance mask", and protocol section 8) draws it
uniformly with ``rng``; ``"largest"`` = the released code, which takes the instance with
the most class pixels (lowest id on ties).

**scribble**: PANet ships precomputed scribbles (``ScribbleAugAuto``) made by the DAVIS
"scribble robot" in its ``util/scribbles.py``; we regenerate them the same way, per region
(one instance of the class for the foreground, the image background for the background):

1. opening of the region with a disk of radius ``min(0.15 * sqrt(area) / 2, 16)``; while
   the opening is empty the radius shrinks by x0.9 (no opening once it is <= 1); if it is
   still empty, the region itself is used (the reference would fail there);
2. one-pixel skeleton of the result: Zhang-Suen thinning (skimage's ``medial_axis`` of the
   reference is not available; both give a one-pixel-wide centre line);
3. skeleton pixels form an 8-neighbour graph (edge length 1 or sqrt 2); cycles are removed
   by keeping a minimum spanning tree (the reference removes the longest edge of each cycle);
   components with fewer than 4 pixels are dropped;
4. in each remaining tree, the longest path (two breadth-first searches, the first from the
   component's first pixel in raster order; ties broken by raster order);
5. each path is smoothed into a Bezier curve of 1000 points (paths with more than 1000
   points are kept as they are), scaled by ``(size - 1) / size`` and truncated to integers
   as the reference's ``scribbles2mask`` does, and consecutive points joined by
   8-connected straight lines (Bresenham);
6. stroke pixels are kept only inside the region (the reference clips the foreground).

Foreground strokes come from one instance drawn with ``rng`` (``scribble_instances="one"``,
the reference's ``random.choice`` among the scribble labels inside the class mask) or from
all instances (``"all"``). Background strokes come from the background region: pixels with
``binary_mask == 0`` that are no object (``instance_map == 0``) when an instance map is
given, as the reference's scribble files mark only the image background 0. The robot itself
is deterministic; ``rng`` only picks the instance, so the output is a function of the masks
and the rng state. If no foreground stroke survives (tiny instance), the instance's
innermost pixel (largest distance to its border) is labelled 1 (``scribble_fallback=True``;
False = the reference's empty foreground). ``scribble_dilation`` (default 0 = off, as the
reference's ``scribble_dilation``) applies the reference's ``DilateScribble``: a minimum
filter of that window size over the mask values (background strokes win over foreground
ones), after which foreground is clipped to the class mask again.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components, minimum_spanning_tree, shortest_path
from scipy.special import comb

from fss.errors import ConfigError, DataError

KINDS = ("dense", "bbox", "scribble")
BBOX_INSTANCE_MODES = ("random", "largest")
BBOX_BACKGROUND_MODES = ("outside_all_boxes", "outside_box")
SCRIBBLE_INSTANCE_MODES = ("one", "all")
IGNORE_INDEX = 255
UNLABELLED = 255

# DAVIS scribble robot defaults (PANet util/scribbles.py: ScribblesRobot)
KERNEL_SIZE = 0.15
MAX_KERNEL_RADIUS = 16.0
MIN_NB_NODES = 4
NB_POINTS = 1000

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def weak_support_mask(
    kind: str,
    binary_mask: np.ndarray,
    instance_map: np.ndarray | None,
    class_id: int,
    rng: np.random.Generator,
    *,
    bbox_instance: str = "random",
    bbox_background: str = "outside_all_boxes",
    scribble_instances: str = "one",
    scribble_fallback: bool = True,
    scribble_dilation: int = 0,
    unlabelled: int = UNLABELLED,
) -> np.ndarray:
    """The support mask of ``kind`` ("dense", "bbox", "scribble") for class ``class_id``.

    ``binary_mask`` HxW 0/1/255 (1 = the class), ``instance_map`` HxW instance ids or None
    (then connected components of the class mask), ``rng`` a numpy Generator. Returns an
    HxW uint8 mask: 1 foreground, 0 background, ``unlabelled`` neither (see module doc).
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown support annotation kind {kind!r}; choose one of: {', '.join(KINDS)}.")
    _check_choice("bbox_instance", bbox_instance, BBOX_INSTANCE_MODES)
    _check_choice("bbox_background", bbox_background, BBOX_BACKGROUND_MODES)
    _check_choice("scribble_instances", scribble_instances, SCRIBBLE_INSTANCE_MODES)
    if not isinstance(rng, np.random.Generator):
        raise ConfigError(f"rng must be a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}.")
    if not 0 <= int(unlabelled) <= 255 or int(unlabelled) in (0, 1):
        raise ConfigError(f"unlabelled value {unlabelled!r} must be in 2..255 (0 and 1 are background and foreground).")
    if int(scribble_dilation) < 0:
        raise ConfigError(f"scribble_dilation {scribble_dilation!r} must be >= 0 (0 = off).")

    mask = np.asarray(binary_mask)
    if mask.ndim != 2:
        raise DataError(f"support mask of class {class_id} has shape {mask.shape}; expected HxW.")
    bad = ~np.isin(mask, (0, 1, IGNORE_INDEX))
    if bad.any():
        raise DataError(
            f"support mask of class {class_id} holds value {int(mask[bad][0])}; expected the binary "
            f"mask (0 background, 1 class, 255 ignore)."
        )
    mask = mask.astype(np.uint8)
    if kind == "dense":
        return mask.copy()
    if instance_map is not None:
        instance_map = np.asarray(instance_map)
        if instance_map.shape != mask.shape:
            raise DataError(
                f"instance map of shape {instance_map.shape} does not match the support mask of "
                f"class {class_id} ({mask.shape}); resize both alike."
            )
    fg = mask == 1
    if not fg.any():
        raise DataError(
            f"support mask of class {class_id} has no foreground pixel, so no {kind} can be drawn; "
            f"use supports that contain the class."
        )
    instances = class_instances(fg, instance_map)
    if kind == "bbox":
        return _bbox_mask(fg.shape, instances, rng, bbox_instance, bbox_background, unlabelled)
    return _scribble_mask(
        mask, instance_map, instances, rng, scribble_instances, scribble_fallback,
        int(scribble_dilation), unlabelled,
    )


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(allowed)}.")


def class_instances(fg: np.ndarray, instance_map: np.ndarray | None) -> list[np.ndarray]:
    """Boolean regions of the class's instances, in increasing instance id.

    Instance ids (not 0, not 255) with pixels in ``fg``, each restricted to ``fg``; when
    ``instance_map`` is None or has no such id, the 8-connected components of ``fg``.
    """
    if instance_map is not None:
        ids = np.unique(instance_map[fg])
        ids = ids[(ids != 0) & (ids != IGNORE_INDEX)]
        if ids.size:
            return [fg & (instance_map == i) for i in ids]
    labels, count = ndimage.label(fg, structure=_EIGHT_CONNECTED)
    return [labels == i for i in range(1, count + 1)]


def bounding_box(region: np.ndarray) -> tuple[int, int, int, int]:
    """``(y_min, y_max, x_min, x_max)``, inclusive, of a non-empty boolean region."""
    rows = np.flatnonzero(region.any(axis=1))
    cols = np.flatnonzero(region.any(axis=0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def _bbox_mask(shape, instances, rng, bbox_instance, bbox_background, unlabelled) -> np.ndarray:
    if bbox_instance == "largest":  # PANet get_bbox: area[1:].argmax() + 1
        chosen = int(np.argmax([r.sum() for r in instances]))
    else:  # the paper: one randomly chosen instance
        chosen = int(rng.integers(len(instances)))
    out = np.zeros(shape, dtype=np.uint8)
    if bbox_background == "outside_all_boxes":
        for region in instances:
            y0, y1, x0, x1 = bounding_box(region)
            out[y0 : y1 + 1, x0 : x1 + 1] = unlabelled
    y0, y1, x0, x1 = bounding_box(instances[chosen])
    out[y0 : y1 + 1, x0 : x1 + 1] = 1
    return out


def _scribble_mask(mask, instance_map, instances, rng, scribble_instances, fallback, dilation, unlabelled):
    fg = mask == 1
    if scribble_instances == "one":
        regions = [instances[int(rng.integers(len(instances)))]]
    else:
        regions = instances
    background = mask == 0
    if instance_map is not None:
        background &= instance_map == 0
    out = np.full(mask.shape, unlabelled, dtype=np.uint8)
    if background.any():
        out[scribble_strokes(background) & background] = 0
    fg_strokes = np.zeros(mask.shape, dtype=bool)
    for region in regions:
        strokes = scribble_strokes(region) & region
        if not strokes.any() and fallback:
            strokes = _innermost_pixel(region)
        fg_strokes |= strokes
    out[fg_strokes] = 1
    if dilation > 0:  # PANet DilateScribble: minimum filter over the label values
        out = ndimage.minimum_filter(out, size=dilation)
        out[(out == 1) & ~fg] = unlabelled
    return out


def _innermost_pixel(region: np.ndarray) -> np.ndarray:
    dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    out = np.zeros_like(region)
    out.flat[int(np.argmax(dist))] = True
    return out


# ---------------------------------------------------------------- the scribble robot


def scribble_strokes(region: np.ndarray) -> np.ndarray:
    """Boolean stroke mask drawn by the DAVIS/PANet scribble robot on a boolean region
    (steps 1-5 of the module docstring; not clipped to the region)."""
    region = np.asarray(region, dtype=bool)
    out = np.zeros(region.shape, dtype=bool)
    if not region.any():
        return out
    skeleton = thin(_smoothed_region(region))
    for path in skeleton_paths(skeleton, MIN_NB_NODES):
        points = path[:, ::-1].astype(np.float64)  # (x, y)
        _draw_curve(out, points)
    return out


def _smoothed_region(region: np.ndarray) -> np.ndarray:
    """Step 1: morphological opening with a disk whose radius follows the region's size."""
    if region.all():  # nothing to erode from: the opening is the region itself
        return region
    radius = min(KERNEL_SIZE * np.sqrt(region.sum()) * 0.5, MAX_KERNEL_RADIUS)
    inside = ndimage.distance_transform_edt(region)  # out-of-image pixels do not erode
    while radius > 1.0:
        eroded = inside > radius
        if eroded.any():
            return ndimage.distance_transform_edt(~eroded) <= radius
        radius *= 0.9
    return region


_NEIGHBOUR_ORDER = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))  # P2..P9


def thin(region: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning (Zhang & Suen 1984) of a boolean image to a one-pixel skeleton.

    Only contour pixels are examined: an interior pixel (8 neighbours on) cannot be deleted
    and re-enters the candidates when one of its neighbours is deleted (same result as
    sweeping the whole image, in time proportional to the deleted area).
    """
    h, w = region.shape
    padded = np.zeros((h + 2, w + 2), dtype=np.uint8)
    padded[1:-1, 1:-1] = region
    flat = padded.ravel()  # a view: writes go to ``padded``
    offsets = np.array([dy * (w + 2) + dx for dy, dx in _NEIGHBOUR_ORDER])
    candidates = np.flatnonzero(flat)
    step, idle = 0, 0
    while candidates.size and idle < 2:
        nb = flat[candidates[:, None] + offsets].astype(np.int32)  # [n, 8] = P2..P9
        count = nb.sum(axis=1)
        transitions = ((nb == 0) & (np.roll(nb, -1, axis=1) == 1)).sum(axis=1)
        p2, p4, p6, p8 = nb[:, 0], nb[:, 2], nb[:, 4], nb[:, 6]
        if step % 2 == 0:
            side = (p2 * p4 * p6 == 0) & (p4 * p6 * p8 == 0)
        else:
            side = (p2 * p4 * p8 == 0) & (p2 * p6 * p8 == 0)
        delete = (count >= 2) & (count <= 6) & (transitions == 1) & side
        deleted = candidates[delete]
        flat[deleted] = 0
        idle = 0 if deleted.size else idle + 1
        freed = (deleted[:, None] + offsets).ravel()
        keep = candidates[~delete & (count < 8)]
        candidates = np.unique(np.concatenate([keep, freed[flat[freed] == 1]]))
        step += 1
    return padded[1:-1, 1:-1].astype(bool)


def skeleton_paths(skeleton: np.ndarray, min_nodes: int = MIN_NB_NODES) -> list[np.ndarray]:
    """Steps 3-4: the longest path ``[n, 2]`` (row, col) of each skeleton component."""
    coords = np.argwhere(skeleton)
    n = len(coords)
    if n == 0:
        return []
    index = -np.ones(skeleton.shape, dtype=np.int64)
    index[coords[:, 0], coords[:, 1]] = np.arange(n)
    h, w = skeleton.shape
    src, dst, length = [], [], []
    for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):
        y, x = coords[:, 0] + dy, coords[:, 1] + dx
        ok = (y >= 0) & (y < h) & (x >= 0) & (x < w)
        nbr = np.full(n, -1, dtype=np.int64)
        nbr[ok] = index[y[ok], x[ok]]
        has = nbr >= 0
        src.append(np.flatnonzero(has))
        dst.append(nbr[has])
        length.append(np.full(int(has.sum()), np.hypot(dy, dx)))
    graph = coo_matrix(
        (np.concatenate(length), (np.concatenate(src), np.concatenate(dst))), shape=(n, n)
    ).tocsr()
    tree = minimum_spanning_tree(graph)  # drops the longest edge of every cycle
    count, labels = connected_components(tree, directed=False)
    paths = []
    for comp in range(count):
        members = np.flatnonzero(labels == comp)  # raster order
        if len(members) < min_nodes:
            continue
        far = _farthest(tree, members[0], members)[0]
        end, predecessors = _farthest(tree, far, members)
        path = [end]
        while path[-1] != far:
            path.append(predecessors[path[-1]])
        paths.append(coords[np.array(path[::-1])])
    return paths


def _farthest(tree, start: int, members: np.ndarray):
    """The member farthest (in edges) from ``start`` in the tree, and the predecessors."""
    hops, predecessors = shortest_path(
        tree, directed=False, unweighted=True, indices=int(start), return_predecessors=True
    )
    return int(members[np.argmax(hops[members])]), predecessors


def bezier_curve(points: np.ndarray, nb_points: int = NB_POINTS) -> np.ndarray:
    """Step 5: Bezier curve with ``points`` as control points (the robot's ``bezier_curve``)."""
    nb_points = min(nb_points, 1000)
    if len(points) > nb_points:
        return points
    t = np.linspace(0.0, 1.0, nb_points).reshape(1, -1)
    n = len(points) - 1
    i = np.arange(n + 1).reshape(-1, 1)
    weights = comb(n, i) * (t ** (n - i)) * (1.0 - t) ** i
    return weights.T @ points


def _draw_curve(out: np.ndarray, points: np.ndarray) -> None:
    """Rasterise a (x, y) path like the reference's ``scribbles2mask`` (in place)."""
    h, w = out.shape
    scale = np.array([w, h], dtype=np.float64)
    curve = bezier_curve(points / scale) * (scale - 1.0)
    pixels = curve.astype(np.int64)
    starts, ends = pixels[:-1], pixels[1:]
    if len(starts) == 0:
        out[pixels[:, 1], pixels[:, 0]] = True
        return
    delta = ends - starts
    steps = np.abs(delta).max(axis=1)
    segment = np.repeat(np.arange(len(starts)), steps + 1)
    first = np.concatenate([[0], np.cumsum(steps + 1)[:-1]])
    s = (np.arange(len(segment)) - first[segment]).astype(np.float64)
    frac = s / np.maximum(steps[segment], 1)
    xs = starts[segment, 0] + np.round(frac * delta[segment, 0]).astype(np.int64)
    ys = starts[segment, 1] + np.round(frac * delta[segment, 1]).astype(np.int64)
    out[ys, xs] = True
