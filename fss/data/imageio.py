"""Reading and writing images and label masks, with one-line errors for bad files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fss.atomic import atomic_path
from fss.errors import DataError


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (256 RGB triples, flattened), index 255 = (224, 224, 192)."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.extend((r, g, b))
    return palette


def _open(path: Path, what: str) -> Image.Image:
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist; check the dataset directory or re-run 'fss prepare'.")
    try:
        img = Image.open(path)
        img.load()
        return img
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(
            f"{what} {path} is unreadable or truncated ({type(exc).__name__}); replace the file or re-run 'fss prepare'."
        ) from None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An RGB image as ``uint8 [H, W, 3]``."""
    return np.asarray(_open(Path(path), "image").convert("RGB"))


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A label mask as ``uint8 [H, W]``: palette indices (VOC PNG) or grey values."""
    img = _open(Path(path), "mask")
    if img.mode in ("P", "L"):
        return np.asarray(img)
    if img.mode in ("I", "I;16"):
        arr = np.asarray(img)
        if arr.max(initial=0) > 255:
            raise DataError(f"mask {path} holds values above 255; masks must be 8-bit class maps.")
        return arr.astype(np.uint8)
    raise DataError(
        f"mask {path} has image mode {img.mode}; expected a palette or greyscale PNG of class ids."
    )


def write_mask(path: str | os.PathLike, mask: np.ndarray, palette: bool = True) -> None:
    """Write a class map as a (VOC-palette) PNG atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="L")
    if palette:
        img = img.convert("P")
        img.putpalette(voc_palette())
        # convert("P") from L keeps the values as indices
    _atomic_save(img, path, format="PNG")


def write_jpeg(path: str | os.PathLike, image: np.ndarray, quality: int = 95) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="RGB"), path,
                 format="JPEG", quality=quality)


def _atomic_save(img: Image.Image, path: Path, **kwargs) -> None:
    with atomic_path(path, fsync=False) as tmp:
        img.save(tmp, **kwargs)
