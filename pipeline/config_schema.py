"""The run configuration's schema: its sections as frozen dataclasses, and their validation.

Each field of a section declares its type, default, help and allowed values in one place
(:func:`_opt`); :func:`build_section` checks a mapping against it with
:func:`fss.coerce.coerce_value`, the same function that checks method knobs. The layer
resolution (params.yaml, CLI, ``--set``) is :mod:`pipeline.config`, which imports this
module (never the other way round).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from fss.coerce import coerce_value
from fss.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
SELECTIONS = ("last", "best")


#: a value some keys take instead of a number, resolved when the run's configuration is (data.num_workers)
AUTO = "auto"


def _opt(default, help: str = "", *, choices=None, low=None, high=None, auto: bool = False):
    """A config field with its allowed values (checked by :func:`_coerce_field`); ``auto``: the
    string "auto" is allowed too (resolved by :func:`pipeline.config.resolve_run_config`)."""
    meta = {"help": help, "choices": choices, "low": low, "high": high, "auto": auto}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataConfig:
    """Where the prepared dataset is and how training episodes are drawn and augmented."""

    root: str = _opt("data/synthetic", "prepared dataset directory ('fss prepare ...' output)")
    convention: str | None = _opt(None, "fold convention (coco: interleaved|contiguous); null = dataset default")
    augment: str = _opt("pfenet", "training augmentation preset", choices=("pfenet", "panet", "hsnet", "canet", "none"))
    train_size: int | None = _opt(None, "training crop/resize side; null = the preset's (pfenet 473, COCO 641)", low=9)
    sampling: str = _opt("pfenet", "training episode sampling: pfenet (walk the list) or panet (class uniform, N-way)", choices=("pfenet", "panet"))
    episodes_per_epoch: int | None = _opt(None, "panet sampling only: episodes per epoch (null = list length)", low=1)
    num_workers: int = _opt(0, "DataLoader worker processes (0 = load in the main process; auto = this fold's cores "
                            "less one, at most 8)", low=0, high=64, auto=True)
    cache_images: bool = _opt(False, "keep decoded images and masks in memory (small datasets: the synthetic benchmark)")


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser (protocol section 6)."""

    name: str = _opt("sgd", "optimiser", choices=("sgd", "adam", "adamw"))
    lr: float = _opt(0.0025, "base learning rate", low=0.0)
    momentum: float = _opt(0.9, "SGD momentum", low=0.0, high=1.0)
    weight_decay: float = _opt(1e-4, "weight decay", low=0.0)
    nesterov: bool = _opt(False, "Nesterov momentum (SGD)")
    pfenet_lr_x10: bool = _opt(
        False,
        "compatibility: PFENet's poly_learning_rate sets every param group to 10x the "
        "scheduled lr (index_split=-1); default False = the stated lr",
    )


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule, evaluated per iteration from the iteration number."""

    name: str = _opt("poly", "poly (pfenet family), step (panet), constant (canet)", choices=("poly", "step", "constant"))
    power: float = _opt(0.9, "poly: lr = base * (1 - it/total)^power", low=0.0)
    milestones: list[float] = _opt([], "step: fractions of the total iterations where lr *= gamma (panet: 10k, 20k of 30k)")
    gamma: float = _opt(0.1, "step: factor applied at each milestone", low=0.0)
    warmup_iterations: int = _opt(0, "linear warm-up iterations before the schedule (0 = none)", low=0)


@dataclass(frozen=True)
class TrainLoopConfig:
    """Length, batch, seeds, devices and checkpointing of the training loop."""

    seed: int = _opt(0, "seed of the training episodes, augmentation and model initialisation", low=0)
    iterations: int | None = _opt(None, "number of optimiser steps (exclusive with epochs)", low=1)
    epochs: int | None = _opt(None, "number of passes over the training list (exclusive with iterations)", low=1)
    batch_size: int = _opt(4, "episodes per optimiser step", low=1)
    device: str = _opt("auto", "auto (cuda if available), cpu or cuda", choices=DEVICES)
    precision: str = _opt("fp32", "fp32, or bf16 autocast (CPU and GPU) in training, validation and evaluation", choices=("fp32", "bf16"))
    channels_last: bool = _opt(False, "channels_last memory format for the model and the input images (train and evaluation); default false")
    num_threads: int = _opt(0, "torch intra-op CPU threads of the training process (validation included; fss evaluate keeps torch's default); 0 = torch's default (one per core)", low=0, high=1024)
    deterministic: str = _opt("auto", "torch.use_deterministic_algorithms: auto = on for CPU, off for CUDA", choices=("auto", "on", "off"))
    log_every: int = _opt(10, "iterations per row of curves.csv (losses averaged over the window)", low=1)
    checkpoint_minutes: float = _opt(5.0, "write the resume checkpoint after this many minutes of work", low=0.0)
    checkpoint_every: int = _opt(0, "also write it every N iterations (0 = only by time and at the end)", low=0)
    grad_clip: float = _opt(0.0, "clip the gradient norm to this value (0 = off; no reference clips)", low=0.0)
    fg_weight: float = _opt(1.0, "weight of foreground pixels in the segmentation cross-entropy (1 = the papers' "
                            "unweighted CE; weighted mean over the valid pixels)", low=0.0)
    dist_backend: str = _opt("auto", "torchrun only: process-group backend, auto = nccl on CUDA, gloo on CPU", choices=("auto", "nccl", "gloo"))
    dist_timeout_minutes: float = _opt(60.0, "torchrun only: how long ranks wait for each other (rank 0 validates alone)", low=1.0)
    sync_batchnorm: bool = _opt(True, "torchrun only: BatchNorm layers in train mode use the global batch's statistics, as one process would; default true")
    ddp_find_unused_parameters: bool = _opt(True, "torchrun only: DDP find_unused_parameters (methods have training-only branches); default true")


@dataclass(frozen=True)
class ValidationConfig:
    """Model selection on validation episodes (protocol section 6).

    Episodes come from the fold's list ``split`` (novel classes) with seed ``seed``, distinct
    from the test seeds; the test protocol's size and scoring are used. ``val`` is what
    PFENet and SimPropNet do (the test list itself, other episodes); ``holdout`` uses images
    that no test list holds (the synthetic benchmark's ``--holdout-images``).
    """

    select: str = _opt("last", "which weights the run keeps as model.pt: last or best (highest val mIoU)", choices=SELECTIONS)
    every: int = _opt(0, "validate every N iterations (0 = only at the end)", low=0)
    episodes: int = _opt(100, "validation episodes per check", low=1)
    seed: int = _opt(123, "episode seed of validation (test seeds: pfenet 321, hsnet 0, panet 1234+)", low=0)
    split: str = _opt("val", "list of the validation episodes: val (the reference: the test images, other episodes) "
                      "or holdout (images in no test list; fss prepare synthetic --holdout-images)", choices=("val", "holdout"))


@dataclass(frozen=True)
class TestConfig:
    """Defaults of ``fss evaluate`` for this run (the protocol preset and its overrides)."""

    protocol: str = _opt("pfenet", "test protocol preset", choices=("pfenet", "bam", "hsnet", "panet", "canet"))
    episodes: int | None = _opt(None, "episodes per run; null = the preset's (pfenet 5000 PASCAL / 20000 COCO)", low=1)
    size: int | None = _opt(None, "test input side; null = the preset's (473, 641, 400, 417, 321)", low=9)
    runs: int | None = _opt(None, "runs (seeds by the preset's rule); null = the preset's", low=1)
    batch_size: int = _opt(1, "episodes per forward pass at test time", low=1)
    num_workers: int | None = _opt(None, "DataLoader workers of evaluation and validation; null = data.num_workers", low=0, high=64)
    feature_cache: bool = _opt(True, "reuse the frozen backbone's features of an image across episodes and shots of one 'fss evaluate' (identical metrics); default true")
    feature_cache_mb: int = _opt(2048, "memory bound of the evaluation feature cache in MiB (least recently used evicted)", low=1)
    image_cache_mb: int = _opt(2048, "memory bound in MiB of the test images kept decoded, resized and normalised for every episode, shot and control of one 'fss evaluate' (identical samples; loading in the main process only); 0 = off", low=0)
    feature_cache_dir: str | None = _opt(None, "also keep evaluation features on disk here, shared between processes (unbounded); null = memory only")
    figure_episodes: int = _opt(4, "episodes drawn in the sample figure (0 = no figure)", low=0, high=32)
    bootstrap_replicates: int = _opt(2000, "bootstrap replicates of every report's 95% mIoU interval (resampled episodes; fss.uncertainty); 0 = no interval", low=0, high=100000)
    bootstrap_seed: int = _opt(0, "seed of the bootstrap's episode draws (fixed, so intervals are reproducible)", low=0)


@dataclass(frozen=True)
class TrackingConfig:
    """Weights & Biases (optional; the run's own files are the source of truth)."""

    wandb: bool = _opt(False, "log to W&B (offline when no credentials; WANDB_MODE is respected)")
    project: str = _opt("fss", "W&B project")
    entity: str | None = _opt(None, "W&B entity (team or user); null = the default")
    init_timeout: float = _opt(30.0, "seconds wandb.init may take before tracking is given up", low=1.0)
    images: int = _opt(4, "sample predictions logged as W&B images per evaluation", low=0, high=32)


PRETRAIN_SOURCES = ("objects", "pool_classes", "base_classes")


@dataclass(frozen=True)
class PretrainConfig:
    """``fss pretrain`` (params section ``pretrain``): the one set of pretraining defaults.

    The defaults are the embedded benchmark's values (params.yaml's ``pretrain`` section);
    each CLI option of ``fss pretrain`` defaults to None = this section's value.
    """

    source: str = _opt("pool_classes", "objects (a pool of shapes no class has, one object label), pool_classes "
                       "(the pool's 20 classes) or base_classes (one fold's base classes)", choices=PRETRAIN_SOURCES)
    backbone: str = _opt("small", "backbone to pretrain")
    images: int = _opt(1600, "objects, pool_classes: pool images", low=1)
    image_size: int = _opt(48, "objects, pool_classes: nominal side of a pool image", low=32)
    epochs: int = _opt(16, "passes over the pretraining images", low=1)
    batch_size: int = _opt(16, "images per SGD step", low=1)
    lr: float = _opt(0.05, "base learning rate of the poly schedule (> 0)", low=0.0)
    weight_decay: float = _opt(1e-4, "SGD weight decay", low=0.0)
    momentum: float = _opt(0.9, "SGD momentum", low=0.0, high=1.0)
    power: float = _opt(0.9, "poly schedule: lr = base * (1 - it/total)^power", low=0.0)
    size: int = _opt(49, "training image side", low=17)
    seed: int = _opt(0, "seed of the pool, of the model's initial weights and of the data order and flips", low=0)
    channels_last: bool = _opt(True, "model and images in channels-last memory format (same arithmetic up to "
                               "rounding, faster for these tiny maps)")
    dataset: str = _opt("synthetic", "base_classes: dataset of the prepared directory")
    root: str = _opt("data/synthetic", "base_classes: prepared dataset directory")
    convention: str | None = _opt(None, "base_classes: fold convention; null = the dataset's")
    device: str = _opt("auto", "auto (cuda if available), cpu or cuda", choices=DEVICES)
    log_every: int = _opt(10, "iterations per row of the run directory's curves.csv", low=1)
    checkpoint_minutes: float = _opt(5.0, "write the resume checkpoint after this many minutes of work", low=0.0)
    checkpoint_every: int = _opt(0, "also write it every N iterations (0 = only by time and at the end)", low=0)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


#: pretrain keys that may differ between a pretraining run directory and a resuming command
PRETRAIN_OPERATIONAL_KEYS = ("device", "log_every", "checkpoint_minutes", "checkpoint_every")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "train": TrainLoopConfig,
    "validation": ValidationConfig,
    "test": TestConfig,
    "tracking": TrackingConfig,
}

#: keys that may differ between the saved config and a resuming command (they do not
#: change what is computed, only where, how fast, and what is reported)
OPERATIONAL_KEYS = (
    "train.device",
    "train.channels_last",
    "train.num_threads",
    "train.dist_backend",
    "train.dist_timeout_minutes",
    "train.ddp_find_unused_parameters",
    "data.num_workers",
    "data.cache_images",
    "train.checkpoint_minutes",
    "train.checkpoint_every",
    "train.log_every",
    "test",
    "tracking",
)


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run depends on; saved as ``RUN_DIR/config.yaml``."""

    method: str
    dataset: str
    fold: int
    shot: int
    backbone: str
    backbone_weights: str | None
    knobs: Mapping[str, Any]
    data: DataConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    train: TrainLoopConfig
    validation: ValidationConfig
    test: TestConfig
    tracking: TrackingConfig
    #: where the values came from (params file, overrides): recorded, not compared
    provenance: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        out = {
            "method": self.method,
            "dataset": self.dataset,
            "fold": self.fold,
            "shot": self.shot,
            "backbone": self.backbone,
            "backbone_weights": self.backbone_weights,
            "knobs": dict(self.knobs),
        }
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        out["provenance"] = dict(self.provenance)
        return _plain(out)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    @property
    def group(self) -> str:
        """W&B group / table row key: method-dataset-backbone-shot."""
        return f"{self.method}-{self.dataset}-{self.backbone}-{self.shot}shot"

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values (for comparing runs and logging)."""
        d = self.to_dict()
        d.pop("provenance", None)
        return flatten(d)


TOP_LEVEL_KEYS = ("method", "dataset", "fold", "shot", "backbone", "backbone_weights")


def _plain(value: Any) -> Any:
    """Tuples -> lists recursively, so YAML/JSON round-trips compare equal."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def section_keys() -> dict[str, list[str]]:
    """Section name -> its key names, in declaration order."""
    return {name: [f.name for f in dataclasses.fields(cls)] for name, cls in SECTIONS.items()}


def _coerce_field(section: str, f: dataclasses.Field, tp: Any, value: Any) -> Any:
    if f.metadata.get("auto") and value == AUTO:
        return AUTO
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    optional = origin in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    kind, item_kind = (list, args[0]) if origin is list else (tp, None)
    meta = f.metadata
    return coerce_value(
        f"config key {section}.{f.name}", value, kind, item_kind, optional=optional,
        choices=meta.get("choices"), low=meta.get("low"), high=meta.get("high"),
    )


def build_section(name: str, values: Mapping[str, Any] | None, cls: type | None = None):
    """Instantiate section ``name`` (class ``cls``, default ``SECTIONS[name]``) from a mapping,
    checking keys, types and ranges."""
    cls = cls or SECTIONS[name]
    values = dict(values or {})
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(
            f"config section {name!r} has no key {unknown[0]!r}; its keys are: {', '.join(names)}."
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            kwargs[f.name] = _coerce_field(name, f, hints[f.name], values[f.name])
    return cls(**kwargs)


def describe_sections() -> dict[str, dict[str, dict]]:
    """Every config key with its default and help (for documentation and errors)."""
    out = {}
    for name, cls in SECTIONS.items():
        out[name] = {}
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out[name][f.name] = {"default": default, "help": f.metadata.get("help", "")}
    return out
