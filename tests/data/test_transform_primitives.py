"""The geometric primitives of fss.data.transforms (cv2 / PIL on arrays for training,
torchvision.transforms.v2.functional on tensors for the test modes) against an independent
plain-torch formulation of each operation's reference semantics: half-pixel bilinear /
floor-nearest resize, cv2.resize(fx, fy)'s scaling, counter-clockwise rotation about PFENet's
(w / 2, h / 2) with per-channel fill, reflect-101 Gaussian blur with the cv2 sigma rule."""

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from PIL import Image

from fss.data import transforms as T


def reference_resize(x, height, width, mode, antialias=False):
    if mode == "nearest":
        return nnf.interpolate(x[None], size=(height, width), mode="nearest")[0]
    return nnf.interpolate(x[None], size=(height, width), mode="bilinear", align_corners=False,
                           antialias=antialias)[0]


def reference_rotate(x, angle, mode, fill, centre=None):
    """Inverse mapping: an output pixel at ``(u, v)`` from the centre (pixel centres at
    integers, y down; default PFENet's ``(w / 2, h / 2)``) samples the input at
    ``(u cos a - v sin a, u sin a + v cos a)`` from it; taps outside the image read
    ``fill`` (cv2's BORDER_CONSTANT): the in-image weight is an extra all-ones channel,
    bilinear adds ``fill`` times the missing weight, nearest takes ``fill`` where less than
    half of the weight is inside."""
    channels, height, width = x.shape
    cx, cy = (width / 2, height / 2) if centre is None else centre
    theta = torch.deg2rad(torch.tensor(float(angle), dtype=torch.float64))
    cos_a, sin_a = float(torch.cos(theta)), float(torch.sin(theta))
    u = torch.arange(width, dtype=torch.float64) - cx
    v = torch.arange(height, dtype=torch.float64) - cy
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    src_x, src_y = cx + uu * cos_a - vv * sin_a, cy + uu * sin_a + vv * cos_a
    # grid_sample, align_corners=False: pixel i's centre is at (2 i + 1) / size - 1
    grid = torch.stack(((2 * src_x + 1) / width - 1, (2 * src_y + 1) / height - 1), dim=-1)[None].float()
    values = torch.cat((x.float(), torch.ones(1, height, width)), dim=0)
    out = nnf.grid_sample(values[None], grid, mode=mode, padding_mode="zeros", align_corners=False)[0]
    out, inside = out[:channels], out[channels:]
    fill_t = torch.tensor([float(f) for f in fill]).view(-1, 1, 1)
    if mode == "nearest":
        out = torch.where(inside < 0.5, fill_t.expand_as(out), out)
    else:
        out = out + (1 - inside) * fill_t
    return out if torch.is_floating_point(x) else out.round().to(x.dtype)


def reference_scale(x, factor, mode):
    """cv2.resize(fx = fy = factor): size round(side * factor), source coordinate
    (dst + 0.5) / factor - 0.5 clamped to the image (bilinear), floor(dst / factor) (nearest)."""
    channels, height, width = x.shape
    new_h, new_w = round(height * factor), round(width * factor)
    if mode == "nearest":
        rows = np.minimum(np.floor(np.arange(new_h) * (1.0 / factor)).astype(int), height - 1)
        cols = np.minimum(np.floor(np.arange(new_w) * (1.0 / factor)).astype(int), width - 1)
        return x[:, rows][:, :, cols]
    src_x = (torch.arange(new_w, dtype=torch.float64) + 0.5) / factor - 0.5
    src_y = (torch.arange(new_h, dtype=torch.float64) + 0.5) / factor - 0.5
    yy, xx = torch.meshgrid(src_y, src_x, indexing="ij")
    grid = torch.stack(((2 * xx + 1) / width - 1, (2 * yy + 1) / height - 1), dim=-1)[None].float()
    return nnf.grid_sample(x[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def pil_two_pass(image_u8, height, width):
    """PIL's uint8 bilinear resize as two anti-aliased passes, width first, each rounded
    half up to uint8."""
    x = torch.from_numpy(image_u8.copy()).permute(2, 0, 1).float()
    x = torch.floor(reference_resize(x, x.shape[1], width, "bilinear", antialias=True) + 0.5).clamp(0, 255)
    return torch.floor(reference_resize(x, height, width, "bilinear", antialias=True) + 0.5).clamp(0, 255)


def chw(image):
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def hwc(x):
    return np.ascontiguousarray(x.permute(1, 2, 0).numpy())


def reference_blur(image, size):
    """Separable Gaussian with cv2's kernel for sigma 0 at PFENet's size 5: OpenCV takes
    small kernels from a fixed table (``getGaussianKernel``), here the binomial
    ``[1, 4, 6, 4, 1] / 16``, not sigma ``0.3 * ((5 - 1) / 2 - 1) + 0.8 = 1.1``'s samples;
    reflect-101 borders."""
    assert size == 5, "the table's kernel is written out for size 5 only"
    k1 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
    channels, pad = image.shape[0], size // 2
    padded = nnf.pad(image[None], (pad, pad, pad, pad), mode="reflect")
    rows = nnf.conv2d(padded, k1.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)
    return nnf.conv2d(rows, k1.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)[0]


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 37, 45), generator=g).float()
    masks = torch.randint(0, 3, (2, 37, 45), generator=g).to(torch.uint8)
    masks[:, 10:20, 5:30] = 1
    return image, masks


@pytest.mark.parametrize("size,antialias", [((50, 61), False), ((20, 17), False), ((20, 17), True)])
def test_resize_matches_reference(pair, size, antialias):
    image, masks = pair
    ours_i, ours_m = T.resize_pair(image, masks, *size, antialias=antialias)
    assert torch.allclose(ours_i, reference_resize(image, *size, "bilinear", antialias), atol=1e-4)
    assert torch.equal(ours_m, reference_resize(masks, *size, "nearest")) and ours_m.dtype == torch.uint8


@pytest.mark.parametrize("size", [(50, 61), (20, 17)])
def test_array_resize_matches_reference(pair, size):
    image, masks = pair
    ours_i, ours_m = T.resize_arrays(hwc(image), masks.numpy(), *size)
    # cv2 interpolates float32 images with float32 weights: 5.5e-4 apart here
    torch.testing.assert_close(chw(ours_i), reference_resize(image, *size, "bilinear"), atol=1e-3, rtol=0)
    assert np.array_equal(ours_m, reference_resize(masks, *size, "nearest").numpy()) and ours_m.dtype == np.uint8


@pytest.mark.parametrize("size", [(50, 61), (20, 17), (31, 40)])
def test_array_antialias_resize_is_pils_two_passes(pair, size):
    image, masks = pair
    image_u8 = hwc(image.to(torch.uint8))
    ours_i, _ = T.resize_arrays(image_u8, masks.numpy(), *size, antialias=True)
    ref = pil_two_pass(image_u8, *size)
    diff = (chw(ours_i).float() - ref).abs()
    # PIL's 22-bit fixed-point weights round near-ties either way: up to 6% of the pixels
    # here, one grey level (one pass without the intermediate rounding: 17%)
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.1, (diff.max(), (diff > 0).float().mean())
    assert ours_i.dtype == np.uint8
    # float32 images go through PIL's mode F, unrounded
    ours_f, _ = T.resize_arrays(hwc(image), masks.numpy(), *size, antialias=True)
    torch.testing.assert_close(chw(ours_f), reference_resize(image, *size, "bilinear", antialias=True),
                               atol=1e-3, rtol=0)


@pytest.mark.parametrize("factor", [0.8, 0.9137, 1.0537, 1.25])
def test_scale_matches_cv2_fx_fy_formula(pair, factor):
    image, masks = pair
    ours_i, ours_m = T.scale_arrays(hwc(image), masks.numpy(), factor)
    ref = reference_scale(image, factor, "bilinear")
    assert ours_i.shape[:2] == ours_m.shape[-2:] == ref.shape[-2:]
    torch.testing.assert_close(chw(ours_i), ref, atol=1e-3, rtol=0)
    assert np.array_equal(ours_m, reference_scale(masks, factor, "nearest").numpy())
    # the size ratio's mapping (the torchvision version) is another resize: this tells them apart
    other = reference_resize(image, *ref.shape[-2:], "bilinear")
    assert (chw(ours_i) - other).abs().max() > 1e-2


@pytest.mark.parametrize("angle", [-9.3, 4.0, 7.77])
def test_rotate_matches_reference(pair, angle):
    image, masks = pair
    fill = list(T.MEAN_PIXEL_255)
    ours, ours_m = T.rotate_arrays(hwc(image), masks.numpy(), angle, fill)
    # cv2 samples float32 images at float coordinates (no 1/32-pixel fixed point here)
    torch.testing.assert_close(chw(ours), reference_rotate(image, angle, "bilinear", fill), atol=1e-3, rtol=0)
    # about the true centre ((w - 1) / 2, (h - 1) / 2) it is another rotation
    true_centre = reference_rotate(image, angle, "bilinear", fill, centre=(22.0, 18.0))
    assert (chw(ours) - true_centre).abs().max() > 1.0
    ref_m = reference_rotate(masks, angle, "nearest", [255, 255]).numpy()
    assert ours_m.dtype == np.uint8
    # identical up to pixels sampled exactly on a rounding boundary
    assert (ours_m != ref_m).mean() < 0.002
    assert (ours_m == 255).any()  # corners came from outside the image


def test_rotate_direction_is_counter_clockwise():
    x = np.zeros((21, 21, 1), np.float32)
    x[10, 15:] = 1.0  # a ray pointing right from pixel (10, 10)
    out, _ = T.rotate_arrays(x, np.zeros((1, 21, 21), np.uint8), 90.0, [0.0])
    # about (10.5, 10.5): (x, 10) -> (10, 21 - x); x = 15..20 -> rows 6..1 of column 10
    assert out[1:7, 10].sum() == 6 and out[10, 15:].sum() == 0 and out.sum() == 6


def test_gaussian_blur_matches_reference(pair):
    image, _ = pair
    ours = T.gaussian_blur(hwc(image), 5)
    torch.testing.assert_close(chw(ours), reference_blur(image, 5), atol=1e-4, rtol=0)
    assert not np.allclose(ours, hwc(image))
