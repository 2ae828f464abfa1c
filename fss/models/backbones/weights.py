"""Loading backbone weight files, with no silent partial loads.

``weights`` given to :func:`fss.models.backbones.build_backbone` is either a path to a
local file or ``"imagenet"``: torchvision's ImageNet weights for that backbone, read from
torchvision's cache ``$TORCH_HOME/hub/checkpoints`` (downloaded there first if absent and
the machine is online). Files are read with ``torch.load(weights_only=True)``.

Rules (each failure is a one-line :class:`~fss.errors.CheckpointError`):

* by name (ResNets, "vgg16bn", "small"): every key of the backbone must be in the file with
  the same shape; the only keys a file may lack are BatchNorm ``num_batches_tracked``
  counters (older PSPNet ``*_v2.pth`` files have none; they are reported in ``"absent"``);
  the only extra keys allowed are the classifier's (``fc.*`` for ResNets,
  ``classifier.*`` for VGG), reported in ``"ignored"``.
* a torchvision ResNet file (7x7 ``conv1``) and a v2 deep-stem file (3x3 ``conv1``) are
  refused in each other's network, naming both kinds.
* "vgg16" (PANet): the backbone's 26 tensors are copied BY POSITION from the file's first
  26 tensors (PANet's ``Encoder._init_weights``); each must have the same shape.

The report ``{"matched", "total", "ignored", "absent", "source"}`` is returned and attached
to the backbone as ``net.load_report``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from fss.errors import CheckpointError, ConfigError
from fss.models.checkpoints import safe_torch_load

#: backbone name -> torchvision weights enum (class name, member) for weights="imagenet"
TORCHVISION_IMAGENET = {
    "resnet50": ("ResNet50_Weights", "IMAGENET1K_V1"),
    "resnet101": ("ResNet101_Weights", "IMAGENET1K_V1"),
    "vgg16": ("VGG16_Weights", "IMAGENET1K_V1"),
    "vgg16bn": ("VGG16_BN_Weights", "IMAGENET1K_V1"),
}

#: backbones whose ImageNet file is not torchvision's: the file the reference code uses
REFERENCE_FILES = {
    "resnet50v2": "resnet50_v2.pth (PSPNet/semseg release, as PFENet's initmodel/)",
    "resnet101v2": "resnet101_v2.pth (PSPNet/semseg release, as PFENet's initmodel/)",
}

#: keys a file may carry that the backbone has no use for (classification heads)
IGNORED_PREFIXES = {
    "resnet50": ("fc.",), "resnet101": ("fc.",), "resnet50v2": ("fc.",), "resnet101v2": ("fc.",),
    "vgg16bn": ("classifier.",), "small": (),
}

#: the two ResNet stems, by conv1 kernel size
_STEM_WORDS = {7: "torchvision ResNet (7x7 conv1)", 3: "v2 deep-stem ResNet (3x3 conv1)"}

#: ResNet kinds: name -> (conv1 kernel size, an example file, the backbone with the other stem)
_RESNET_STEMS = {
    "resnet50": (7, "resnet50-0676ba61.pth", "resnet50v2"),
    "resnet101": (7, "resnet101-63fe2227.pth", "resnet101v2"),
    "resnet50v2": (3, "resnet50_v2.pth", "resnet50"),
    "resnet101v2": (3, "resnet101_v2.pth", "resnet101"),
}

PANET_VGG16_TENSORS = 26  # 13 convs x (weight, bias)

LOAD_KINDS = tuple(IGNORED_PREFIXES) + ("vgg16",)


def weights_path(name: str, weights: str | os.PathLike | None) -> Path | None:
    """The file that ``weights`` (None, a path, or "imagenet") names for backbone ``name``."""
    if weights is None or str(weights) == "":
        return None
    return imagenet_weights_file(name) if str(weights) == "imagenet" else Path(weights)


def imagenet_weights_file(name: str) -> Path:
    """Path of torchvision's ImageNet file for backbone ``name`` in the torch hub cache;
    downloads it there when absent, or says where to put it."""
    if name not in TORCHVISION_IMAGENET:
        hint = REFERENCE_FILES.get(name)
        what = f"pass the path of {hint}" if hint else "pass the path of a weight file"
        raise CheckpointError(f"backbone {name!r} has no torchvision ImageNet weights; {what} as its weights.")
    enum_name, member = TORCHVISION_IMAGENET[name]
    import torchvision  # only here: importing it costs seconds

    url = getattr(torchvision.models, enum_name)[member].url
    file_name = url.rsplit("/", 1)[-1]
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    path = cache_dir / file_name
    if path.is_file():
        return path
    match = torch.hub.HASH_REGEX.search(file_name)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), hash_prefix=match.group(1) if match else None,
                                       progress=False)
    except Exception as exc:  # offline, proxy, disk, hash mismatch
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise CheckpointError(
            f"ImageNet weights {file_name} for backbone {name!r} are not in the cache {cache_dir} and "
            f"could not be downloaded ({reason}); download {url} elsewhere and put it in {cache_dir} "
            f"(or set TORCH_HOME)."
        ) from None
    return path


def load_state_dict_file(net: nn.Module, path: str | os.PathLike, kind: str) -> dict:
    """Load the weight file ``path`` into backbone ``net`` of kind ``kind`` (its backbone
    name); return the report ``{"matched", "total", "ignored", "absent", "source"}``, also
    attached as ``net.load_report``. Refuses any partial or mismatched load."""
    if kind not in LOAD_KINDS:
        raise ConfigError(f"unknown backbone weight kind {kind!r}; choose one of: {', '.join(LOAD_KINDS)}.")
    state = _read_state_dict(path)
    if kind == "vgg16":
        report = _load_by_position(net, state, path, PANET_VGG16_TENSORS)
    else:
        report = _load_by_name(net, state, path, kind)
    net.load_report = report
    return report


def describe_state_dict(state: dict) -> str:
    """A few words on what a state dict looks like, for error messages."""
    keys = list(state)
    if any(k.startswith(("module.", "encoder.")) for k in keys):
        return "a whole trained model (keys like " + repr(keys[0]) + "), not backbone weights"
    conv1 = state.get("conv1.weight")
    if isinstance(conv1, torch.Tensor) and conv1.dim() == 4:
        blocks = {k.split(".")[1] for k in keys if k.startswith("layer3.")}
        depth = {6: "-50", 23: "-101", 36: "-152"}.get(len(blocks), "")
        if conv1.shape[-1] == 7:
            return f"a torchvision ResNet{depth} (7x7 conv1)"
        return f"a v2 deep-stem ResNet{depth} (3x3 conv1)"
    if "features.1.running_mean" in state:
        return "a VGG with BN"
    if "features.0.weight" in state:
        return "a VGG without BN"
    return f"an unrecognised weight file (first key {keys[0]!r})" if keys else "an empty state dict"


def _read_state_dict(path) -> dict:
    state = safe_torch_load(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        raise CheckpointError(
            f"{path} is a trained-model checkpoint ({{'state_dict': ...}} container), not backbone "
            f"weights; import it with 'fss checkpoint import' or pass an ImageNet backbone file."
        )
    if not isinstance(state, dict) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path} does not hold a state dict of tensors; pass a backbone weight file.")
    return state


def _load_by_name(net: nn.Module, state: dict, path, kind: str) -> dict:
    if kind in _RESNET_STEMS:
        _check_resnet_stem(state, path, kind)
    own = net.state_dict()
    ignore = IGNORED_PREFIXES[kind]
    ignored = [k for k in state if k not in own and ignore and k.startswith(ignore)]
    unexpected = [k for k in state if k not in own and k not in ignored]
    absent = [k for k in own if k not in state and k.endswith("num_batches_tracked")]
    missing = [k for k in own if k not in state and k not in absent]
    misshapen = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or misshapen:
        parts = []
        if missing:
            parts.append(f"{len(missing)} keys missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if misshapen:
            k = misshapen[0]
            parts.append(f"{len(misshapen)} with other shapes (e.g. {k}: {tuple(state[k].shape)} "
                         f"in the file vs {tuple(own[k].shape)})")
        raise CheckpointError(
            f"{path} ({describe_state_dict(state)}) does not fit backbone {kind!r}: {'; '.join(parts)}; "
            f"pass the weight file made for {kind!r}."
        )
    matched = {k: state[k] for k in own if k in state}
    net.load_state_dict(matched, strict=False)  # checked above: only `absent` counters are left out
    return {"matched": len(matched), "total": len(own), "ignored": ignored, "absent": absent,
            "source": str(path)}


def _check_resnet_stem(state: dict, path, kind: str) -> None:
    """Refuse a v2 deep-stem file in a torchvision-stem ResNet and the reverse."""
    kernel, example, other = _RESNET_STEMS[kind]
    conv1 = state.get("conv1.weight")
    if not isinstance(conv1, torch.Tensor) or conv1.dim() != 4 or conv1.shape[-1] == kernel:
        return  # right stem, or not a ResNet at all (the key check reports that)
    found = _STEM_WORDS.get(conv1.shape[-1], f"ResNet with conv1.weight {tuple(conv1.shape)}")
    raise CheckpointError(
        f"{path} holds a {found} but backbone {kind!r} is a {_STEM_WORDS[kernel]}; use backbone "
        f"{other!r} for this file, or pass a file like {example}."
    )


def _load_by_position(net: nn.Module, state: dict, path, count: int) -> dict:
    """PANet's ImageNet initialisation: the first ``count`` tensors of the file, in order."""
    own = net.state_dict()
    own_keys = list(own)
    if len(own_keys) != count:  # a guard on this module, not a user error
        raise RuntimeError(f"positional load expects {count} tensors, the backbone has {len(own_keys)}")
    items = list(state.items())
    hint = "PANet's VGG16 copies the first 26 tensors of torchvision's vgg16-397923af.pth by position"
    if len(items) < count:
        raise CheckpointError(f"{path} has {len(items)} tensors, fewer than {count}; {hint}, pass that file.")
    copied = {}
    for i, (own_key, (file_key, tensor)) in enumerate(zip(own_keys, items)):
        if tuple(tensor.shape) != tuple(own[own_key].shape):
            raise CheckpointError(
                f"{path} ({describe_state_dict(state)}): tensor {i} {file_key} {tuple(tensor.shape)} does "
                f"not fit {own_key} {tuple(own[own_key].shape)}; {hint}, pass that file."
            )
        copied[own_key] = tensor
    net.load_state_dict(copied, strict=True)
    return {"matched": count, "total": count, "ignored": [k for k, _ in items[count:]], "absent": [],
            "source": str(path)}
