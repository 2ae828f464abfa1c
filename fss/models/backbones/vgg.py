"""VGG16 backbones: PANet's encoder ("vgg16") and PFENet's VGG16-BN slices ("vgg16bn").

Both keep the reference's module tree in ``features`` so that their state-dict keys are
the reference files' keys; ``layer0..layer4`` are views (``nn.Sequential`` made on each
access over the registered modules), so every parameter appears once in ``state_dict()``.

``vgg16`` (PANet, ``models/vgg.py`` of the reference; Section 3.2 of the paper)::

    features.0 conv1_1..1_2 (+ReLU)   features.1 MaxPool(3, stride 2, pad 1)   -> layer0, stride 2
    features.2 conv2_1..2_2 (+ReLU)   features.3 MaxPool(3, stride 2, pad 1)   -> layer1, stride 4
    features.4 conv3_1..3_3 (+ReLU)   features.5 MaxPool(3, stride 2, pad 1)   -> layer2, stride 8
    features.6 conv4_1..4_3 (+ReLU)   features.7 MaxPool(3, stride 1, pad 1)   -> layer3, stride 8
    features.8 conv5_1..5_3, dilation 2 (pad 2), NO ReLU after conv5_3       -> layer4, stride 8

  Convs sit at ``features.{0,2,4,6,8}.{0,2,(4)}``; no pool 5. Channels 64, 128, 256, 512, 512.
  ImageNet weights are copied BY POSITION from torchvision's ``vgg16-397923af.pth`` (its
  first 26 tensors = 13 conv weight/bias pairs), as PANet does.

``vgg16bn`` (PFENet, ``get_vgg16_layer``): torchvision's VGG16-BN ``features`` (convs at
0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40, each followed by BN and ReLU; max-pools at
6, 13, 23, 33, 43) sliced as ``layer0 = features[0:7]`` (pool 1 included, stride 2),
``layer1 = [7:14]`` (pool 2, stride 4), ``layer2 = [14:24]`` (pool 3, stride 8),
``layer3 = [24:34]`` (pool 4, stride 16), ``layer4 = [34:43]`` (conv5 block, pool 5 left
out, stride 16). So, unlike the dilated ResNets, layer3/layer4 have output stride 16
(PFENet resizes layer2 to layer3's size). Channels 64, 128, 256, 512, 512. PFENet's
``vgg.py`` uses ``MaxPool2d(2, 2, ceil_mode=True)`` (torchvision: floor); the option
``pool_ceil_mode`` (default True, the reference) chooses.
"""

from __future__ import annotations

import torch
from torch import nn

STAGES = ("layer0", "layer1", "layer2", "layer3", "layer4")


def _plain_conv_block(n_convs: int, in_channels: int, out_channels: int, dilation: int = 1,
                      last_relu: bool = True) -> nn.Sequential:
    """PANet's ``_make_layer``: 3x3 convs (padding = dilation) each followed by ReLU,
    except the last one when ``last_relu`` is False."""
    layers: list[nn.Module] = []
    for i in range(n_convs):
        layers.append(nn.Conv2d(in_channels, out_channels, 3, dilation=dilation, padding=dilation))
        if i != n_convs - 1 or last_relu:
            layers.append(nn.ReLU(inplace=True))
        in_channels = out_channels
    return nn.Sequential(*layers)


class PANetVGG16(nn.Module):
    """PANet's VGG16 encoder (no BN, output stride 8); see the module docstring."""

    stage_channels = {"layer0": 64, "layer1": 128, "layer2": 256, "layer3": 512, "layer4": 512}
    stage_strides = {"layer0": 2, "layer1": 4, "layer2": 8, "layer3": 8, "layer4": 8}

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _plain_conv_block(2, 3, 64),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            _plain_conv_block(2, 64, 128),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            _plain_conv_block(3, 128, 256),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            _plain_conv_block(3, 256, 512),
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1),
            _plain_conv_block(3, 512, 512, dilation=2, last_relu=False),
        )
        # PANet's _init_weights: kaiming normal (fan_in) on conv weights, biases left at
        # PyTorch's default
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def _stage_blocks(self, stage: int) -> list[int]:
        return [2 * stage, 2 * stage + 1] if stage < 4 else [8]

    @property
    def layer0(self) -> nn.Sequential:
        return nn.Sequential(*(self.features[i] for i in self._stage_blocks(0)))

    @property
    def layer1(self) -> nn.Sequential:
        return nn.Sequential(*(self.features[i] for i in self._stage_blocks(1)))

    @property
    def layer2(self) -> nn.Sequential:
        return nn.Sequential(*(self.features[i] for i in self._stage_blocks(2)))

    @property
    def layer3(self) -> nn.Sequential:
        return nn.Sequential(*(self.features[i] for i in self._stage_blocks(3)))

    @property
    def layer4(self) -> nn.Sequential:
        return nn.Sequential(*(self.features[i] for i in self._stage_blocks(4)))

    def stage_key_to_state_key(self, key: str) -> str:
        """``layer{K}.{j}.{rest}`` (stages registered as modules) -> ``features.{2K+j}.{rest}``."""
        stage, index, rest = key.split(".", 2)
        block = self._stage_blocks(int(stage[len("layer"):]))[int(index)]
        return f"features.{block}.{rest}"

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name in STAGES:
            x = getattr(self, name)(x)
            out[name] = x
        return out


def panet_key_to_backbone_key(key: str) -> str | None:
    """Map a key of a released PANet model to :class:`PANetVGG16`'s state-dict key.

    ``module.encoder.backbone.features.{block}.{index}.{weight|bias}`` (``module.`` from
    DataParallel, optional) -> ``features.{block}.{index}.{weight|bias}``; None for a key
    outside the encoder (PANet has none).
    """
    if key.startswith("module."):
        key = key[len("module."):]
    prefix = "encoder.backbone."
    return key[len(prefix):] if key.startswith(prefix) else None


#: VGG16 ("D") without the final max-pool; "M" is a 2x2 max-pool
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class PFENetVGG16BN(nn.Module):
    """VGG16-BN sliced into PFENet's five stages (strides 2, 4, 8, 16, 16).

    Args:
        pool_ceil_mode: max-pools round up, as PFENet's ``vgg.py`` (default True); False
            gives torchvision's rounding down.
    """

    stage_channels = {"layer0": 64, "layer1": 128, "layer2": 256, "layer3": 512, "layer4": 512}
    stage_strides = {"layer0": 2, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 16}
    #: PFENet's get_vgg16_layer: stage -> range of ``features`` indices
    STAGE_SLICES = {"layer0": (0, 7), "layer1": (7, 14), "layer2": (14, 24), "layer3": (24, 34), "layer4": (34, 43)}

    def __init__(self, pool_ceil_mode: bool = True) -> None:
        super().__init__()
        self.pool_ceil_mode = pool_ceil_mode
        layers: list[nn.Module] = []
        in_channels = 3
        for v in _VGG16_LAYOUT:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=pool_ceil_mode))
            else:
                layers += [nn.Conv2d(in_channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                in_channels = v
        self.features = nn.Sequential(*layers)  # indices 0..42, torchvision's names
        # torchvision's / PFENet's VGG initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _stage(self, name: str) -> nn.Sequential:
        start, stop = self.STAGE_SLICES[name]
        # renumbered from 0, as PFENet's nn.Sequential(*list) does
        return nn.Sequential(*(self.features[i] for i in range(start, stop)))

    @property
    def layer0(self) -> nn.Sequential:
        return self._stage("layer0")

    @property
    def layer1(self) -> nn.Sequential:
        return self._stage("layer1")

    @property
    def layer2(self) -> nn.Sequential:
        return self._stage("layer2")

    @property
    def layer3(self) -> nn.Sequential:
        return self._stage("layer3")

    @property
    def layer4(self) -> nn.Sequential:
        return self._stage("layer4")

    def stage_key_to_state_key(self, key: str) -> str:
        """``layer{K}.{j}.{rest}`` (PFENet's model keys) -> ``features.{start_K + j}.{rest}``."""
        stage, index, rest = key.split(".", 2)
        return f"features.{self.STAGE_SLICES[stage][0] + int(index)}.{rest}"

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name in STAGES:
            x = getattr(self, name)(x)
            out[name] = x
        return out
