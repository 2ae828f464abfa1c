"""Episode image transforms: training augmentation presets, test resize modes, and the
helpers that score predictions at the original resolution (protocol section 4).

Conventions
-----------
* A transform is called once per image of an episode (query and every support apart) as
  ``transform(image, masks, rng, role)`` with ``image`` ``uint8 [H, W, 3]`` (RGB),
  ``masks`` ``uint8 [M, H, W]`` (``masks[0]`` is the episode's target label, 0/1/255 or
  0..N for N-way queries, further masks such as the query's base-class mask follow the
  same geometry), ``rng`` a :class:`numpy.random.Generator` holding ALL the randomness of
  the call (so episodes are reproducible whatever the DataLoader workers), and ``role``
  ``"query"`` or ``"support"``. It returns the ImageNet-normalised image ``float32
  [3, S, S]`` and the masks ``int64 [M, S, S]``.
* Internally images are float tensors on the 0..255 scale (PFENet converts to float32
  before augmenting); normalisation is the last step. Masks are padded with 255 (ignore).
* Images use bilinear interpolation, masks nearest. PFENet (cv2) resizes without
  anti-aliasing; PANet/HSNet/CANet resize PIL images, which anti-aliases when shrinking:
  each preset's ``antialias`` default follows its reference.
* Resize, rotate, blur, flip, pad, crop and normalisation are
  ``torchvision.transforms.v2.functional`` called with the reference codebases' settings
  (the tests check those settings against an independent formulation of each operation).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from fss.data.classes import IGNORE_INDEX
from fss.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the ImageNet mean pixel on the 0..255 scale: rotation and crop padding value (pfenet)
MEAN_PIXEL_255 = tuple(m * 255.0 for m in IMAGENET_MEAN)

TRAIN_AUG_PRESETS = ("pfenet", "panet", "hsnet", "canet", "none")
TEST_RESIZE_MODES = ("pfenet_pad", "square")

#: default training crop / resize side per preset and dataset (protocol section 4)
DEFAULT_TRAIN_SIZE = {
    "pfenet": {"pascal": 473, "synthetic": 473, "coco": 641},
    "panet": {"pascal": 417, "synthetic": 417, "coco": 417},
    "hsnet": {"pascal": 400, "synthetic": 400, "coco": 400},
    "canet": {"pascal": 321, "synthetic": 321, "coco": 321},
}
#: pfenet RandScale range per dataset
PFENET_SCALE = {"pascal": (0.9, 1.1), "synthetic": (0.9, 1.1), "coco": (0.8, 1.25)}


# ---------------------------------------------------------------- tensor conversions


def _writable(array: np.ndarray, dtype) -> np.ndarray:
    """A contiguous, writable array (PIL-backed arrays are read-only)."""
    array = np.ascontiguousarray(array, dtype=dtype)
    return array if array.flags.writeable else array.copy()


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``uint8 [H, W, 3]`` -> ``float32 [3, H, W]`` on the 0..255 scale."""
    return torch.from_numpy(_writable(image, np.uint8)).permute(2, 0, 1).float()


def masks_to_tensor(masks: np.ndarray) -> torch.Tensor:
    """``uint8 [M, H, W]`` (or ``[H, W]``) -> ``uint8 [M, H, W]`` tensor."""
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    return torch.from_numpy(_writable(masks, np.uint8))


def normalize(image255: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of a 0..255 image: ``(x / 255 - mean) / std``."""
    return TF.normalize(image255, list(MEAN_PIXEL_255), [s * 255.0 for s in IMAGENET_STD])


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize` (back to 0..255) for ``[3,H,W]`` or ``[B,3,H,W]``."""
    # torchvision has no inverse of normalize
    mean = image.new_tensor(MEAN_PIXEL_255).view(3, 1, 1)
    std = image.new_tensor([s * 255.0 for s in IMAGENET_STD]).view(3, 1, 1)
    return image * std + mean


# ---------------------------------------------------------------- geometric primitives


def resize_pair(image: torch.Tensor, masks: torch.Tensor, height: int, width: int,
                antialias: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize image and masks to ``height x width``: the image bilinear with half-pixel
    centres (cv2 ``INTER_LINEAR`` when ``antialias`` is off, PIL's when on), the masks
    nearest (torchvision's NEAREST: source index ``floor(dst * scale)``, as cv2
    ``INTER_NEAREST``), so labels stay exact and 255 stays 255."""
    if image.shape[-2:] == (height, width):
        return image, masks
    size = [int(height), int(width)]
    return (TF.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=antialias),
            TF.resize(masks, size, interpolation=InterpolationMode.NEAREST))


def rotate_about_centre(x: torch.Tensor, angle: float, mode: str, fill) -> torch.Tensor:
    """Rotate ``[C, H, W]`` by ``angle`` degrees counter-clockwise about the image centre,
    same size (``mode`` ``"bilinear"`` or ``"nearest"``); pixels from outside the image get
    ``fill`` (one value per channel): bilinear blends it in by the out-of-image weight,
    nearest takes it where less than half of the weight is inside. Integer inputs are
    rounded back to their dtype."""
    return TF.rotate(x, float(angle), interpolation=InterpolationMode(mode),
                     fill=[float(f) for f in fill])


def gaussian_blur(image: torch.Tensor, size: int, sigma: float | None = None) -> torch.Tensor:
    """Blur a float ``[C, H, W]`` image with a ``size x size`` Gaussian, borders reflected
    without repeating the edge (cv2's default ``BORDER_REFLECT_101``); ``sigma`` defaults to
    the kernel-size rule of cv2/torchvision ``0.3 * ((size - 1) / 2 - 1) + 0.8``."""
    return TF.gaussian_blur(image, [size, size], None if sigma is None else [sigma, sigma])


def rand_scale(image, masks, rng: np.random.Generator, scale_range=(0.9, 1.1), antialias=False):
    """pfenet RandScale: one factor ``U(scale_range)`` for both sides (aspect kept);
    new side = round(side * factor) as cv2.resize with fx/fy."""
    factor = scale_range[0] + (scale_range[1] - scale_range[0]) * rng.random()
    h, w = masks.shape[-2:]
    new_h, new_w = max(1, int(round(h * factor))), max(1, int(round(w * factor)))
    return resize_pair(image, masks, new_h, new_w, antialias=antialias)


def rand_rotate(image, masks, rng: np.random.Generator, angle_range=(-10.0, 10.0), p=0.5,
                image_fill=MEAN_PIXEL_255, ignore_index=IGNORE_INDEX):
    """pfenet RandRotate: with probability ``p`` rotate by ``U(angle_range)`` degrees about
    the image centre, same size; the image is padded with ``image_fill`` (the ImageNet mean
    pixel), the masks with 255."""
    if rng.random() < p:
        angle = angle_range[0] + (angle_range[1] - angle_range[0]) * rng.random()
        image = rotate_about_centre(image, angle, "bilinear", image_fill)
        masks = rotate_about_centre(masks, angle, "nearest", [ignore_index] * masks.shape[0])
    return image, masks


def rand_gaussian_blur(image, rng: np.random.Generator, radius=5, p=0.5):
    """pfenet RandomGaussianBlur: ``radius x radius`` kernel, sigma from the kernel size as
    cv2 (``0.3 * ((k - 1) / 2 - 1) + 0.8``), p = 0.5."""
    if rng.random() < p:
        image = gaussian_blur(image, radius)
    return image


def rand_hflip(image, masks, rng: np.random.Generator, p=0.5):
    """Horizontal flip of image and masks together with probability ``p``."""
    if rng.random() < p:
        image, masks = TF.horizontal_flip(image), TF.horizontal_flip(masks)
    return image, masks


def pad_to_at_least(image, masks, size: int, image_fill=MEAN_PIXEL_255,
                    ignore_index=IGNORE_INDEX, centered: bool = True):
    """Pad so both sides are >= ``size``: image with ``image_fill``, masks with 255.

    ``centered`` (pfenet Crop): half of the padding above/left (rounded down), the rest
    below/right. Otherwise everything goes bottom/right.
    """
    h, w = masks.shape[-2:]
    pad_h, pad_w = max(size - h, 0), max(size - w, 0)
    if pad_h == 0 and pad_w == 0:
        return image, masks
    top, left = (pad_h // 2, pad_w // 2) if centered else (0, 0)
    sides = [left, top, pad_w - left, pad_h - top]
    return (TF.pad(image, sides, fill=[float(f) for f in image_fill]),
            TF.pad(masks, sides, fill=ignore_index))


def random_crop_keeping_foreground(image, masks, size: int, rng: np.random.Generator, *,
                                   min_keep: float = 0.85, max_retries: int = 31,
                                   image_fill=MEAN_PIXEL_255, ignore_index=IGNORE_INDEX):
    """pfenet Crop(crop_type='rand'): pad to ``size`` if smaller, take a random
    ``size x size`` crop, and re-draw it while it holds fewer than ``min_keep`` of the
    (padded) label's ``== 1`` pixels (``masks[0]``).

    PFENet's loop is ``while pos < 0.85 * raw_pos and crop_cnt <= 30``, i.e. at most 31
    re-draws, hence ``max_retries=31``; the last draw is kept either way.
    Returns ``(image, masks, retries)``.
    """
    image, masks = pad_to_at_least(image, masks, size, image_fill, ignore_index, centered=True)
    h, w = masks.shape[-2:]
    raw_pos = int((masks[0] == 1).sum())

    def draw():
        top = int(rng.integers(0, h - size + 1))
        left = int(rng.integers(0, w - size + 1))
        crop_m = TF.crop(masks, top, left, size, size)
        return TF.crop(image, top, left, size, size), crop_m, int((crop_m[0] == 1).sum())

    crop_i, crop_m, pos = draw()
    retries = 0
    while pos < min_keep * raw_pos and retries < max_retries:
        crop_i, crop_m, pos = draw()
        retries += 1
    return crop_i, crop_m, retries


def pfenet_pad_size(height: int, width: int, size: int) -> tuple[int, int]:
    """PFENet ``Resize`` (resized_val) new size: the longer side becomes ``size`` (the
    shorter ``int(side * size / longer)``), then EACH side is rounded down to a multiple of 8
    (so 473 -> 472: the pasted image never fills the canvas's last row/column)."""
    if height >= width:
        new_h, new_w = size, int(width * (size * 1.0 / height))
    else:
        new_h, new_w = int(height * (size * 1.0 / width)), size
    return max(8, (new_h // 8) * 8), max(8, (new_w // 8) * 8)


def resize_pad_top_left(image, masks, size: int):
    """pfenet_pad test mode: resize by :func:`pfenet_pad_size`, paste top-left on a
    ``size x size`` canvas of ZERO pixels (before normalisation) and 255 labels."""
    h, w = masks.shape[-2:]
    new_h, new_w = pfenet_pad_size(h, w, size)
    image, masks = resize_pair(image, masks, new_h, new_w, antialias=False)
    sides = [0, 0, size - new_w, size - new_h]
    return TF.pad(image, sides, fill=0.0), TF.pad(masks, sides, fill=IGNORE_INDEX)


# ---------------------------------------------------------------- episode transforms


class EpisodeTransform:
    """Base class: ``__call__(image uint8 [H,W,3], masks uint8 [M,H,W], rng, role)``."""

    name = "?"

    def __call__(self, image: np.ndarray, masks: np.ndarray, rng: np.random.Generator,
                 role: str = "query") -> tuple[torch.Tensor, torch.Tensor]:
        img, m = self.geometric(image_to_tensor(image), masks_to_tensor(masks), rng, role)
        return normalize(img), m.long()

    def geometric(self, image, masks, rng, role):
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


class PFENetTrainTransform(EpisodeTransform):
    """pfenet training augmentation (protocol section 4), for query and supports alike:
    RandScale -> RandRotate (p=0.5, mean/255 padding) -> Gaussian blur (p=0.5) -> h-flip
    (p=0.5) -> random crop with the 85% foreground retry -> normalisation."""

    name = "pfenet"

    def __init__(self, size: int = 473, scale_range=(0.9, 1.1), rotate_range=(-10.0, 10.0),
                 rotate_p: float = 0.5, blur_radius: int = 5, blur_p: float = 0.5,
                 flip_p: float = 0.5, crop_min_keep: float = 0.85, crop_max_retries: int = 31):
        self.size = int(size)
        self.scale_range = tuple(scale_range)
        self.rotate_range = tuple(rotate_range)
        self.rotate_p = rotate_p
        self.blur_radius = blur_radius
        self.blur_p = blur_p
        self.flip_p = flip_p
        self.crop_min_keep = crop_min_keep
        self.crop_max_retries = crop_max_retries

    def geometric(self, image, masks, rng, role):
        image, masks = rand_scale(image, masks, rng, self.scale_range)
        image, masks = rand_rotate(image, masks, rng, self.rotate_range, self.rotate_p)
        image = rand_gaussian_blur(image, rng, self.blur_radius, self.blur_p)
        image, masks = rand_hflip(image, masks, rng, self.flip_p)
        image, masks, _ = random_crop_keeping_foreground(
            image, masks, self.size, rng, min_keep=self.crop_min_keep,
            max_retries=self.crop_max_retries)
        return image, masks


class ResizeFlipTransform(EpisodeTransform):
    """Resize to ``size x size`` (aspect not kept) then h-flip with ``flip_p``:
    panet (flip 0.5) and hsnet (flip 0, i.e. no augmentation)."""

    def __init__(self, size: int, flip_p: float = 0.5, antialias: bool = True, name: str = "panet"):
        self.size = int(size)
        self.flip_p = flip_p
        self.antialias = antialias
        self.name = name

    def geometric(self, image, masks, rng, role):
        image, masks = resize_pair(image, masks, self.size, self.size, antialias=self.antialias)
        if self.flip_p > 0:
            image, masks = rand_hflip(image, masks, rng, self.flip_p)
        return image, masks


class CANetTrainTransform(EpisodeTransform):
    """canet: a support is resized to a random square of side ``int(U(1, 1.5) * size)``,
    randomly cropped to ``size`` and h-flipped (p=0.5); the query is resized to ``size``."""

    name = "canet"

    def __init__(self, size: int = 321, scale_range=(1.0, 1.5), flip_p: float = 0.5,
                 antialias: bool = True):
        self.size = int(size)
        self.scale_range = tuple(scale_range)
        self.flip_p = flip_p
        self.antialias = antialias

    def geometric(self, image, masks, rng, role):
        if role == "query":
            return resize_pair(image, masks, self.size, self.size, antialias=self.antialias)
        u = self.scale_range[0] + (self.scale_range[1] - self.scale_range[0]) * rng.random()
        side = max(self.size, int(u * self.size))
        image, masks = resize_pair(image, masks, side, side, antialias=self.antialias)
        top = int(rng.integers(0, side - self.size + 1))
        left = int(rng.integers(0, side - self.size + 1))
        image = TF.crop(image, top, left, self.size, self.size)
        masks = TF.crop(masks, top, left, self.size, self.size)
        return rand_hflip(image, masks, rng, self.flip_p)


class NoAugTransform(EpisodeTransform):
    """"none": normalisation only, original size kept (batch size 1 unless sizes agree)."""

    name = "none"

    def geometric(self, image, masks, rng, role):
        return image, masks


class TestTransform(EpisodeTransform):
    """Deterministic test-time resize (protocol section 4):

    * ``pfenet_pad``: :func:`resize_pad_top_left` (PFENet ``Resize``, cv2 bilinear, no
      anti-aliasing);
    * ``square``: image and label resized to ``size x size`` (hsnet 400, panet 417,
      canet 321), anti-aliased by default as the PIL resize of those codebases.
    """

    __test__ = False  # not a pytest class

    def __init__(self, mode: str = "pfenet_pad", size: int = 473, antialias: bool | None = None):
        if mode not in TEST_RESIZE_MODES:
            raise ConfigError(
                f"unknown test resize mode {mode!r}; choose one of: {', '.join(TEST_RESIZE_MODES)}."
            )
        self.mode = mode
        self.name = mode
        self.size = int(size)
        self.antialias = (mode == "square") if antialias is None else bool(antialias)

    def geometric(self, image, masks, rng, role):
        if self.mode == "pfenet_pad":
            return resize_pad_top_left(image, masks, self.size)
        return resize_pair(image, masks, self.size, self.size, antialias=self.antialias)


def build_train_transform(preset: str, dataset: str = "pascal", size: int | None = None,
                          **options) -> EpisodeTransform:
    """A named training augmentation pipeline; ``size`` defaults per preset and dataset
    (pfenet 473 / COCO 641, panet 417, hsnet 400, canet 321); ``options`` go to the class
    (e.g. ``scale_range`` for pfenet, which defaults to [0.9, 1.1] / COCO [0.8, 1.25])."""
    if preset not in TRAIN_AUG_PRESETS:
        raise ConfigError(
            f"unknown augmentation preset {preset!r}; choose one of: {', '.join(TRAIN_AUG_PRESETS)}."
        )
    if preset == "none":
        return NoAugTransform()
    if size is None:
        size = DEFAULT_TRAIN_SIZE[preset].get(dataset, DEFAULT_TRAIN_SIZE[preset]["pascal"])
    try:
        if preset == "pfenet":
            options.setdefault("scale_range", PFENET_SCALE.get(dataset, PFENET_SCALE["pascal"]))
            return PFENetTrainTransform(size=size, **options)
        if preset == "panet":
            return ResizeFlipTransform(size, flip_p=options.pop("flip_p", 0.5), name="panet", **options)
        if preset == "hsnet":
            return ResizeFlipTransform(size, flip_p=options.pop("flip_p", 0.0), name="hsnet", **options)
        return CANetTrainTransform(size=size, **options)
    except TypeError as exc:
        raise ConfigError(f"bad option for augmentation preset {preset!r}: {exc}.") from None


def build_test_transform(mode: str = "pfenet_pad", size: int = 473, antialias: bool | None = None
                         ) -> TestTransform:
    return TestTransform(mode, size, antialias)


# ---------------------------------------------------------------- original-resolution scoring


def _size_pair(original_size) -> tuple[int, int]:
    if isinstance(original_size, torch.Tensor):
        t = original_size.reshape(-1, 2)
        if not bool((t == t[0]).all()):
            raise ValueError("to_original_resolution needs one original size per call; "
                             "iterate over the batch with original_resolution_pairs")
        return int(t[0, 0]), int(t[0, 1])
    h, w = original_size
    return int(h), int(w)


def to_original_resolution(logits: torch.Tensor, original_size,
                           resize_mode: str = "pfenet_pad") -> torch.Tensor:
    """Upsample test logits to the original image's geometry (bilinear, align_corners=True).

    ``pfenet_pad`` (PFENet ``ori_resize``): to a square of side L = the original longer side,
    ``[B, C, L, L]``, to be compared with :func:`pad_label_square`. ``square`` (HSNet's
    original-size option): straight to ``[B, C, h, w]``. ``original_size`` is ``(h, w)``.
    """
    h, w = _size_pair(original_size)
    target = (max(h, w),) * 2 if resize_mode == "pfenet_pad" else (h, w)
    # torchvision's resize has no align_corners=True, which PFENet's ori_resize scoring uses
    return nnf.interpolate(logits, size=target, mode="bilinear", align_corners=True)


def pad_label_square(label: torch.Tensor, side: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Pad a label ``[..., h, w]`` bottom/right with 255 to ``[..., side, side]``."""
    h, w = label.shape[-2:]
    if h > side or w > side:
        raise ValueError(f"label {h}x{w} does not fit a {side}x{side} square")
    # torchvision pads [..., C, H, W]: a bare [h, w] label goes through as one channel
    padded = TF.pad(label.reshape(-1, h, w), [0, 0, side - w, side - h], fill=ignore_index)
    return padded.reshape(*label.shape[:-2], side, side)


def original_resolution_pairs(logits: torch.Tensor, labels: torch.Tensor, original_sizes: torch.Tensor,
                              resize_mode: str = "pfenet_pad"):
    """Yield ``(logits_b [1,C,*,*], target_b [1,*,*])`` per batch element at the original
    resolution, from a batch made by :func:`fss.data.episodes.collate_episodes` (whose
    ``query_label_original`` is padded with 255 to the batch's largest square)."""
    for b in range(logits.shape[0]):
        h, w = int(original_sizes[b, 0]), int(original_sizes[b, 1])
        out = to_original_resolution(logits[b:b + 1], (h, w), resize_mode)
        label = labels[b:b + 1, :h, :w]
        if resize_mode == "pfenet_pad":
            label = pad_label_square(label, max(h, w))
        yield out, label.to(logits.device)
