"""Scoring test predictions at the original resolution (PFENet's ``ori_resize``, HSNet's
original-size option): upsample the logits, pad the label to the same square."""

from __future__ import annotations

import torch
import torch.nn.functional as nnf

from fss.data.classes import IGNORE_INDEX


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
    # align_corners=True, as PFENet's ori_resize scoring resizes
    return nnf.interpolate(logits, size=target, mode="bilinear", align_corners=True)


def pad_label_square(label: torch.Tensor, side: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Pad a label ``[..., h, w]`` bottom/right with 255 to ``[..., side, side]``."""
    h, w = label.shape[-2:]
    if h > side or w > side:
        raise ValueError(f"label {h}x{w} does not fit a {side}x{side} square")
    padded = nnf.pad(label.reshape(-1, h, w), (0, side - w, 0, side - h), mode="constant", value=ignore_index)
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
