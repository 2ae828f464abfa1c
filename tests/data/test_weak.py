"""Tests of fss.data.weak: bounding-box and scribble support annotations (PANet Table 6)."""

from __future__ import annotations

import numpy as np
import pytest

from fss.data.weak import skeleton_paths, thin, weak_support_mask
from fss.errors import ConfigError, DataError


def _two_instances():
    """A 33x49 class mask with two instances of irregular shape and a 255 boundary band."""
    mask = np.zeros((33, 49), dtype=np.uint8)
    inst = np.zeros((33, 49), dtype=np.uint8)
    mask[4:12, 5:9] = 1  # instance 3: an L shape, box rows 4..11, cols 5..14
    mask[10:12, 9:15] = 1
    inst[mask == 1] = 3
    mask[18:29, 25:44] = 1  # instance 7: a rectangle with a notch, box rows 18..28, cols 25..43
    mask[18:22, 25:30] = 0
    inst[18:29, 25:44][mask[18:29, 25:44] == 1] = 7
    mask[17, 24:45] = 255  # boundary band above instance 7, also 255 in the instance map
    inst[17, 24:45] = 255
    return mask, inst


def _box(shape, y0, y1, x0, x1, value=1, fill=0):
    out = np.full(shape, fill, dtype=np.uint8)
    out[y0 : y1 + 1, x0 : x1 + 1] = value
    return out


def test_bbox_of_single_instance_is_exact():
    mask = np.zeros((33, 33), dtype=np.uint8)
    mask[6:9, 3:20] = 1
    mask[9:25, 15:18] = 1  # a T shape: box rows 6..24, cols 3..19
    mask[0, :] = 255
    inst = (mask == 1).astype(np.uint8) * 5
    out = weak_support_mask("bbox", mask, inst, 12, np.random.default_rng(0))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, _box(mask.shape, 6, 24, 3, 19))


def test_bbox_with_two_instances_depends_on_rng():
    mask, inst = _two_instances()
    box3 = (4, 11, 5, 14)
    box7 = (18, 28, 25, 43)
    expected = {}
    for chosen, other in ((box3, box7), (box7, box3)):
        out = _box(mask.shape, *other, value=255)
        y0, y1, x0, x1 = chosen
        out[y0 : y1 + 1, x0 : x1 + 1] = 1
        expected[chosen] = out
    seen = set()
    for seed in range(12):
        out = weak_support_mask("bbox", mask, inst, 1, np.random.default_rng(seed))
        matches = [b for b, e in expected.items() if np.array_equal(out, e)]
        assert len(matches) == 1, f"seed {seed} gave neither exact box"
        seen.add(matches[0])
        again = weak_support_mask("bbox", mask, inst, 1, np.random.default_rng(seed))
        np.testing.assert_array_equal(out, again)
    assert seen == {box3, box7}
    # the other instance's box is background with "outside_box"
    out = weak_support_mask("bbox", mask, inst, 1, np.random.default_rng(0), bbox_background="outside_box")
    assert set(np.unique(out).tolist()) == {0, 1}
    assert (out == 1).sum() in ((11 - 4 + 1) * (14 - 5 + 1), (28 - 18 + 1) * (43 - 25 + 1))


def test_bbox_largest_instance_and_unlabelled_value():
    mask, inst = _two_instances()
    for seed in range(4):
        out = weak_support_mask(
            "bbox", mask, inst, 1, np.random.default_rng(seed), bbox_instance="largest", unlabelled=2
        )
        expected = _box(mask.shape, 4, 11, 5, 14, value=2)
        expected[18:29, 25:44] = 1
        np.testing.assert_array_equal(out, expected)


def test_bbox_falls_back_to_connected_components():
    mask, inst = _two_instances()
    for instance_map in (None, np.where(mask == 1, 0, 9).astype(np.uint8)):  # no id on the class
        boxes = set()
        for seed in range(10):
            out = weak_support_mask("bbox", mask, instance_map, 1, np.random.default_rng(seed))
            ys, xs = np.nonzero(out == 1)
            boxes.add((ys.min(), ys.max(), xs.min(), xs.max()))
            assert (out == 1).sum() == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert boxes == {(4, 11, 5, 14), (18, 28, 25, 43)}


def test_instance_pixels_outside_the_class_mask_are_ignored():
    mask = np.zeros((33, 33), dtype=np.uint8)
    mask[10:20, 10:20] = 1
    inst = np.zeros_like(mask)
    inst[5:25, 5:25] = 4  # the instance map spills over another class's pixels
    out = weak_support_mask("bbox", mask, inst, 1, np.random.default_rng(0))
    np.testing.assert_array_equal(out, _box(mask.shape, 10, 19, 10, 19))


def test_dense_is_the_mask_itself():
    mask, inst = _two_instances()
    out = weak_support_mask("dense", mask, inst, 1, np.random.default_rng(0))
    np.testing.assert_array_equal(out, mask)
    assert out is not mask


def test_scribbles_lie_inside_their_regions_and_are_sparse():
    mask, inst = _two_instances()
    background = (mask == 0) & (inst == 0)
    for seed in range(3):
        out = weak_support_mask("scribble", mask, inst, 1, np.random.default_rng(seed))
        fg, bg = out == 1, out == 0
        assert set(np.unique(out).tolist()) <= {0, 1, 255}
        assert fg.any() and bg.any()
        assert not (fg & (mask != 1)).any()
        assert not (bg & ~background).any()
        assert fg.sum() < 0.35 * (mask == 1).sum() and bg.sum() < 0.1 * background.sum()
        owners = set(np.unique(inst[fg]).tolist())
        assert len(owners) == 1  # one randomly chosen instance ("one", the reference)
        again = weak_support_mask("scribble", mask, inst, 1, np.random.default_rng(seed))
        np.testing.assert_array_equal(out, again)
    both = weak_support_mask("scribble", mask, inst, 1, np.random.default_rng(0), scribble_instances="all")
    assert set(np.unique(inst[both == 1]).tolist()) == {3, 7}


def test_scribble_of_a_bar_follows_its_centre_line():
    mask = np.zeros((33, 65), dtype=np.uint8)
    mask[10:21, 5:60] = 1  # rows 10..20: centre row 15
    out = weak_support_mask("scribble", mask, None, 1, np.random.default_rng(0))
    rows, cols = np.nonzero(out == 1)
    assert rows.min() >= 13 and rows.max() <= 17
    assert cols.max() - cols.min() >= 35
    assert len(rows) < 80


def test_tiny_instance_gets_its_innermost_pixel():
    mask = np.zeros((33, 33), dtype=np.uint8)
    mask[10:13, 10:13] = 1
    out = weak_support_mask("scribble", mask, None, 1, np.random.default_rng(0))
    assert np.argwhere(out == 1).tolist() == [[11, 11]]
    empty = weak_support_mask("scribble", mask, None, 1, np.random.default_rng(0), scribble_fallback=False)
    assert not (empty == 1).any()


def test_scribble_dilation_widens_strokes_but_keeps_fg_inside():
    mask, inst = _two_instances()
    thin_out = weak_support_mask("scribble", mask, inst, 1, np.random.default_rng(0), scribble_instances="all")
    wide = weak_support_mask(
        "scribble", mask, inst, 1, np.random.default_rng(0), scribble_instances="all", scribble_dilation=3
    )
    assert (wide != 255).sum() > (thin_out != 255).sum()
    assert not ((wide == 1) & (mask != 1)).any()


def _zhang_suen_reference(image):
    """Plain full-image Zhang-Suen thinning, pixel by pixel, for comparison."""
    img = np.pad(image.astype(np.uint8), 1)
    step = 0
    idle = 0
    while idle < 2:
        delete = []
        for y in range(1, img.shape[0] - 1):
            for x in range(1, img.shape[1] - 1):
                if not img[y, x]:
                    continue
                p = [img[y - 1, x], img[y - 1, x + 1], img[y, x + 1], img[y + 1, x + 1],
                     img[y + 1, x], img[y + 1, x - 1], img[y, x - 1], img[y - 1, x - 1]]
                b = sum(p)
                a = sum(1 for k in range(8) if p[k] == 0 and p[(k + 1) % 8] == 1)
                if step % 2 == 0:
                    side = p[0] * p[2] * p[4] == 0 and p[2] * p[4] * p[6] == 0
                else:
                    side = p[0] * p[2] * p[6] == 0 and p[0] * p[4] * p[6] == 0
                if 2 <= b <= 6 and a == 1 and side:
                    delete.append((y, x))
        for y, x in delete:
            img[y, x] = 0
        idle = 0 if delete else idle + 1
        step += 1
    return img[1:-1, 1:-1].astype(bool)


def test_thinning_matches_plain_zhang_suen():
    rng = np.random.default_rng(5)
    for _ in range(3):
        blob = np.zeros((21, 25), dtype=bool)
        for _ in range(3):
            y, x = rng.integers(0, 21), rng.integers(0, 25)
            h, w = rng.integers(3, 10), rng.integers(3, 12)
            blob[y : y + h, x : x + w] = True
        np.testing.assert_array_equal(thin(blob), _zhang_suen_reference(blob))


def test_skeleton_path_of_a_line():
    skeleton = np.zeros((9, 20), dtype=bool)
    skeleton[4, 2:18] = True
    skeleton[1:4, 10] = True  # a short branch: the longest path stays on the line
    skeleton[0, 0] = True  # an isolated pixel: fewer than 4 nodes, dropped
    paths = skeleton_paths(skeleton)
    assert len(paths) == 1
    assert sorted(map(tuple, paths[0].tolist())) == [(4, x) for x in range(2, 18)]


def test_errors():
    mask, inst = _two_instances()
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match="polygon"):
        weak_support_mask("polygon", mask, inst, 1, rng)
    with pytest.raises(DataError, match="no foreground") as info:
        weak_support_mask("bbox", np.zeros((9, 9), np.uint8), None, 14, rng)
    assert "14" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DataError, match="does not match"):
        weak_support_mask("scribble", mask, inst[:-1], 1, rng)
    with pytest.raises(DataError, match="value 3"):
        weak_support_mask("bbox", np.full((5, 5), 3, np.uint8), None, 1, rng)
    with pytest.raises(ConfigError, match="Generator"):
        weak_support_mask("bbox", mask, inst, 1, 0)
    with pytest.raises(ConfigError, match="bbox_instance"):
        weak_support_mask("bbox", mask, inst, 1, rng, bbox_instance="smallest")
