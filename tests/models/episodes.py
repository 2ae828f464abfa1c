"""Random but valid episode batches shared by the model tests."""

from __future__ import annotations

import torch


def random_episode(b: int = 2, shot: int = 1, seed: int = 0, size: int = 33) -> dict:
    """Noise images; support masks random 0/1 with a foreground square and a 255 strip on
    top; query masks random 0/1 with a 255 strip at the bottom."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.randint(0, 2, (b, shot, size, size), generator=g)
    masks[..., :4, :] = 255
    masks[..., 8:20, 8:20] = 1
    query = torch.randint(0, 2, (b, size, size), generator=g)
    query[:, -3:, :] = 255
    return {
        "support_images": torch.randn(b, shot, 3, size, size, generator=g),
        "support_masks": masks,
        "query_images": torch.randn(b, 3, size, size, generator=g),
        "query_masks": query,
    }
