"""Learning-rate schedules shared by `fss train` and `fss pretrain` (pure arithmetic)."""

from __future__ import annotations


def poly_lr(base: float, iteration: int, total: int, power: float) -> float:
    """PFENet's poly schedule at (0-based) ``iteration`` of ``total`` (``curr_iter = iteration + 1``)."""
    return base * max(0.0, 1.0 - (iteration + 1) / total) ** power
