"""Dilated ResNet-50/101 backbones (output stride 8), in two stem flavours.

* ``deep_stem=False`` ("resnet50", "resnet101"): torchvision's ResNet, 7x7 ``conv1``.
  State-dict keys equal torchvision's (``conv1``, ``bn1``, ``layer1..layer4``), so
  ``resnet50-*.pth`` / ``resnet101-*.pth`` load by name (their ``fc.*`` is ignored).
* ``deep_stem=True`` ("resnet50v2", "resnet101v2"): the PSPNet/PFENet "v2" stem, three 3x3
  convs ``conv1`` 3->64 stride 2, ``conv2`` 64->64, ``conv3`` 64->128 (each with ``bn1..bn3``
  and a ReLU), then the max-pool; ``layer1`` takes 128 channels. Keys equal those of
  ``resnet50_v2.pth`` / ``resnet101_v2.pth`` (see ``spec/checkpoints/resnet*_v2_backbone.txt``).

Stages (PFENet's naming): ``layer0`` = stem + max-pool, ``layer1..layer4`` = the residual
stages. Output strides 4, 4, 8, 8, 8; channels (64 or 128), 256, 512, 1024, 2048.

Dilation: PFENet/PSPNet build a plain ResNet and then, for EVERY block of ``layer3``
(``layer4``), set ``conv2`` to dilation = padding = 2 (4) with stride 1 and the
``downsample.0`` stride to 1. ``dilation_rule="pspnet"`` (default) builds exactly that.
``dilation_rule="torchvision"`` instead mirrors torchvision's
``replace_stride_with_dilation=[False, True, True]``, whose FIRST block of a dilated stage
keeps the previous stage's dilation (1 in ``layer3``, 2 in ``layer4``); same shapes and
keys, slightly different receptive field; no reference FSS code uses it.

``layer0`` is a view (an ``nn.Sequential`` over the registered stem modules, made on each
access), so the stem's parameters appear once in ``state_dict()`` under the file's names.
"""

from __future__ import annotations

import torch
from torch import nn

from fss.errors import ConfigError

STAGES = ("layer0", "layer1", "layer2", "layer3", "layer4")

#: residual blocks per stage
RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}

DILATION_RULES = ("pspnet", "torchvision")


class ResNetBackbone(nn.Module):
    """Dilated ResNet (output stride 8) with a torchvision 7x7 stem or the PSPNet deep stem.

    Args:
        depth: 50 or 101.
        deep_stem: True for the "v2" three-conv stem of PSPNet/PFENet (default False).
        dilation_rule: "pspnet" (default; every block of layer3/layer4 dilated 2/4, as
            PFENet/PSPNet do) or "torchvision" (first block of a dilated stage keeps the
            previous dilation, as ``replace_stride_with_dilation`` does).
    """

    stage_strides = {"layer0": 4, "layer1": 4, "layer2": 8, "layer3": 8, "layer4": 8}

    def __init__(self, depth: int = 50, deep_stem: bool = False, dilation_rule: str = "pspnet") -> None:
        super().__init__()
        if depth not in RESNET_BLOCKS:
            raise ConfigError(f"ResNet depth {depth!r} is not supported; choose one of {sorted(RESNET_BLOCKS)}.")
        if dilation_rule not in DILATION_RULES:
            raise ConfigError(f"dilation_rule {dilation_rule!r} is unknown; choose one of {list(DILATION_RULES)}.")
        self.depth = depth
        self.deep_stem = deep_stem
        self.dilation_rule = dilation_rule

        if deep_stem:  # PSPNet/PFENet "deep base"
            self.conv1 = nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu1 = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(64, 64, 3, stride=1, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(64)
            self.relu2 = nn.ReLU(inplace=True)
            self.conv3 = nn.Conv2d(64, 128, 3, stride=1, padding=1, bias=False)
            self.bn3 = nn.BatchNorm2d(128)
            self.relu3 = nn.ReLU(inplace=True)
            self._stem_names = ("conv1", "bn1", "relu1", "conv2", "bn2", "relu2", "conv3", "bn3", "relu3", "maxpool")
            stem_channels = 128
        else:  # torchvision
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self._stem_names = ("conv1", "bn1", "relu", "maxpool")
            stem_channels = 64
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        blocks = RESNET_BLOCKS[depth]
        first3, first4 = (2, 4) if dilation_rule == "pspnet" else (1, 2)
        self.layer1 = _residual_stage(stem_channels, 64, blocks[0], stride=1, dilation=1, first_dilation=1)
        self.layer2 = _residual_stage(256, 128, blocks[1], stride=2, dilation=1, first_dilation=1)
        self.layer3 = _residual_stage(512, 256, blocks[2], stride=1, dilation=2, first_dilation=first3)
        self.layer4 = _residual_stage(1024, 512, blocks[3], stride=1, dilation=4, first_dilation=first4)
        self.stage_channels = {
            "layer0": stem_channels, "layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048,
        }

        # the initialisation of torchvision and PSPNet/PFENet (they agree)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def layer0(self) -> nn.Sequential:
        """The stem as one stage: PFENet's ``Sequential(conv1, bn1, relu1, conv2, ..., maxpool)``."""
        return nn.Sequential(*(getattr(self, n) for n in self._stem_names))

    def stage_key_to_state_key(self, key: str) -> str:
        """Map a key of the stages registered as modules (``layer0.3.weight``, as PFENet's
        model names them) to this backbone's own state-dict key (``conv2.weight``)."""
        if key.startswith("layer0."):
            index, rest = key[len("layer0."):].split(".", 1)
            return f"{self._stem_names[int(index)]}.{rest}"
        return key

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name in STAGES:
            x = getattr(self, name)(x)
            out[name] = x
        return out


class Bottleneck(nn.Module):
    """ResNet bottleneck with torchvision's layout and names (``conv1`` 1x1, ``conv2`` 3x3
    carrying the stride and dilation, ``conv3`` 1x1 to ``4 * planes``, ``bn1..bn3``,
    ``relu``, ``downsample``), so torchvision and PSPNet state dicts load key for key.
    Defined here so that building a backbone does not import torchvision (seconds per process)."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=dilation,
                               dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _residual_stage(in_channels: int, planes: int, n_blocks: int, *, stride: int, dilation: int,
                    first_dilation: int) -> nn.Sequential:
    """``n_blocks`` bottlenecks (stride on the 3x3 ``conv2``, as torchvision and PSPNet do)."""
    out_channels = planes * Bottleneck.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(out_channels),
        )
    blocks = [Bottleneck(in_channels, planes, stride=stride, downsample=downsample, dilation=first_dilation)]
    blocks += [Bottleneck(out_channels, planes, dilation=dilation) for _ in range(1, n_blocks)]
    return nn.Sequential(*blocks)
