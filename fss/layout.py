"""Memory layout of image batches (``train.channels_last``): same values, different strides."""

from __future__ import annotations

import torch


def channels_last_images(images):
    """``[..., C, H, W]`` float images laid out channels-last per image (``train.channels_last``).

    4-D tensors use ``torch.channels_last``; 5-D supports ``[B, K, C, H, W]`` get strides
    such that ``flatten(0, 1)`` is a channels-last 4-D view. Values are unchanged.
    """
    if images.dim() == 4:
        return images.contiguous(memory_format=torch.channels_last)
    if images.dim() >= 5:
        return images.movedim(-3, -1).contiguous().movedim(-1, -3)
    return images


def channels_last_batch(batch: dict) -> dict:
    """The batch with its float image tensors in channels-last layout (masks untouched)."""
    return {k: (channels_last_images(v) if k.endswith("_images") and hasattr(v, "dim") else v)
            for k, v in batch.items()}
