"""Backbones: ``build_backbone(name, weights=...)``.

Every backbone is an ``nn.Module`` with attributes ``layer0 .. layer4`` (callable in
sequence), a ``stage_channels`` dict giving each stage's output channels, and
``forward(x) -> {"layer0": ..., ..., "layer4": ...}``. The real backbones also give
``stage_strides`` and ``stage_key_to_state_key(key)`` (stage-module key -> own key).

| name | layout | strides of layer0..4 | channels |
|---|---|---|---|
| small | small CNN (``small.py``) | 4, 4, 8, 8, 8 | 32, 32, 64, 128, 128 |
| resnet50, resnet101 | torchvision ResNet, 7x7 stem, dilated (``resnet.py``) | 4, 4, 8, 8, 8 | 64, 256, 512, 1024, 2048 |
| resnet50v2, resnet101v2 | PSPNet/PFENet deep stem, dilated | 4, 4, 8, 8, 8 | 128, 256, 512, 1024, 2048 |
| vgg16 | PANet's VGG16, no BN (``vgg.py``) | 2, 4, 8, 8, 8 | 64, 128, 256, 512, 512 |
| vgg16bn | PFENet's VGG16-BN slices | 2, 4, 8, 16, 16 | 64, 128, 256, 512, 512 |

``weights``: None (random init), a path to a weight file, or "imagenet" (torchvision's
ImageNet file from the torch hub cache; resnet50/101, vgg16, vgg16bn). Loading is strict;
see ``weights.py``. The load report is attached as ``net.load_report``.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from fss.errors import ConfigError
from fss.models.backbones.resnet import ResNetBackbone
from fss.models.backbones.small import SmallBackbone
from fss.models.backbones.vgg import PANetVGG16, PFENetVGG16BN
from fss.models.backbones.weights import load_state_dict_file, weights_path

#: name -> constructor of the randomly initialised network
_CONSTRUCTORS: dict[str, Callable[[], nn.Module]] = {
    "small": SmallBackbone,
    "resnet50": lambda: ResNetBackbone(50, deep_stem=False),
    "resnet101": lambda: ResNetBackbone(101, deep_stem=False),
    "resnet50v2": lambda: ResNetBackbone(50, deep_stem=True),
    "resnet101v2": lambda: ResNetBackbone(101, deep_stem=True),
    "vgg16": PANetVGG16,
    "vgg16bn": PFENetVGG16BN,
}


def _builder(name: str) -> Callable[..., nn.Module]:
    def build(weights: str | None = None) -> nn.Module:
        path = weights_path(name, weights)  # "imagenet" fails here, before building the net
        net = _CONSTRUCTORS[name]()
        if path is not None:
            load_state_dict_file(net, path, kind=name)
        return net

    return build


#: name -> constructor(weights: str | None) -> nn.Module
BACKBONES = {name: _builder(name) for name in _CONSTRUCTORS}

#: the stages of every backbone, in order
STAGES = ("layer0", "layer1", "layer2", "layer3", "layer4")


def chosen_stages(method: str, layers) -> tuple[str, ...]:
    """A method's ``layers`` knob as a tuple, refused in one line when empty."""
    if not layers:
        raise ConfigError(f"knob 'layers' of method {method!r} is empty; name at least one backbone stage, e.g. [layer3].")
    return tuple(layers)


def stage_outputs(net: nn.Module, x, layers: tuple[str, ...]) -> tuple:
    """The outputs of the stages in ``layers`` (in stage order), running ``net`` only as deep as the deepest."""
    last = max(STAGES.index(name) for name in layers)
    outs = []
    for name in STAGES[: last + 1]:
        x = getattr(net, name)(x)
        if name in layers:
            outs.append(x)
    return tuple(outs)


def list_backbones() -> list[str]:
    return sorted(BACKBONES)


def build_backbone(name: str, weights: str | None = None) -> nn.Module:
    if name not in BACKBONES:
        raise ConfigError(
            f"unknown backbone {name!r}; choose one of: {', '.join(list_backbones())}."
        )
    return BACKBONES[name](weights=weights)
