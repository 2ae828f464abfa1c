"""The geometric primitives of fss.data.transforms (torchvision.transforms.v2.functional with
the reference codebases' settings) against an independent plain-torch formulation of each
operation's reference semantics: half-pixel bilinear / floor-nearest resize, counter-clockwise
rotation about the centre with per-channel fill, reflect-101 Gaussian blur with the cv2
sigma rule."""

import pytest
import torch
import torch.nn.functional as nnf

from fss.data import transforms as T


def reference_resize(x, height, width, mode, antialias=False):
    if mode == "nearest":
        return nnf.interpolate(x[None], size=(height, width), mode="nearest")[0]
    return nnf.interpolate(x[None], size=(height, width), mode="bilinear", align_corners=False,
                           antialias=antialias)[0]


def reference_rotate(x, angle, mode, fill):
    """Inverse mapping: an output pixel at ``(u, v)`` from the centre (pixel centres, y down)
    samples the input at ``(u cos a - v sin a, u sin a + v cos a)``; out-of-image weight is an
    extra all-ones channel: bilinear blends ``fill`` in by the missing weight, nearest takes
    ``fill`` where less than half of the weight is inside."""
    channels, height, width = x.shape
    theta = torch.deg2rad(torch.tensor(float(angle), dtype=torch.float64))
    cos_a, sin_a = float(torch.cos(theta)), float(torch.sin(theta))
    u = torch.linspace((1.0 - width) * 0.5, (width - 1.0) * 0.5, width)
    v = torch.linspace((1.0 - height) * 0.5, (height - 1.0) * 0.5, height)
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    grid = torch.stack(((uu * cos_a - vv * sin_a) / (0.5 * width),
                        (uu * sin_a + vv * cos_a) / (0.5 * height)), dim=-1)[None]
    values = torch.cat((x.float(), torch.ones(1, height, width)), dim=0)
    out = nnf.grid_sample(values[None], grid, mode=mode, padding_mode="zeros", align_corners=False)[0]
    out, inside = out[:channels], out[channels:]
    fill_t = torch.tensor([float(f) for f in fill]).view(-1, 1, 1)
    if mode == "nearest":
        out = torch.where(inside < 0.5, fill_t.expand_as(out), out)
    else:
        out = (out - fill_t) * inside + fill_t
    return out if torch.is_floating_point(x) else out.round().to(x.dtype)


def reference_blur(image, size):
    """Separable Gaussian, sigma ``0.3 * ((size - 1) / 2 - 1) + 0.8``, reflect-101 borders."""
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    offsets = torch.arange(size, dtype=torch.float32) - (size - 1) / 2.0
    k1 = torch.exp(-(offsets ** 2) / (2.0 * sigma * sigma))
    k1 = k1 / k1.sum()
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


@pytest.mark.parametrize("angle", [-9.3, 4.0, 7.77])
def test_rotate_matches_reference(pair, angle):
    image, masks = pair
    fill = list(T.MEAN_PIXEL_255)
    ours = T.rotate_about_centre(image, angle, "bilinear", fill)
    # torchvision builds its sampling grid with another float32 operation order: up to
    # 1.2e-3 grey levels apart here (0..255 scale), 3.5e-3 over random sizes and angles
    torch.testing.assert_close(ours, reference_rotate(image, angle, "bilinear", fill), atol=5e-3, rtol=0)
    ours_m = T.rotate_about_centre(masks, angle, "nearest", [255, 255])
    ref_m = reference_rotate(masks, angle, "nearest", [255, 255])
    assert ours_m.dtype == torch.uint8
    # identical up to pixels sampled exactly on a rounding boundary
    assert (ours_m != ref_m).float().mean() < 0.002
    assert (ours_m == 255).any()  # corners came from outside the image


def test_rotate_direction_is_counter_clockwise():
    x = torch.zeros(1, 21, 21)
    x[0, 10, 15:] = 1.0  # a ray pointing right from the centre
    out = T.rotate_about_centre(x, 90.0, "nearest", [0.0])
    assert out[0, :6, 10].sum() == 6 and out[0, 10, 15:].sum() == 0  # now pointing up


def test_gaussian_blur_matches_reference(pair):
    image, _ = pair
    ours = T.gaussian_blur(image, 5)
    assert torch.allclose(ours, reference_blur(image, 5), atol=1e-3)
    assert not torch.allclose(ours, image)
