"""Building blocks shared by the methods (write once, reuse).

Append new shared blocks here with a docstring citing the paper equation they implement.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_average_pool(feat: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """MAP(F, M) = sum(F * M) / (sum(M) + eps) over the spatial axes.

    ``feat`` is ``[B, C, H, W]``, ``mask`` ``[B, 1, H, W]`` or ``[B, H, W]`` (float, same
    spatial size). Returns ``[B, C]``. PANet uses eps 1e-5 at image resolution, PFENet
    5e-4 at feature resolution (the caller chooses).
    """
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    mask = mask.to(feat.dtype)
    return (feat * mask).sum(dim=(2, 3)) / (mask.sum(dim=(2, 3)) + eps)


def cosine_map(feat: torch.Tensor, proto: torch.Tensor, scale: float = 1.0, eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity of every location of ``feat [B, C, H, W]`` with ``proto [B, C]``.

    Returns ``[B, H, W]`` multiplied by ``scale`` (PANet: alpha = 20). ``eps`` follows
    ``torch.nn.functional.cosine_similarity`` (PANet's reference uses that function).
    """
    return F.cosine_similarity(feat, proto[..., None, None], dim=1, eps=eps) * scale
