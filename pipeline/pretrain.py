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

The steps run on the training loop of ``fss train`` (:func:`pipeline.loop.run_steps`) in a
run directory (``--run-dir``, default ``.<out stem>.run/`` next to ``out``; the graph's
``runs/pretrain/<name>``): ``checkpoint.pt`` at ``pretrain.checkpoint_minutes`` /
``checkpoint_every``, ``curves.csv``, ``train.log`` and ``pretrain_run.json`` (the
configuration and code digest it was started with). Rerunning the command after a kill
resumes there and ends with the same weights as an uninterrupted run: the data order and
flips are redrawn from ``seed`` up to the resumed iteration; a run directory of another
configuration or code starts afresh. The configuration is params section ``pretrain``
(:class:`pipeline.config_schema.PretrainConfig`, the one set of defaults); every CLI option
defaults to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
import typer
from torch import nn

from fss.atomic import remove_stale_temporaries
from fss.data.classes import check_dataset, check_fold
from fss.data.prepared import PreparedDataset
from fss.data.synthetic import POOL_SHAPES, object_pool_image, pool_class_names
from fss.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fss.errors import ConfigError
from fss.models.backbones import build_backbone, list_backbones
from fss.models.checkpoints import atomic_torch_save
from fss.schedule import poly_lr
from pipeline import distributed as D
from pipeline import loop as L
from pipeline import runs as R
from pipeline.codedeps import REPO, stage_code
from pipeline.config import load_params, resolve_device
from pipeline.config_params import resolve_pretrain_config
from pipeline.config_schema import PRETRAIN_OPERATIONAL_KEYS, PRETRAIN_SOURCES, PretrainConfig
from pipeline.console import console, track as progress

SOURCES = PRETRAIN_SOURCES
POOL_SOURCES = ("objects", "pool_classes")
RUN_FILE = "pretrain_run.json"  # in the run directory: the configuration and code it was started with


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


def pretrain_backbone(out: str | os.PathLike, config: PretrainConfig | None = None, *, fold: int | None = None,
                      run_dir: str | os.PathLike | None = None, stop_after: int | None = None,
                      track: Callable | None = None, say: Callable[[str], None] | None = None, **overrides) -> dict:
    """Pretrain a backbone on ``config.source`` (module docstring) in ``run_dir`` (default
    ``.<out stem>.run`` next to ``out``, resumed when it holds the same run), write its weights
    to ``out`` and a report next to it.

    ``config``: the pretrain section (default :class:`PretrainConfig`'s), ``overrides`` any of its
    keys. Returns one shape: ``status`` (done, or stopped by a signal or ``stop_after``, testing),
    ``iteration`` of ``total_iterations``, ``signal``, ``seconds`` (wall-clock time, which the
    report file leaves out so that its bytes depend only on what the weights depend on: the
    graph's train stages depend on ``pretrained/`` as a whole, and a rerun that reproduces the
    weights must not rerun them) and ``report`` (the file's content when done, else None).

    ``root``/``fold``/``convention``/``dataset`` are read for ``base_classes`` only; ``images``,
    ``image_size`` for the pool sources only. ``channels_last``: model and images in channels-last
    memory format (same arithmetic up to float rounding, faster for tiny CPU maps)."""
    start = time.monotonic()
    given = {k: str(v) if isinstance(v, os.PathLike) else v for k, v in overrides.items()}
    c = resolve_pretrain_config({"pretrain": {} if config is None else config.to_dict()}, given)
    if not c.lr > 0:
        raise ConfigError(f"pretrain lr={c.lr!r} must be positive.")
    out = Path(out)
    dev = resolve_device(c.device)
    x_all, y_all, classes, about = _pretraining_set(c, fold, track)
    if x_all.shape[0] < c.batch_size:
        raise ConfigError(f"pretrain batch_size={c.batch_size} exceeds the {x_all.shape[0]} pretraining images; lower it.")
    layout = torch.channels_last if c.channels_last else torch.contiguous_format
    torch.manual_seed(c.seed)  # before the model is built: its initial weights are reproducible
    model = _build_model(c.backbone, classes, dev, layout)
    optimizer = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
    main = L.MainProcess(D.SINGLE, out.parent / f".{out.stem}.run" if run_dir is None else run_dir,
                         say or (lambda m: None))
    prepare_run_dir(main, c, fold)
    task = PretrainTask(config=c, main=main, model=model, optimizer=optimizer, per_epoch=x_all.shape[0] // c.batch_size,
                        total=c.epochs * (x_all.shape[0] // c.batch_size), dev=dev, layout=layout,
                        curves=main.csv_log(R.CURVES_FILE, ("iteration", "epoch", "lr")))
    state = task.resume_or_start()
    model.train()
    outcome = L.run_steps(task, PoolBatches(x_all, y_all, c.batch_size, c.seed), state, main=main,
                          cadence=L.Cadence(c.checkpoint_every, c.checkpoint_minutes), stop_after=stop_after,
                          track=track, label=f"pretrain {c.backbone} on {c.source}")
    result = {"status": "stopped", "iteration": state.iteration, "total_iterations": task.total,
              "signal": outcome.signal, "report": None}
    if outcome.reason is not None:
        main.run.log(outcome.reason)
        main.say(f"{outcome.reason}; rerun the same command to resume.")
        return {**result, "seconds": round(time.monotonic() - start, 2)}
    pixel_accuracy, miou = _train_set_scores(model, x_all, y_all, classes, dev, layout)
    atomic_torch_save({k: v.detach().cpu().contiguous() for k, v in model["backbone"].state_dict().items()}, out)
    losses = state.extra["losses"]
    tail = losses[-max(1, task.per_epoch):]
    report = {"kind": "fss-pretrain", "backbone": c.backbone, "source": c.source, **about,
              "size": c.size, "epochs": c.epochs, "iterations": len(losses), "batch_size": c.batch_size, "lr": c.lr,
              "seed": c.seed, "channels_last": c.channels_last, "final_loss": sum(tail) / len(tail),
              "train_pixel_accuracy": pixel_accuracy, "train_miou": miou, "weights": str(out)}
    R.write_json(out.with_suffix(".json"), report)
    main.run.log(f"finished: backbone weights -> {out}")
    return {**result, "status": "done", "signal": None, "report": report, "seconds": round(time.monotonic() - start, 2)}


def _pretraining_set(c: PretrainConfig, fold: int | None, track: Callable | None):
    """Images ``[N,3,S,S]``, labels ``[N,S,S]``, the number of classes with background, and what they are."""
    if c.source in POOL_SOURCES:
        by_class = c.source == "pool_classes"
        x_all, y_all = object_pool_tensors(c.seed, c.images, c.image_size, c.size, track, classes=by_class)
        about = _pool_about(c.seed, c.images, c.image_size, by_class)
        return x_all, y_all, len(about["pool"]["labels"]) + 1, about
    data, x_all, y_all = _load_fold(c.root, fold, c.convention, c.dataset, c.size, track)
    return x_all, y_all, len(data.base_classes) + 1, _fold_about(data, fold)


def run_identity(c: PretrainConfig, fold: int | None) -> dict:
    """What a pretraining run directory holds a run of: the configuration (operational keys
    aside), the fold, and the digest of the code the graph's pretrain stage lists."""
    h = hashlib.sha256()
    for name in sorted(stage_code("pretrain")):
        h.update(name.encode() + b"\0" + (REPO / name).read_bytes())
    config = {k: v for k, v in c.to_dict().items() if k not in PRETRAIN_OPERATIONAL_KEYS}
    return json.loads(json.dumps({"kind": "fss-pretrain-run", "config": config, "fold": fold, "code": h.hexdigest()}))


def prepare_run_dir(main: L.MainProcess, c: PretrainConfig, fold: int | None) -> None:
    """Create the run directory, keep it when it holds this run (resumed), or empty it when it
    holds a run of another configuration or code; refuse a directory that is no pretraining run."""
    path, marker, identity = main.run.path, main.run.file(RUN_FILE), run_identity(c, fold)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--run-dir {path} exists and is not a directory; choose another --run-dir.")
    if marker.is_file():
        try:
            saved = json.loads(marker.read_text())
        except (ValueError, UnicodeDecodeError):
            saved = None
        if saved == identity:
            remove_stale_temporaries(path)  # what a killed checkpoint write left
            return
        main.say(f"{path} holds a pretraining run of other inputs (configuration or code); starting afresh.")
        for p in path.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    elif path.is_dir() and any(path.iterdir()):
        raise ConfigError(f"--run-dir {path} exists and is not empty but holds no {RUN_FILE}; choose another --run-dir.")
    path.mkdir(parents=True, exist_ok=True)
    R.write_json(marker, identity)


class PoolBatches:
    """The pretraining batches of iteration ``it`` (``at``): a shuffled pass per epoch (the last
    partial batch dropped), each image flipped horizontally with probability 1/2, all drawn from
    one generator seeded with ``seed``. Iterations come in order; the first one asked (a resumed
    run's) is reached by redrawing the permutations and flips of the ones before it."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int):
        self.images, self.labels, self.batch_size, self.seed = images, labels, batch_size, seed
        self.per_epoch = images.shape[0] // batch_size
        self.generator: torch.Generator | None = None
        self.order: torch.Tensor | None = None
        self.next = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def at(self, it: int) -> tuple[int, tuple[torch.Tensor, torch.Tensor]]:
        if it != self.next:
            self._redraw_until(it)
        epoch, b = divmod(it, self.per_epoch)
        if b == 0:
            self.order = torch.randperm(self.images.shape[0], generator=self.generator)
        idx = self.order[b * self.batch_size:(b + 1) * self.batch_size]
        self.next = it + 1
        return epoch, _flipped_batch(self.images, self.labels, idx, self.generator)

    def _redraw_until(self, it: int) -> None:
        """The generator (and the epoch's order) as they are after iterations ``0 .. it - 1``."""
        self.generator = torch.Generator().manual_seed(self.seed)
        for j in range(it):
            if j % self.per_epoch == 0:
                self.order = torch.randperm(self.images.shape[0], generator=self.generator)
            torch.rand(self.batch_size, generator=self.generator)  # the flips of iteration j


@dataclass
class PretrainTask:
    """Pretraining as a task of :func:`pipeline.loop.run_steps`: poly lr, one SGD step, the losses."""

    config: PretrainConfig
    main: L.MainProcess
    model: nn.ModuleDict
    optimizer: Any
    per_epoch: int
    total: int
    dev: Any
    layout: Any
    curves: Any

    def resume_or_start(self) -> L.LoopState:
        """The run directory's checkpoint state, or a fresh one with an emptied curves.csv."""
        run = self.main.run
        state = L.resume(self.main, self.model, self.optimizer, self.total)
        if state is None:
            self.curves.reset()
            run.log(f"started: pretrain {self.config.backbone} on {self.config.source}, {self.total} iterations")
            return L.LoopState(extra={"losses": []})
        self.curves.truncate_after(state.iteration)  # rows a killed run logged after its checkpoint
        run.log(f"resumed at iteration {state.iteration}/{self.total}")
        self.main.say(f"resuming {run.path} at iteration {state.iteration}/{self.total}")
        return state

    def learning_rate(self, it: int) -> float:
        return poly_lr(self.config.lr, it, self.total, self.config.power)

    def step(self, it: int, batch, lr: float, stop_requested: bool) -> tuple[dict, bool]:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        x, y = batch
        return {"loss": _train_step(self.model, self.optimizer, x, y, self.dev, self.layout)}, stop_requested

    def after_step(self, state: L.LoopState, epoch: int, lr: float, losses: dict) -> None:
        state.extra["losses"].append(losses["loss"])  # the report's final loss: the last epoch's mean
        L.log_window(state, self.curves, losses, every=self.config.log_every, total=self.total,
                     first={"epoch": epoch, "lr": lr})

    def save_checkpoint(self, state: L.LoopState) -> None:
        L.save_state(self.main.run.checkpoint_file, config=self.config, state=state, total=self.total,
                     model=self.model, optimizer=self.optimizer,
                     scheduler_state={"name": "poly", "last_lr": self.learning_rate(max(state.iteration - 1, 0))})


def _pool_about(seed: int, images: int, image_size: int, by_class: bool) -> dict:
    """What a pool backbone was trained on: the pool, its labels, and no benchmark class."""
    labels = list(pool_class_names()) if by_class else ["object"]
    return {"pool": {"shapes": list(POOL_SHAPES), "seed": seed, "images": images, "image_size": image_size,
                     "labels": labels}, "benchmark_classes_seen": []}


def _fold_about(data, fold: int) -> dict:
    """What a ``base_classes`` backbone was trained on: dataset, fold, its classes."""
    return {"dataset": data.dataset, "fold": fold, "convention": data.convention, "images": len(data),
            "base_classes": list(data.base_classes), "novel_classes_seen_as_background": list(data.novel_classes)}


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
    source: Optional[str] = typer.Option(None, help="objects (a pool of shapes no class has, one object label), "
                                         "pool_classes (the pool's 20 classes) or base_classes (one fold's base "
                                         "classes); default: params pretrain.source."),
    fold: Optional[int] = typer.Option(None, help="base_classes: the fold whose base classes are the only labels."),
    dataset: Optional[str] = typer.Option(None, help="base_classes: dataset of the prepared directory (default: pretrain.dataset)."),
    root: Optional[Path] = typer.Option(None, help="base_classes: prepared dataset directory (default: pretrain.root)."),
    backbone: Optional[str] = typer.Option(None, help="Backbone to pretrain (default: pretrain.backbone)."),
    convention: Optional[str] = typer.Option(None, help="base_classes: fold convention (default: pretrain.convention, the dataset's)."),
    images: Optional[int] = typer.Option(None, help="objects, pool_classes: pool images (default: pretrain.images)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default: pretrain.epochs)."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size (default: pretrain.batch_size)."),
    lr: Optional[float] = typer.Option(None, help="Base learning rate (default: pretrain.lr)."),
    size: Optional[int] = typer.Option(None, help="Training image side (default: pretrain.size)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the pool and of training (default: pretrain.seed)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda (default: pretrain.device)."),
    run_dir: Optional[Path] = typer.Option(None, help="Run directory (checkpoint.pt, curves.csv; rerun the same command "
                                           "to resume); default: .<OUT stem>.run next to OUT."),
    params: Optional[Path] = typer.Option(None, help="Params file (default ./params.yaml)."),
    stop_after: Optional[int] = typer.Option(None, hidden=True, help="Testing: checkpoint and stop after N iterations."),
) -> None:
    """Pretrain a backbone without any benchmark label (objects, pool_classes) or on one fold's base classes."""
    p, _ = load_params(params)
    cli = dict(source=source, dataset=dataset, root=None if root is None else str(root), backbone=backbone,
               convention=convention, images=images, epochs=epochs, batch_size=batch_size, lr=lr, size=size,
               seed=seed, device=device)
    config = resolve_pretrain_config(p, cli)
    check_dataset(config.dataset)
    if config.backbone not in list_backbones():
        raise ConfigError(f"unknown backbone {config.backbone!r}; choose one of: {', '.join(list_backbones())}.")
    say = lambda m: console.print(m, highlight=False, markup=False, soft_wrap=True)  # noqa: E731
    result = pretrain_backbone(out, config, fold=fold, run_dir=run_dir, stop_after=stop_after, track=progress, say=say)
    report = result["report"]
    if report is not None:
        console.print(
            f"[green]pretrained[/green] {config.backbone} on {report['source']}: loss {report['final_loss']:.3f}, "
            f"foreground mIoU (train) {100 * report['train_miou']:.1f}, {result['seconds']:.1f} s -> {out}",
            highlight=False, soft_wrap=True,
        )
    typer.echo(json.dumps(result, sort_keys=True))
    if result["status"] == "stopped" and result["signal"] is not None:
        raise typer.Exit(130)  # interrupted: never report success (DVC must not record the outputs)
