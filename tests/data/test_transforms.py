"""Transforms: pfenet augmentation pieces (against OpenCV's reference calls), test resize
modes, original-resolution scoring."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from fss.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MEAN_PIXEL_255,
    CANetTrainTransform,
    PFENetTrainTransform,
    TestTransform,
    build_test_transform,
    build_train_transform,
    denormalize,
    image_to_tensor,
    normalize,
    normalize_array,
    pfenet_pad_size,
    rand_hflip,
    rand_rotate,
    rand_scale,
    random_crop_keeping_foreground,
    rotate_arrays,
)
from fss.data.scoring import original_resolution_pairs, pad_label_square, to_original_resolution
from fss.errors import ConfigError


def rng(seed=0):
    return np.random.default_rng(seed)


def striped_image(h, w):
    """An image whose red channel is the column index and green the row index."""
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([xs * 3 % 256, ys * 3 % 256, np.full_like(xs, 128)], -1).astype(np.uint8)


def test_normalize_mean_pixel_is_zero_and_roundtrip():
    img = torch.tensor(MEAN_PIXEL_255).view(3, 1, 1).expand(3, 4, 5).clone()
    assert torch.allclose(normalize(img), torch.zeros(3, 4, 5), atol=1e-5)
    x = torch.rand(3, 6, 7) * 255
    assert torch.allclose(denormalize(normalize(x)), x, atol=1e-3)
    black = normalize(torch.zeros(3, 1, 1)).flatten()
    expected = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    assert torch.allclose(black, expected, atol=1e-5)


def test_pfenet_train_output_sizes_and_label_padding():
    t = PFENetTrainTransform(size=65, scale_range=(0.9, 1.1))
    image = striped_image(30, 44)  # smaller than the crop even after scaling: padded
    label = np.zeros((1, 30, 44), np.uint8)
    label[0, 5:20, 5:30] = 1
    for seed in range(6):
        img, masks = t(image, label, rng(seed), "query")
        assert img.shape == (3, 65, 65) and img.dtype == torch.float32
        assert masks.shape == (1, 65, 65) and masks.dtype == torch.int64
        assert set(masks.unique().tolist()) <= {0, 1, 255}
        # centred padding: first and last rows are padding -> label 255, image = mean (0 after norm)
        assert (masks[0, 0] == 255).all() and (masks[0, -1] == 255).all()
        assert img[:, 0, :].abs().max() < 1e-4
        assert (masks[0] == 1).sum() > 0


def float_image(h, w):
    return striped_image(h, w).astype(np.float32)


def test_rand_scale_keeps_aspect_and_range():
    image, masks = float_image(40, 60), np.zeros((1, 40, 60), np.uint8)
    for seed in range(10):
        img, m = rand_scale(image, masks, rng(seed), (0.8, 1.25))
        h, w = m.shape[-2:]
        factor = 0.8 + 0.45 * rng(seed).random()
        assert img.shape == (h, w, 3) and img.dtype == np.float32 and m.dtype == np.uint8
        assert (h, w) == (round(40 * factor), round(60 * factor))  # cv2.resize(fx, fy)'s size


def test_rotation_pads_image_with_mean_and_label_with_255():
    image = np.zeros((41, 41, 3), np.float32)  # black image
    masks = np.ones((2, 41, 41), np.uint8)
    img, m = rand_rotate(image, masks, rng(), angle_range=(9.0, 10.0), p=1.0)
    corner = normalize_array(img)[:, 0, 0]
    assert corner.abs().max() < 1e-5, corner  # the mean pixel normalises to 0
    assert (m[:, 0, 0] == 255).all()
    assert normalize_array(img)[:, 20, 20].min() < -1.5  # the centre stays black
    assert (m[:, 20, 20] == 1).all()
    # p = 0: untouched
    img0, m0 = rand_rotate(image, masks, rng(), p=0.0)
    assert img0 is image and m0 is masks


def random_pair(h=37, w=45, seed=0):
    g = np.random.default_rng(seed)
    image = g.integers(0, 256, (h, w, 3)).astype(np.float32)
    masks = g.integers(0, 3, (2, h, w)).astype(np.uint8)
    masks[:, 10:20, 5:30] = 1
    return image, masks


@pytest.mark.parametrize("angle", [-9.3, 4.0, 7.77])
def test_rotation_is_pfenets_warp_affine(angle):
    """PFENet RandRotate: cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1), warpAffine
    INTER_LINEAR / INTER_NEAREST, BORDER_CONSTANT with the mean pixel / 255."""
    image, masks = random_pair()
    h, w = masks.shape[-2:]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1)
    ref = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=MEAN_PIXEL_255)
    ref_m = [cv2.warpAffine(m, matrix, (w, h), flags=cv2.INTER_NEAREST,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=255) for m in masks]
    img, m = rotate_arrays(image, masks, angle)
    np.testing.assert_array_equal(img, ref)
    np.testing.assert_array_equal(m, np.stack(ref_m))
    assert (m == 255).any() and not np.array_equal(img, image)
    # the whole pfenet transform with only the rotation on: the same, normalised
    t = PFENetTrainTransform(size=37, scale_range=(1.0, 1.0), rotate_range=(angle, angle),
                             rotate_p=1.0, blur_p=0.0, flip_p=0.0)
    square = (image[:, 4:41], masks[:, :, 4:41])
    out, out_m = t(square[0].astype(np.uint8), square[1], rng(), "query")
    matrix = cv2.getRotationMatrix2D((37 / 2, 37 / 2), angle, 1)
    ref = cv2.warpAffine(np.ascontiguousarray(square[0]), matrix, (37, 37), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=MEAN_PIXEL_255)
    assert torch.equal(out, normalize(torch.from_numpy(ref).permute(2, 0, 1)))
    assert out_m.shape == (2, 37, 37) and (out_m == 255).any()


def test_blur_is_pfenets_gaussian_blur():
    """PFENet RandomGaussianBlur: cv2.GaussianBlur(image, (5, 5), 0) on the float32 image."""
    image, masks = random_pair()
    t = PFENetTrainTransform(size=37, scale_range=(1.0, 1.0), rotate_p=0.0, blur_p=1.0, flip_p=0.0)
    square = np.ascontiguousarray(image[:, 4:41])
    out, out_m = t(square.astype(np.uint8), masks[:, :, 4:41], rng(), "query")
    ref = cv2.GaussianBlur(square, (5, 5), 0)
    assert torch.equal(out, normalize(torch.from_numpy(ref).permute(2, 0, 1)))
    assert torch.equal(out_m, torch.from_numpy(masks[:, :, 4:41]).long())  # masks are not blurred
    assert not np.allclose(ref, square)


def test_normalize_array_is_normalize():
    image, _ = random_pair()
    expected = normalize(image_to_tensor(image.astype(np.uint8)))
    assert torch.equal(normalize_array(image.astype(np.uint8)), expected)
    assert torch.equal(normalize_array(image), expected)
    assert normalize_array(image).shape == (3, 37, 45) and normalize_array(image).dtype == torch.float32


class RecordingGenerator:
    """A numpy Generator that records the draws made through it."""

    def __init__(self, seed):
        self.rng, self.calls = rng(seed), []

    def random(self):
        self.calls.append("random")
        return self.rng.random()

    def integers(self, low, high):
        self.calls.append(("integers", int(low), int(high)))
        return self.rng.integers(low, high)


def test_pfenet_draws_in_the_reference_order():
    """scale, rotate? (+ angle), blur?, flip?, then two integers per crop: the episodes'
    random decisions depend on this order and count."""
    image, label = striped_image(30, 44), np.zeros((1, 30, 44), np.uint8)  # no foreground: one crop
    t = PFENetTrainTransform(size=20)
    rotated = 0
    for seed in range(8):
        g = RecordingGenerator(seed)
        t(image, label, g, "support")
        replay = rng(seed)
        factor = 0.9 + 0.2 * replay.random()
        expected = ["random", "random"]  # scale factor, rotate or not
        if replay.random() < 0.5:
            expected.append("random")  # the angle
            rotated += 1
        height, width = round(30 * factor), round(44 * factor)
        expected += ["random", "random", ("integers", 0, height - 20 + 1), ("integers", 0, width - 20 + 1)]
        assert g.calls == expected, seed
    assert 0 < rotated < 8


def test_other_presets_draw_in_their_order():
    image, label = striped_image(30, 44), np.zeros((1, 30, 44), np.uint8)
    g = RecordingGenerator(0)
    CANetTrainTransform(size=21)(image, label, g, "support")
    side = max(21, int((1.0 + 0.5 * rng(0).random()) * 21))
    assert g.calls == ["random", ("integers", 0, side - 21 + 1), ("integers", 0, side - 21 + 1), "random"]
    g = RecordingGenerator(0)
    CANetTrainTransform(size=21)(image, label, g, "query")
    assert g.calls == []
    for preset, calls in (("panet", ["random"]), ("hsnet", [])):
        g = RecordingGenerator(0)
        build_train_transform(preset, size=21)(image, label, g, "support")
        assert g.calls == calls, preset


def test_crop_retry_keeps_foreground():
    h = w = 100
    image = float_image(h, w)
    masks = np.zeros((1, h, w), np.uint8)
    masks[0, 2:14, 2:14] = 1  # small object in a corner: most 50x50 crops lose it
    raw = int((masks[0] == 1).sum())
    lost_without_retry = 0
    for seed in range(30):
        _, m, retries = random_crop_keeping_foreground(image, masks, 50, rng(seed))
        kept = int((m[0] == 1).sum())
        assert kept >= 0.85 * raw or retries == 31
        _, m0, r0 = random_crop_keeping_foreground(image, masks, 50, rng(seed), max_retries=0)
        assert r0 == 0
        lost_without_retry += int((m0[0] == 1).sum()) < 0.85 * raw
    assert lost_without_retry > 10  # without retries the crop usually loses the object


def test_crop_retry_gives_up_after_max_retries():
    image = float_image(80, 80)
    label = np.zeros((1, 80, 80), np.uint8)
    label[0, 5:75, 5:75] = 1  # larger than the crop: never 85% inside
    img, m, retries = random_crop_keeping_foreground(image, label, 40, rng(1))
    assert retries == 31 and m.shape == (1, 40, 40) and img.shape == (40, 40, 3)
    _, _, retries = random_crop_keeping_foreground(image, label, 40, rng(1), max_retries=30)
    assert retries == 30


def test_crop_pads_centred_with_mean_and_255():
    image, label = float_image(30, 44), np.ones((1, 30, 44), np.uint8)
    img, m, _ = random_crop_keeping_foreground(image, label, 50, rng())
    # pad 20 rows (10 above, 10 below) and 6 columns (3 left, 3 right), cv2.copyMakeBorder
    np.testing.assert_array_equal(img, cv2.copyMakeBorder(image, 10, 10, 3, 3, cv2.BORDER_CONSTANT,
                                                          value=MEAN_PIXEL_255))
    assert (m[0, :10] == 255).all() and (m[0, 40:] == 255).all() and (m[0, 10:40, 3:47] == 1).all()
    assert (m[0, 10:40, :3] == 255).all() and (m[0, 10:40, 47:] == 255).all()


def test_flip_and_crop_keep_image_and_mask_aligned():
    # label encodes the column; the red channel too: any geometric mismatch breaks equality
    h, w = 50, 70
    cols = np.tile(np.arange(w, dtype=np.uint8), (h, 1))
    image = np.stack([cols * 3, cols * 0, cols * 0], -1).astype(np.uint8)
    t = PFENetTrainTransform(size=41, scale_range=(1.0, 1.0), rotate_p=0.0, blur_p=0.0, flip_p=0.5)
    flipped = 0
    for seed in range(8):
        img, masks = t(image, cols[None], rng(seed), "query")
        red = denormalize(img)[0].round().long()
        assert torch.equal(red, masks[0] * 3)
        flipped += int(masks[0, 0, 0] > masks[0, 0, -1])
    assert 0 < flipped < 8

    f_img, f_m = rand_hflip(image, cols[None], rng(), p=1.0)
    np.testing.assert_array_equal(f_img, image[:, ::-1])
    np.testing.assert_array_equal(f_m, cols[None, :, ::-1])


def test_pfenet_pad_size_rounds_down_to_multiple_of_8():
    assert pfenet_pad_size(375, 500, 473) == (352, 472)  # 354.75 -> 354 -> 352; 473 -> 472
    assert pfenet_pad_size(500, 375, 473) == (472, 352)
    assert pfenet_pad_size(100, 100, 473) == (472, 472)
    assert pfenet_pad_size(427, 640, 641) == (424, 640)
    for h, w in [(30, 50), (57, 41), (333, 499)]:
        nh, nw = pfenet_pad_size(h, w, 65)
        assert nh % 8 == 0 and nw % 8 == 0 and max(nh, nw) <= 65


def test_pfenet_pad_pastes_top_left_on_zero_canvas():
    t = build_test_transform("pfenet_pad", 41)
    image = np.full((30, 50, 3), 200, np.uint8)
    label = np.ones((1, 30, 50), np.uint8)
    img, m = t(image, label, rng(), "query")
    nh, nw = pfenet_pad_size(30, 50, 41)
    assert (nh, nw) == (24, 40)
    raw = denormalize(img)
    assert torch.allclose(raw[:, :nh, :nw], torch.full((3, nh, nw), 200.0), atol=0.1)
    assert raw[:, nh:, :].abs().max() < 1e-3 and raw[:, :, nw:].abs().max() < 1e-3  # zero pixels
    assert (m[0, :nh, :nw] == 1).all() and (m[0, nh:] == 255).all() and (m[0, :, nw:] == 255).all()


def test_square_mode_does_not_keep_aspect():
    t = TestTransform("square", 33)
    label = np.zeros((1, 20, 60), np.uint8)
    label[0, :, 30:] = 1
    img, m = t(striped_image(20, 60), label, rng(), "support")
    assert img.shape == (3, 33, 33) and m.shape == (1, 33, 33)
    assert (m[0, :, :15] == 0).all() and (m[0, :, 18:] == 1).all()
    with pytest.raises(ConfigError, match="square"):
        TestTransform("bogus", 33)


def test_to_original_resolution_and_label_square():
    logits = torch.randn(2, 2, 41, 41)
    out = to_original_resolution(logits, (30, 50))
    assert out.shape == (2, 2, 50, 50)
    # align_corners=True keeps the corner values
    assert torch.allclose(out[..., 0, 0], logits[..., 0, 0]) and torch.allclose(out[..., -1, -1], logits[..., -1, -1])
    assert to_original_resolution(logits, torch.tensor([30, 50]), "square").shape == (2, 2, 30, 50)
    label = torch.randint(0, 2, (30, 50))
    sq = pad_label_square(label, 50)
    assert sq.shape == (50, 50) and torch.equal(sq[:30], label) and (sq[30:] == 255).all()
    with pytest.raises(ValueError):
        pad_label_square(label, 40)


def test_original_resolution_pairs_per_element():
    logits = torch.randn(2, 2, 33, 33)
    labels = torch.full((2, 60, 60), 255, dtype=torch.long)
    labels[0, :40, :56] = 1
    labels[1, :60, :44] = 0
    sizes = torch.tensor([[40, 56], [60, 44]])
    pairs = list(original_resolution_pairs(logits, labels, sizes))
    assert [p[0].shape for p in pairs] == [(1, 2, 56, 56), (1, 2, 60, 60)]
    assert [p[1].shape for p in pairs] == [(1, 56, 56), (1, 60, 60)]
    assert (pairs[0][1][0, 40:] == 255).all() and (pairs[0][1][0, :40] == 1).all()
    sq = list(original_resolution_pairs(logits, labels, sizes, "square"))
    assert sq[1][0].shape == (1, 2, 60, 44) and sq[1][1].shape == (1, 60, 44)


def test_named_presets():
    image, label = striped_image(30, 50), np.zeros((1, 30, 50), np.uint8)
    for preset, size in [("panet", 33), ("hsnet", 35), ("canet", 33), ("pfenet", 33)]:
        t = build_train_transform(preset, "synthetic", size=size)
        for role in ("query", "support"):
            img, m = t(image, label, rng(3), role)
            assert img.shape == (3, size, size) and m.shape == (1, size, size)
    assert build_train_transform("pfenet", "coco").size == 641
    assert build_train_transform("pfenet", "coco").scale_range == (0.8, 1.25)
    assert build_train_transform("pfenet", "pascal").scale_range == (0.9, 1.1)
    assert build_train_transform("panet", "pascal").size == 417
    img, m = build_train_transform("none")(image, label, rng(), "query")
    assert img.shape == (3, 30, 50)
    # hsnet: no augmentation -> independent of the generator
    t = build_train_transform("hsnet", size=33)
    assert torch.equal(t(image, label, rng(1))[0], t(image, label, rng(2))[0])
    with pytest.raises(ConfigError, match="pfenet, panet"):
        build_train_transform("fancy")


@pytest.mark.parametrize("size", [33, 61])  # shrinking (anti-aliased) and enlarging
def test_panet_and_hsnet_resize_the_uint8_image_as_pil(size):
    """PANet / HSNet resize PIL images: PIL's bilinear filter on uint8, then normalisation;
    masks as PIL's NEAREST (PANet's PIL labels) or torch's nearest, floor(dst * src / dst)
    (HSNet's mask tensors); antialias=False is cv2.resize."""
    image, label = striped_image(40, 50), np.zeros((1, 40, 50), np.uint8)
    label[0, 10:31, 21:45] = 1
    label[0, 10:31, 21] = 255
    pil = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
    pil_nearest = np.asarray(Image.fromarray(label[0]).resize((size, size), Image.Resampling.NEAREST))
    floor = torch.nn.functional.interpolate(torch.from_numpy(label)[None].float(), (size, size), mode="nearest")
    for preset, nearest in (("panet", pil_nearest), ("hsnet", floor[0, 0].numpy())):
        t = build_train_transform(preset, size=size, flip_p=0.0)
        img, m = t(image, label, rng(), "support")
        assert torch.equal(img, normalize(image_to_tensor(pil))), preset
        assert torch.equal(m[0], torch.from_numpy(np.array(nearest)).long()), preset
    assert not np.array_equal(pil_nearest, floor[0, 0].numpy())
    img, _ = build_train_transform("panet", size=size, flip_p=0.0, antialias=False)(image, label, rng(), "query")
    linear = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    assert torch.equal(img, normalize(image_to_tensor(linear)))
    assert not np.array_equal(linear, pil)


def test_mask_nearest_option():
    image, label = striped_image(40, 50), np.zeros((1, 40, 50), np.uint8)
    label[0, 10:31, 21:45] = 1
    t = build_train_transform("canet", size=33, mask_nearest="floor")
    _, m = t(image, label, rng(), "query")
    assert torch.equal(m[0], torch.from_numpy(cv2.resize(label[0], (33, 33), interpolation=cv2.INTER_NEAREST)).long())
    with pytest.raises(ConfigError, match="unknown mask_nearest 'round'; choose one of: floor, centre"):
        build_train_transform("panet", mask_nearest="round")


def test_canet_support_crop_vs_query_resize():
    t = CANetTrainTransform(size=33)
    image = striped_image(40, 40)
    label = np.zeros((1, 40, 40), np.uint8)
    q1, _ = t(image, label, rng(1), "query")
    q2, _ = t(image, label, rng(2), "query")
    assert torch.equal(q1, q2)  # query: plain resize
    s = [t(image, label, rng(seed), "support")[0] for seed in range(4)]
    assert any(not torch.equal(s[0], x) for x in s[1:])  # support: random scale/crop/flip


@pytest.mark.parametrize("size", [(375, 500, 472, 352), (48, 48, 49, 49), (60, 70, 33, 33)])
def test_test_time_resize_pad_and_normalise_equal_torchvisions(size):
    """The test modes compute resize, pad and normalisation with torch.nn.functional, the calls
    torchvision makes (so that no `fss` process pays torchvision's import): the same values."""
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import InterpolationMode

    from fss.data import transforms as T

    h, w, height, width = size
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, h, w, generator=g) * 255
    for antialias in (False, True):
        ours, _ = T.resize_pair(image, torch.zeros(1, h, w, dtype=torch.uint8), height, width, antialias=antialias)
        assert torch.equal(ours, TF.resize(image, [height, width], interpolation=InterpolationMode.BILINEAR,
                                           antialias=antialias))
    for dtype in (torch.uint8, torch.int64):
        masks = torch.randint(0, 256, (2, h, w), generator=g).to(dtype)
        _, ours = T.resize_pair(image, masks, height, width)
        reference = TF.resize(masks, [height, width], interpolation=InterpolationMode.NEAREST)
        assert ours.dtype == dtype and torch.equal(ours, reference)
    assert torch.equal(T.normalize(image), TF.normalize(image, list(T.MEAN_PIXEL_255), [s * 255.0 for s in T.IMAGENET_STD]))
    label = torch.randint(0, 21, (h, w), generator=g)
    side = max(h, w) + 3
    assert torch.equal(pad_label_square(label, side),
                       TF.pad(label.reshape(1, h, w), [0, 0, side - w, side - h], fill=255).reshape(side, side))


def test_fss_does_not_import_torchvision():
    """Every graph stage and fold is an `fss` process; torchvision's import (torchvision.ops pulls
    in torch._dynamo) cost each of them 1.3 s on the 2-core machine."""
    import subprocess
    import sys

    code = "import sys, pipeline.cli; sys.exit('torchvision' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, "importing pipeline.cli imports torchvision"
