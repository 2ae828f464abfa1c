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
  [3, S, S]`` and the masks ``int64 [M, S, S]``. Masks are padded with 255 (ignore).
* **Training presets** compute on numpy arrays (``[H, W, 3]`` images, ``[M, H, W]`` masks)
  with the reference codebases' own operations. pfenet, as PFENet's ``util/transform.py``:
  the image is float32 on the 0..255 scale (PFENet converts before augmenting);
  ``cv2.resize`` with ``fx = fy = factor`` (INTER_LINEAR image, INTER_NEAREST masks),
  ``cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1)`` + ``cv2.warpAffine`` (INTER_LINEAR /
  INTER_NEAREST, BORDER_CONSTANT with the mean pixel / 255), ``cv2.GaussianBlur((5, 5), 0)``
  (BORDER_REFLECT_101), ``cv2.flip``, and ``cv2.copyMakeBorder`` for the crop's padding.
  panet, hsnet and canet resize PIL images in their references, so their image stays uint8
  and is resized with PIL's bilinear filter (anti-aliased when shrinking;
  ``antialias=False`` uses ``cv2.resize`` INTER_LINEAR instead); their masks follow each
  reference's label resize: PIL's NEAREST (the source pixel under the destination pixel's
  centre, cv2 INTER_NEAREST_EXACT) for panet and canet, torch's ``nearest`` (``floor(dst *
  src / dst)``, cv2 INTER_NEAREST) for hsnet.
  The random draws (their order and count) are those of the torchvision implementation this
  replaced; only the arithmetic moved, to the references': the blur's kernel is cv2's table
  for sigma 0, the binomial ``[1, 4, 6, 4, 1] / 16`` (the torchvision version sampled a
  Gaussian of sigma 1.1); the rotation turns about PFENet's ``(w / 2, h / 2)`` (half a pixel
  right of and below the true centre, which the torchvision version used) and adds the fill
  by the out-of-image weight (torchvision also scaled the in-image part by the in-image
  weight); pfenet's resize maps coordinates with the drawn factor as ``cv2.resize(fx, fy)``
  does (not with the rounded size's ratio); panet/hsnet/canet images are rounded to uint8
  after resizing, as PIL does, and panet/canet masks are resized as PIL's NEAREST (the
  torchvision version used ``floor`` for every preset). cv2 runs on one thread
  (``cv2.setNumThreads(0)``, at import): see :data:`CV2_THREADS`.
* **Test resize modes** keep torch tensors (``torch.nn.functional``, the calls torchvision's
  resize and pad make, without importing torchvision):
  images bilinear without anti-aliasing for ``pfenet_pad`` (cv2 ``INTER_LINEAR``
  semantics), anti-aliased for ``square`` (the PIL resize of those codebases), masks
  nearest.
* Normalisation is the last step, ``(x - 255 mean) / (255 std)`` in float32 per channel,
  the same arithmetic for arrays (:func:`normalize_array`) and tensors (:func:`normalize`).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image

from fss.data.classes import IGNORE_INDEX
from fss.errors import ConfigError

#: cv2's thread count in every process that imports this module: 0 = run each call in the
#: calling thread. A DataLoader worker transforms one image at a time, and a second thread
#: made a 500x375 image's resize, warp and blur no faster (docs/benchmarks.md, "Data
#: loading: augmentation per image"); N workers x a pool per worker would oversubscribe the
#: cores, and a pool started before the DataLoader forks does not exist in the children.
CV2_THREADS = 0
cv2.setNumThreads(CV2_THREADS)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the ImageNet mean pixel on the 0..255 scale: rotation and crop padding value (pfenet)
MEAN_PIXEL_255 = tuple(m * 255.0 for m in IMAGENET_MEAN)
_MEAN_255_F32 = np.array(MEAN_PIXEL_255, np.float32)
_STD_255_F32 = np.array([s * 255.0 for s in IMAGENET_STD], np.float32)

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
    return torch.from_numpy(_writable(as_mask_stack(masks), np.uint8))


def as_mask_stack(masks: np.ndarray) -> np.ndarray:
    """``[M, H, W]`` masks as given, a single ``[H, W]`` mask as ``[1, H, W]``."""
    masks = np.asarray(masks)
    return masks[None] if masks.ndim == 2 else masks


def normalize(image255: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of a 0..255 image: ``(x / 255 - mean) / std``."""
    mean = torch.as_tensor(MEAN_PIXEL_255, dtype=image255.dtype).view(-1, 1, 1)
    std = torch.as_tensor([s * 255.0 for s in IMAGENET_STD], dtype=image255.dtype).view(-1, 1, 1)
    return image255.sub(mean).div_(std)


def normalize_array(image: np.ndarray) -> torch.Tensor:
    """:func:`normalize` of a ``[H, W, 3]`` array (uint8 or float32, 0..255), returned as
    ``float32 [3, H, W]``: the same float32 subtraction and division per channel."""
    planes = np.empty((3,) + image.shape[:2], np.float32)
    for c in range(3):  # strided reads beat cv2.split's copies (0.28 vs 0.37 ms at 473 px)
        np.subtract(image[:, :, c], _MEAN_255_F32[c], out=planes[c], dtype=np.float32)
        np.divide(planes[c], _STD_255_F32[c], out=planes[c])
    return torch.from_numpy(planes)


def masks_to_long(masks: np.ndarray) -> torch.Tensor:
    """``[M, H, W]`` mask array -> ``int64`` tensor (a copy)."""
    return torch.from_numpy(np.ascontiguousarray(masks, dtype=np.int64))


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize` (back to 0..255) for ``[3,H,W]`` or ``[B,3,H,W]``."""
    # torchvision has no inverse of normalize
    mean = image.new_tensor(MEAN_PIXEL_255).view(3, 1, 1)
    std = image.new_tensor([s * 255.0 for s in IMAGENET_STD]).view(3, 1, 1)
    return image * std + mean


# ---------------------------------------------------------------- array primitives (training)


def _each_mask(masks: np.ndarray, op) -> np.ndarray:
    """Apply a 2-D cv2 operation to every mask of ``[M, H, W]`` (labels are 2-D in cv2)."""
    return np.stack([op(m) for m in masks])


def _pil_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL's bilinear resize (anti-aliased when shrinking): uint8 RGB at once, float32 per
    channel (PIL mode ``F``)."""
    size = (int(width), int(height))
    if image.dtype == np.uint8:
        return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(image[:, :, c], np.float32))
                                .resize(size, Image.Resampling.BILINEAR)) for c in range(image.shape[2])], -1)


#: mask nearest-neighbour rules: ``floor`` = source index ``floor(dst * src / dst)`` (cv2
#: INTER_NEAREST, torch's ``nearest``); ``centre`` = the source pixel under the destination
#: pixel's centre, ``floor((dst + 0.5) * src / dst)`` (cv2 INTER_NEAREST_EXACT, equal to PIL's
#: NEAREST)
MASK_NEAREST = {"floor": cv2.INTER_NEAREST, "centre": cv2.INTER_NEAREST_EXACT}


def resize_arrays(image: np.ndarray, masks: np.ndarray, height: int, width: int,
                  antialias: bool = False, mask_nearest: str = "floor") -> tuple[np.ndarray, np.ndarray]:
    """Resize image and masks to ``height x width``: the image bilinear with half-pixel
    centres (``cv2.resize`` INTER_LINEAR, or PIL's bilinear filter when ``antialias``), the
    masks nearest by the :data:`MASK_NEAREST` rule ``mask_nearest``, so labels stay exact
    and 255 stays 255."""
    if masks.shape[-2:] == (height, width):
        return image, masks
    size = (int(width), int(height))
    if antialias:
        image = _pil_resize(image, height, width)
    else:
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    rule = MASK_NEAREST[mask_nearest]
    return image, _each_mask(masks, lambda m: cv2.resize(m, size, interpolation=rule))


def _check_mask_nearest(value: str) -> str:
    if value not in MASK_NEAREST:
        raise ConfigError(f"unknown mask_nearest {value!r}; choose one of: {', '.join(MASK_NEAREST)}.")
    return value


def scale_arrays(image: np.ndarray, masks: np.ndarray, factor: float,
                 antialias: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scale both sides by ``factor`` as ``cv2.resize(None, fx=factor, fy=factor)``: new side
    ``round(side * factor)``, source coordinate ``(dst + 0.5) / factor - 0.5`` (nearest:
    ``floor(dst / factor)``). With ``antialias`` (or a side that would round to 0) the
    image goes through :func:`resize_arrays` to that size (at least 1) instead."""
    h, w = masks.shape[-2:]
    new_h, new_w = int(round(h * factor)), int(round(w * factor))
    if antialias or new_h < 1 or new_w < 1:
        return resize_arrays(image, masks, max(1, new_h), max(1, new_w), antialias=antialias)
    f = float(factor)
    image = cv2.resize(image, None, fx=f, fy=f, interpolation=cv2.INTER_LINEAR)
    return image, _each_mask(masks, lambda m: cv2.resize(m, None, fx=f, fy=f, interpolation=cv2.INTER_NEAREST))


def rotate_arrays(image: np.ndarray, masks: np.ndarray, angle: float, image_fill=MEAN_PIXEL_255,
                  ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """PFENet's rotation: ``angle`` degrees counter-clockwise about ``(w / 2, h / 2)`` (cv2
    pixel-centre coordinates, as ``cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1)``),
    same size, ``cv2.warpAffine`` INTER_LINEAR for the image (pixels from outside the image
    are ``image_fill``, one value per channel, blended in by their bilinear weight) and
    INTER_NEAREST for the masks (outside: ``ignore_index``)."""
    h, w = masks.shape[-2:]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), float(angle), 1.0)
    fill = tuple(float(f) for f in image_fill)
    image = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=fill)
    masks = _each_mask(masks, lambda m: cv2.warpAffine(
        m, matrix, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
        borderValue=int(ignore_index)))
    return image, masks


def gaussian_blur(image: np.ndarray, size: int) -> np.ndarray:
    """``cv2.GaussianBlur(image, (size, size), 0)``, borders reflected without repeating the
    edge (``BORDER_REFLECT_101``). For sigma 0 OpenCV takes small kernels from a fixed table
    (``cv2.getGaussianKernel``): size 5, PFENet's, is the binomial ``[1, 4, 6, 4, 1] / 16``,
    not samples of the sigma ``0.3 * ((size - 1) / 2 - 1) + 0.8`` = 1.1 it uses for large
    kernels."""
    return cv2.GaussianBlur(image, (int(size), int(size)), 0)


def hflip_arrays(image: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror image and masks left-right (``cv2.flip(x, 1)``)."""
    return cv2.flip(image, 1), _each_mask(masks, lambda m: cv2.flip(m, 1))


def rand_scale(image, masks, rng: np.random.Generator, scale_range=(0.9, 1.1), antialias=False):
    """pfenet RandScale: one factor ``U(scale_range)`` for both sides (aspect kept),
    :func:`scale_arrays` (``cv2.resize`` with fx = fy = factor)."""
    factor = scale_range[0] + (scale_range[1] - scale_range[0]) * rng.random()
    return scale_arrays(image, masks, factor, antialias=antialias)


def rand_rotate(image, masks, rng: np.random.Generator, angle_range=(-10.0, 10.0), p=0.5,
                image_fill=MEAN_PIXEL_255, ignore_index=IGNORE_INDEX):
    """pfenet RandRotate: with probability ``p`` rotate by ``U(angle_range)`` degrees
    (:func:`rotate_arrays`); the image is padded with ``image_fill`` (the ImageNet mean
    pixel), the masks with 255."""
    if rng.random() < p:
        angle = angle_range[0] + (angle_range[1] - angle_range[0]) * rng.random()
        image, masks = rotate_arrays(image, masks, angle, image_fill, ignore_index)
    return image, masks


def rand_gaussian_blur(image, rng: np.random.Generator, radius=5, p=0.5):
    """pfenet RandomGaussianBlur: with probability ``p``, :func:`gaussian_blur` with a
    ``radius x radius`` kernel (cv2's sigma 0)."""
    if rng.random() < p:
        image = gaussian_blur(image, radius)
    return image


def rand_hflip(image, masks, rng: np.random.Generator, p=0.5):
    """Horizontal flip of image and masks together with probability ``p``."""
    if rng.random() < p:
        image, masks = hflip_arrays(image, masks)
    return image, masks


def pad_to_at_least(image, masks, size: int, image_fill=MEAN_PIXEL_255,
                    ignore_index=IGNORE_INDEX, centered: bool = True):
    """Pad so both sides are >= ``size`` (``cv2.copyMakeBorder``, BORDER_CONSTANT): image
    with ``image_fill``, masks with 255.

    ``centered`` (pfenet Crop): half of the padding above/left (rounded down), the rest
    below/right. Otherwise everything goes bottom/right.
    """
    h, w = masks.shape[-2:]
    pad_h, pad_w = max(size - h, 0), max(size - w, 0)
    if pad_h == 0 and pad_w == 0:
        return image, masks
    top, left = (pad_h // 2, pad_w // 2) if centered else (0, 0)
    sides = (top, pad_h - top, left, pad_w - left)
    fill = tuple(float(f) for f in image_fill)
    image = cv2.copyMakeBorder(image, *sides, cv2.BORDER_CONSTANT, value=fill)
    return image, _each_mask(masks, lambda m: cv2.copyMakeBorder(
        m, *sides, cv2.BORDER_CONSTANT, value=int(ignore_index)))


def random_crop_keeping_foreground(image, masks, size: int, rng: np.random.Generator, *,
                                   min_keep: float = 0.85, max_retries: int = 31,
                                   image_fill=MEAN_PIXEL_255, ignore_index=IGNORE_INDEX):
    """pfenet Crop(crop_type='rand'): pad to ``size`` if smaller, take a random
    ``size x size`` crop, and re-draw it while it holds fewer than ``min_keep`` of the
    (padded) label's ``== 1`` pixels (``masks[0]``).

    PFENet's loop is ``while pos < 0.85 * raw_pos and crop_cnt <= 30``, i.e. at most 31
    re-draws, hence ``max_retries=31``; the last draw is kept either way.
    Returns ``(image, masks, retries)`` (the crops are views of the padded arrays).
    """
    image, masks = pad_to_at_least(image, masks, size, image_fill, ignore_index, centered=True)
    h, w = masks.shape[-2:]
    raw_pos = int(np.count_nonzero(masks[0] == 1))

    def draw():
        top = int(rng.integers(0, h - size + 1))
        left = int(rng.integers(0, w - size + 1))
        crop_m = masks[:, top:top + size, left:left + size]
        return image[top:top + size, left:left + size], crop_m, int(np.count_nonzero(crop_m[0] == 1))

    crop_i, crop_m, pos = draw()
    retries = 0
    while pos < min_keep * raw_pos and retries < max_retries:
        crop_i, crop_m, pos = draw()
        retries += 1
    return crop_i, crop_m, retries


# ---------------------------------------------------------------- tensor primitives (test modes)


def resize_pair(image: torch.Tensor, masks: torch.Tensor, height: int, width: int,
                antialias: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize image and masks tensors to ``height x width``: the image bilinear with
    half-pixel centres (cv2 ``INTER_LINEAR`` when ``antialias`` is off, PIL's when on), the
    masks nearest (torchvision's NEAREST: source index ``floor(dst * scale)``, as cv2
    ``INTER_NEAREST``), so labels stay exact and 255 stays 255."""
    if image.shape[-2:] == (height, width):
        return image, masks
    size = (int(height), int(width))
    return _interpolate(image, size, "bilinear", antialias), _interpolate(masks, size, "nearest", False)


def _interpolate(x: torch.Tensor, size: tuple[int, int], mode: str, antialias: bool) -> torch.Tensor:
    """``torch.nn.functional.interpolate`` of ``[..., H, W]`` as torchvision's resize calls it
    (half-pixel centres; integer labels through float32 and back, exact below 2**24): the same
    values without importing torchvision, whose import costs every `fss` process over a second."""
    lead, dtype = x.shape[:-2], x.dtype
    cast = not (x.is_floating_point() or (mode == "nearest" and dtype == torch.uint8))
    flat = x.reshape(1, -1, *x.shape[-2:])
    flat = flat.to(torch.float32) if cast else flat
    out = nnf.interpolate(flat, size=size, mode=mode, align_corners=False if mode == "bilinear" else None,
                          antialias=antialias)
    return (out.to(dtype) if cast else out).reshape(*lead, *size)


def _pad(x: torch.Tensor, left: int, top: int, right: int, bottom: int, fill: float) -> torch.Tensor:
    """Constant padding of the last two axes (torchvision's ``pad`` with a number as fill)."""
    return nnf.pad(x, (left, right, top, bottom), mode="constant", value=fill)


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
    return (_pad(image, 0, 0, size - new_w, size - new_h, 0.0),
            _pad(masks, 0, 0, size - new_w, size - new_h, IGNORE_INDEX))


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


class ArrayEpisodeTransform(EpisodeTransform):
    """Base class of the training presets: ``geometric`` works on numpy arrays (image
    ``[H, W, 3]`` in :attr:`image_dtype`, masks ``uint8 [M, H, W]``) with cv2 / PIL, and the
    result is normalised by :func:`normalize_array`."""

    #: the image's dtype during the geometry: uint8 (PIL codebases) or float32 (PFENet)
    image_dtype = np.uint8

    def __call__(self, image: np.ndarray, masks: np.ndarray, rng: np.random.Generator,
                 role: str = "query") -> tuple[torch.Tensor, torch.Tensor]:
        image = np.asarray(image).astype(self.image_dtype, copy=False)
        masks = as_mask_stack(masks).astype(np.uint8, copy=False)
        img, m = self.geometric(image, masks, rng, role)
        return normalize_array(img), masks_to_long(m)


class PFENetTrainTransform(ArrayEpisodeTransform):
    """pfenet training augmentation (protocol section 4), for query and supports alike:
    RandScale -> RandRotate (p=0.5, mean/255 padding) -> Gaussian blur (p=0.5) -> h-flip
    (p=0.5) -> random crop with the 85% foreground retry -> normalisation."""

    name = "pfenet"
    image_dtype = np.float32  # PFENet augments np.float32(image)

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


class ResizeFlipTransform(ArrayEpisodeTransform):
    """Resize to ``size x size`` (aspect not kept) then h-flip with ``flip_p``:
    panet (flip 0.5) and hsnet (flip 0, i.e. no augmentation). The image stays uint8 and is
    resized with PIL's bilinear filter (``antialias``, the references' PIL resize) or
    ``cv2.resize`` INTER_LINEAR; the masks by ``mask_nearest`` (:data:`MASK_NEAREST`):
    PANet resizes its PIL labels with NEAREST (``centre``), HSNet its mask tensors with
    torch's ``nearest`` (``floor``)."""

    def __init__(self, size: int, flip_p: float = 0.5, antialias: bool = True, name: str = "panet",
                 mask_nearest: str = "centre"):
        self.size = int(size)
        self.flip_p = flip_p
        self.antialias = antialias
        self.name = name
        self.mask_nearest = _check_mask_nearest(mask_nearest)

    def geometric(self, image, masks, rng, role):
        image, masks = resize_arrays(image, masks, self.size, self.size, antialias=self.antialias,
                                     mask_nearest=self.mask_nearest)
        if self.flip_p > 0:
            image, masks = rand_hflip(image, masks, rng, self.flip_p)
        return image, masks


class CANetTrainTransform(ArrayEpisodeTransform):
    """canet: a support is resized to a random square of side ``int(U(1, 1.5) * size)``,
    randomly cropped to ``size`` and h-flipped (p=0.5); the query is resized to ``size``.
    Resizing as :class:`ResizeFlipTransform` (uint8, PIL bilinear by default; masks as PIL's
    NEAREST, CANet's label resize, by default)."""

    name = "canet"

    def __init__(self, size: int = 321, scale_range=(1.0, 1.5), flip_p: float = 0.5,
                 antialias: bool = True, mask_nearest: str = "centre"):
        self.size = int(size)
        self.scale_range = tuple(scale_range)
        self.flip_p = flip_p
        self.antialias = antialias
        self.mask_nearest = _check_mask_nearest(mask_nearest)

    def geometric(self, image, masks, rng, role):
        resize = dict(antialias=self.antialias, mask_nearest=self.mask_nearest)
        if role == "query":
            return resize_arrays(image, masks, self.size, self.size, **resize)
        u = self.scale_range[0] + (self.scale_range[1] - self.scale_range[0]) * rng.random()
        side = max(self.size, int(u * self.size))
        image, masks = resize_arrays(image, masks, side, side, **resize)
        top = int(rng.integers(0, side - self.size + 1))
        left = int(rng.integers(0, side - self.size + 1))
        image = image[top:top + self.size, left:left + self.size]
        masks = masks[:, top:top + self.size, left:left + self.size]
        return rand_hflip(image, masks, rng, self.flip_p)


class NoAugTransform(ArrayEpisodeTransform):
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
            options.setdefault("mask_nearest", "floor")
            return ResizeFlipTransform(size, flip_p=options.pop("flip_p", 0.0), name="hsnet", **options)
        return CANetTrainTransform(size=size, **options)
    except TypeError as exc:
        raise ConfigError(f"bad option for augmentation preset {preset!r}: {exc}.") from None


def build_test_transform(mode: str = "pfenet_pad", size: int = 473, antialias: bool | None = None
                         ) -> TestTransform:
    return TestTransform(mode, size, antialias)
