"""`fss pretrain`: the small backbone of the synthetic benchmark, pretrained without any class label of it.

The FSS methods start from a backbone pretrained elsewhere (ImageNet for the real datasets).
The synthetic benchmark has no such set, so this command makes one of three kinds
(``--source``, params ``pretrain.source``):

* ``objects`` (the embedded default): a separate pool of synthetic images whose objects have
  shapes no benchmark class has (``fss.data.synthetic.POOL_SHAPES``), labelled
  class-agnostically (1 any object, 0 background, 255 ignored); ``images`` pool images of
  nominal side ``image_size`` from their own random stream (``seed``). No benchmark image and
  no benchmark class is seen, so one backbone serves every fold, as ImageNet does for PASCAL.
* ``pool_classes``: the same pool, each object labelled with its pool class (20 pool classes +
  background, ``fss.data.synthetic.pool_class_names``): a pool shape with the texture and hue
  family of the benchmark class of the same id. Like ImageNet's categories, they teach
  features that tell objects apart, without any benchmark image or class shape.
* ``base_classes``: semantic segmentation of one fold's 15 base classes + background on the
  fold's training list (``lists/<convention>/fold<k>/train.txt``); novel-class pixels are
  background, exactly as in episodic base training. One backbone per fold (``--fold``).

In every case: images resized to ``size x size``, random horizontal flips; a small head on
``layer4`` (3x3 conv 128 + BN + ReLU + 1x1 conv), logits upsampled bilinearly to the label
size, cross-entropy ignoring 255; SGD (momentum 0.9) with the training runs' poly learning
rate (``fss.schedule.poly_lr``). Only the backbone's weights are written (a plain state
dict, atomically), loadable with ``build_backbone("small", weights=FILE)``; a JSON report
with the loss and the training-set pixel accuracy / foreground mIoU is written next to it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
import typer
from torch import nn

from fss.data.classes import check_dataset, check_fold
from fss.data.prepared import PreparedDataset
from fss.data.synthetic import POOL_SHAPES, object_pool_image, pool_class_names
from fss.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fss.errors import ConfigError
from fss.models.backbones import build_backbone, list_backbones
from fss.models.checkpoints import atomic_torch_save
from fss.schedule import poly_lr
from pipeline.config import load_params, resolve_device
from pipeline.config_params import resolve_params_section
from pipeline.console import console, track as progress
from pipeline.runs import write_json

SOURCES = ("objects", "pool_classes", "base_classes")
POOL_SOURCES = ("objects", "pool_classes")
DEFAULTS = {"source": "objects", "images": 800, "image_size": 48, "epochs": 6, "batch_size": 16, "lr": 0.02,
            "weight_decay": 1e-4, "momentum": 0.9, "size": 65, "seed": 0, "power": 0.9, "channels_last": False}


_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _as_tensors(image, mask, lut: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One normalised ``[3,S,S]`` image (bilinear) and its ``[S,S]`` label through ``lut`` (nearest)."""
    img = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float()[None] / 255.0
    img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)[0]
    lab = torch.from_numpy(lut[mask])[None, None].float()
    lab = F.interpolate(lab, size=(size, size), mode="nearest")[0, 0].long()
    return (img - _MEAN) / _STD, lab


def load_split_tensors(data, base_classes: list[int], size: int, track: Callable | None = None):
    """All images of a prepared split as normalised ``[N,3,S,S]`` and labels ``[N,S,S]``:
    base class c -> its index 1..len(base_classes), 255 kept, everything else 0."""
    lut = np.zeros(256, dtype=np.int64)
    for i, c in enumerate(base_classes):
        lut[c] = i + 1
    lut[255] = 255
    indices = range(len(data))
    if track is not None:
        indices = track(indices, "load pretraining images", len(data))
    pairs = [_as_tensors(*data.load(i), lut, size) for i in indices]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def object_pool_tensors(seed: int, images: int, image_size: int, size: int, track: Callable | None = None,
                        classes: bool = False):
    """The pretraining pool (``fss.data.synthetic.object_pool_image``) as ``[N,3,S,S]`` and object masks
    ``[N,S,S]`` (``classes``: pool class maps, 1..20)."""
    lut = np.arange(256, dtype=np.int64)
    indices = range(images)
    if track is not None:
        indices = track(indices, "draw the pretraining pool", images)
    pairs = [_as_tensors(*object_pool_image(seed, i, image_size, classes=classes), lut, size) for i in indices]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def pretrain_backbone(
    out: str | Path,
    *,
    source: str = DEFAULTS["source"],
    root: str | Path | None = None,
    fold: int | None = None,
    backbone: str = "small",
    convention: str | None = None,
    images: int = DEFAULTS["images"],
    image_size: int = DEFAULTS["image_size"],
    epochs: int = DEFAULTS["epochs"],
    batch_size: int = DEFAULTS["batch_size"],
    lr: float = DEFAULTS["lr"],
    weight_decay: float = DEFAULTS["weight_decay"],
    momentum: float = DEFAULTS["momentum"],
    power: float = DEFAULTS["power"],
    size: int = DEFAULTS["size"],
    seed: int = DEFAULTS["seed"],
    device: str = "auto",
    dataset: str | None = None,
    track: Callable | None = None,
    channels_last: bool = DEFAULTS["channels_last"],
) -> dict:
    """Pretrain a backbone on ``source`` (module docstring), write its weights to ``out`` and a report
    next to it; return the report plus ``seconds``, the wall-clock time, which the file leaves out
    so that its bytes depend only on what the weights depend on (the graph's train stages depend
    on ``pretrained/`` as a whole, and a rerun that reproduces the weights must not rerun them).

    ``root``/``fold``/``convention``/``dataset`` are read for ``base_classes`` only; ``images``,
    ``image_size`` for the pool sources only. ``channels_last``: model and images in channels-last
    memory format (same arithmetic up to float rounding, faster for tiny CPU maps)."""
    _check_knobs(epochs=epochs, batch_size=batch_size, size=size, lr=lr, images=images, image_size=image_size)
    start = time.monotonic()
    dev = resolve_device(device)
    if source in POOL_SOURCES:
        by_class = source == "pool_classes"
        x_all, y_all = object_pool_tensors(seed, images, image_size, size, track, classes=by_class)
        about = _pool_about(seed, images, image_size, by_class)
        classes = len(about["pool"]["labels"]) + 1  # + background
    elif source == "base_classes":
        data, x_all, y_all = _load_fold(root, fold, convention, dataset, size, track)
        classes, about = len(data.base_classes) + 1, _fold_about(data, fold)
    else:
        raise ConfigError(f"pretrain source={source!r} is unknown; choose one of: {', '.join(SOURCES)}.")
    if x_all.shape[0] < batch_size:
        raise ConfigError(f"pretrain batch_size={batch_size} exceeds the {x_all.shape[0]} pretraining images; lower it.")
    layout = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(seed)  # before the model is built: its initial weights are reproducible
    model = _build_model(backbone, classes, dev, layout)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    losses = _train(model, optimizer, x_all, y_all, epochs, batch_size, lr, power, seed, dev, layout,
                    track, f"pretrain {backbone} on {source}")
    pixel_accuracy, miou = _train_set_scores(model, x_all, y_all, classes, dev, layout)
    out = Path(out)
    atomic_torch_save({k: v.detach().cpu().contiguous() for k, v in model["backbone"].state_dict().items()}, out)
    per_epoch = x_all.shape[0] // batch_size
    tail = losses[-max(1, per_epoch):]
    report = {"kind": "fss-pretrain", "backbone": backbone, "source": source, **about,
              "size": size, "epochs": epochs, "iterations": len(losses), "batch_size": batch_size, "lr": lr,
              "seed": seed, "channels_last": channels_last, "final_loss": sum(tail) / len(tail),
              "train_pixel_accuracy": pixel_accuracy, "train_miou": miou, "weights": str(out)}
    write_json(out.with_suffix(".json"), report)
    return {**report, "seconds": round(time.monotonic() - start, 2)}


def _train(model, optimizer, x_all, y_all, epochs, batch_size, lr, power, seed, dev, layout, track, label):
    """``epochs`` shuffled passes (the last partial batch dropped) at the poly learning rate; the losses."""
    n = x_all.shape[0]
    per_epoch = n // batch_size
    total = epochs * per_epoch
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses, order = [], None
    steps = range(total) if track is None else track(range(total), label, total)
    for it in steps:
        b = it % per_epoch
        if b == 0:
            order = torch.randperm(n, generator=generator)
        x, y = _flipped_batch(x_all, y_all, order[b * batch_size:(b + 1) * batch_size], generator)
        for g in optimizer.param_groups:
            g["lr"] = poly_lr(lr, it, total, power)
        losses.append(_train_step(model, optimizer, x, y, dev, layout))
    return losses


def _pool_about(seed: int, images: int, image_size: int, by_class: bool) -> dict:
    """What a pool backbone was trained on: the pool, its labels, and no benchmark class."""
    labels = list(pool_class_names()) if by_class else ["object"]
    return {"pool": {"shapes": list(POOL_SHAPES), "seed": seed, "images": images, "image_size": image_size,
                     "labels": labels}, "benchmark_classes_seen": []}


def _fold_about(data, fold: int) -> dict:
    """What a ``base_classes`` backbone was trained on: dataset, fold, its classes."""
    return {"dataset": data.dataset, "fold": fold, "convention": data.convention, "images": len(data),
            "base_classes": list(data.base_classes), "novel_classes_seen_as_background": list(data.novel_classes)}


def _check_knobs(*, epochs, batch_size, size, lr, images, image_size) -> None:
    """Reject knob values the loop cannot run with, before any data is loaded."""
    for name, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("size", size, 17),
                             ("images", images, 1), ("image_size", image_size, 32)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"pretrain {name}={value!r} must be an integer >= {low}.")
    if not lr > 0:
        raise ConfigError(f"pretrain lr={lr!r} must be positive.")


def _load_fold(root, fold: int | None, convention: str | None, dataset: str | None, size: int,
               track: Callable | None):
    """The fold's prepared training split and its images/labels as tensors (labels remapped to the base classes)."""
    if root is None or fold is None:
        raise ConfigError("pretrain source=base_classes needs --root and --fold (the fold whose base classes to learn); "
                          "in the DVC graph leave pretrain.source alone and list the backbone in "
                          "benchmark.pretrain_base_classes (stages pretrain_base@<backbone>-<fold>).")
    check_fold(fold)
    data = PreparedDataset(root, fold, "train", convention)
    if dataset is not None and data.dataset != dataset:
        raise ConfigError(f"{root} holds the {data.dataset} dataset, not {dataset}; pass the right --root.")
    images, labels = load_split_tensors(data, list(data.base_classes), size, track)
    return data, images, labels


def _build_model(backbone: str, classes: int, dev, layout) -> nn.ModuleDict:
    """The backbone plus the small segmentation head on ``layer4``, on ``dev`` in memory format ``layout``."""
    net = build_backbone(backbone)
    channels = net.stage_channels["layer4"]
    head = nn.Sequential(
        nn.Conv2d(channels, 128, 3, padding=1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
        nn.Conv2d(128, classes, 1),
    )
    model = nn.ModuleDict({"backbone": net, "head": head}).to(dev)
    model.to(memory_format=layout)
    return model


def _forward(model: nn.ModuleDict, x):
    """Segmentation logits of ``x``, upsampled to its size."""
    feats = model["backbone"](x)["layer4"]
    return F.interpolate(model["head"](feats), size=x.shape[-2:], mode="bilinear", align_corners=True)


def _flipped_batch(images, labels, idx, generator):
    """The images/labels at ``idx``, each pair flipped horizontally with probability 1/2."""
    x, y = images[idx], labels[idx]
    flip = torch.rand(len(idx), generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    y = torch.where(flip[:, None, None], y.flip(-1), y)
    return x, y


def _train_step(model, optimizer, x, y, dev, layout) -> float:
    """One SGD step on the cross-entropy of batch ``x``/``y`` (255 ignored); returns the loss."""
    loss = F.cross_entropy(_forward(model, x.to(dev).contiguous(memory_format=layout)), y.to(dev), ignore_index=255)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _train_set_scores(model, images, labels, k: int, dev, layout) -> tuple[float, float]:
    """Pixel accuracy and mean IoU of the ``k - 1`` foreground classes (background excluded) on the training images."""
    model.eval()
    confusion = torch.zeros(k, k, dtype=torch.long)
    with torch.no_grad():
        for s in range(0, images.shape[0], 64):
            pred = _forward(model, images[s:s + 64].to(dev).contiguous(memory_format=layout)).argmax(1).cpu()
            y = labels[s:s + 64]
            valid = y != 255
            confusion += torch.bincount(y[valid] * k + pred[valid], minlength=k * k).view(k, k)
    inter = confusion.diag().double()
    union = confusion.sum(0).double() + confusion.sum(1).double() - inter
    iou = (inter / union.clamp(min=1)).tolist()
    return float(inter.sum() / confusion.sum().clamp(min=1)), float(sum(iou[1:]) / (k - 1))


def pretrain_command(
    out: Path = typer.Option(..., help="Backbone weight file to write (.pt); a JSON report goes next to it."),
    source: Optional[str] = typer.Option(None, help="objects (a pool of shapes no class has, one object label; "
                                         "default: pretrain.source), pool_classes (the pool's 20 classes) or "
                                         "base_classes (one fold's base classes)."),
    fold: Optional[int] = typer.Option(None, help="base_classes: the fold whose base classes are the only labels."),
    dataset: str = typer.Option("synthetic", help="base_classes: dataset of the prepared directory."),
    root: Path = typer.Option(Path("data/synthetic"), help="base_classes: prepared dataset directory."),
    backbone: str = typer.Option("small", help="Backbone to pretrain."),
    convention: Optional[str] = typer.Option(None, help="base_classes: fold convention (default: the dataset's)."),
    images: Optional[int] = typer.Option(None, help="objects, pool_classes: pool images (default: pretrain.images)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default: params.yaml pretrain.epochs)."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size (default: pretrain.batch_size)."),
    lr: Optional[float] = typer.Option(None, help="Base learning rate (default: pretrain.lr)."),
    size: Optional[int] = typer.Option(None, help="Training image side (default: pretrain.size)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the pool and of training (default: pretrain.seed)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    params: Optional[Path] = typer.Option(None, help="Params file (default ./params.yaml)."),
) -> None:
    """Pretrain a backbone without any benchmark label (objects, pool_classes) or on one fold's base classes."""
    check_dataset(dataset)
    if backbone not in list_backbones():
        raise ConfigError(f"unknown backbone {backbone!r}; choose one of: {', '.join(list_backbones())}.")
    p, _ = load_params(params)
    cli = dict(source=source, images=images, epochs=epochs, batch_size=batch_size, lr=lr, size=size, seed=seed)
    section = resolve_params_section(p, "pretrain", DEFAULTS, cli)
    report = pretrain_backbone(out, root=root, fold=fold, backbone=backbone, convention=convention, device=device,
                               dataset=dataset, track=progress, **section)
    console.print(
        f"[green]pretrained[/green] {backbone} on {report['source']}: loss {report['final_loss']:.3f}, "
        f"foreground mIoU (train) {100 * report['train_miou']:.1f}, {report['seconds']:.1f} s -> {out}",
        highlight=False, soft_wrap=True,
    )
    typer.echo(json.dumps(report, sort_keys=True))
