"""Backbones: ``build_backbone(name, weights=...)``.

Every backbone is an ``nn.Module`` with attributes ``layer0 .. layer4`` (callable in
sequence), a ``stage_channels`` dict giving each stage's output channels, and
``forward(x) -> {"layer0": ..., ..., "layer4": ...}``. Dilated layouts keep output
stride 8 from ``layer2`` on.
"""

from __future__ import annotations

from torch import nn

from fss.errors import ConfigError
from fss.models.backbones.small import SmallBackbone

#: name -> constructor(weights: str | None) -> nn.Module
BACKBONES = {
    "small": lambda weights=None: _load_small(weights),
}


def _load_small(weights: str | None) -> nn.Module:
    net = SmallBackbone()
    if weights:
        from fss.models.backbones.weights import load_state_dict_file

        load_state_dict_file(net, weights, kind="small")
    return net


def list_backbones() -> list[str]:
    return sorted(BACKBONES)


def build_backbone(name: str, weights: str | None = None) -> nn.Module:
    if name not in BACKBONES:
        raise ConfigError(
            f"unknown backbone {name!r}; choose one of: {', '.join(list_backbones())}."
        )
    return BACKBONES[name](weights=weights)
