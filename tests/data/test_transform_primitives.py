"""The plain-torch geometric primitives of fss.data.transforms compute what
torchvision.transforms.v2.functional computes (torchvision is imported here only)."""

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from fss.data import transforms as T


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 37, 45), generator=g).float()
    masks = torch.randint(0, 3, (2, 37, 45), generator=g).to(torch.uint8)
    masks[:, 10:20, 5:30] = 1
    return image, masks


@pytest.mark.parametrize("size,antialias", [((50, 61), False), ((20, 17), False), ((20, 17), True)])
def test_resize_matches_torchvision(pair, size, antialias):
    image, masks = pair
    ours_i, ours_m = T.resize_pair(image, masks, *size, antialias=antialias)
    ref_i = TF.resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=antialias)
    ref_m = TF.resize(masks, list(size), interpolation=InterpolationMode.NEAREST)
    assert torch.allclose(ours_i, ref_i, atol=1e-4)
    assert torch.equal(ours_m, ref_m) and ours_m.dtype == torch.uint8


@pytest.mark.parametrize("angle", [-9.3, 4.0, 7.77])
def test_rotate_matches_torchvision(pair, angle):
    image, masks = pair
    fill = list(T.MEAN_PIXEL_255)
    ours = T.rotate_about_centre(image, angle, "bilinear", fill)
    ref = TF.rotate(image, angle, interpolation=InterpolationMode.BILINEAR, fill=fill)
    assert torch.allclose(ours, ref, atol=1e-3)
    ours_m = T.rotate_about_centre(masks, angle, "nearest", [255, 255])
    ref_m = TF.rotate(masks, angle, interpolation=InterpolationMode.NEAREST, fill=[255.0, 255.0])
    assert ours_m.dtype == torch.uint8
    # identical up to pixels sampled exactly on a rounding boundary
    assert (ours_m != ref_m).float().mean() < 0.002
    assert (ours_m == 255).any()  # corners came from outside the image


def test_rotate_direction_is_counter_clockwise():
    x = torch.zeros(1, 21, 21)
    x[0, 10, 15:] = 1.0  # a ray pointing right from the centre
    out = T.rotate_about_centre(x, 90.0, "nearest", [0.0])
    assert out[0, :6, 10].sum() == 6 and out[0, 10, 15:].sum() == 0  # now pointing up


def test_gaussian_blur_matches_torchvision(pair):
    image, _ = pair
    ours = T.gaussian_blur(image, 5)
    ref = TF.gaussian_blur(image, [5, 5])
    assert torch.allclose(ours, ref, atol=1e-3)
    assert not torch.allclose(ours, image)


def test_library_does_not_import_torchvision():
    import subprocess
    import sys

    code = ("import sys, pipeline.cli, pipeline.train, pipeline.evaluate, fss.data.transforms, fss.models; "
            "from fss.models.registry import create_model; create_model('dpnet_pfenet', backbone='small', shot=1); "
            "print('torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
