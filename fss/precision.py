"""Arithmetic precision of a forward pass (``train.precision``): the one autocast helper of
training, validation, evaluation and ``fss bench``."""

from __future__ import annotations

import contextlib

import torch

from fss.errors import ConfigError

PRECISIONS = ("fp32", "bf16")


def autocast(precision: str, device):
    """A context manager: bf16 autocast on ``device``'s type for ``bf16``, nothing for ``fp32``."""
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ConfigError(f"precision {precision!r} is unknown; choose one of: {', '.join(PRECISIONS)}.")
    return contextlib.nullcontext()
