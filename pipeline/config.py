"""Run configuration: params.yaml defaults + CLI overrides -> one typed, frozen object.

Resolution order for ``fss train --method M --dataset D`` (later wins)::

    dataclass defaults  <  params.yaml ``defaults``  <  ``methods.M`` (paper values)
        <  ``datasets.D`` (what the dataset imposes)  <  ``methods.M.datasets.D``
        <  CLI options (--backbone, --iterations/--epochs, ...)  <  ``--set KEY=VALUE``

Every layer uses the same shape as :class:`RunConfig` (sections ``data``, ``optim``,
``schedule``, ``train``, ``validation``, ``test``, ``tracking`` and the method's
``knobs``), so a key means the same thing wherever it is written. ``--set`` keys are
dotted paths (``optim.lr=0.01``, ``knobs.lam=0.3``) or an unambiguous last component
(``lr=0.01``, ``lam=0.3``). In any layer, setting ``train.iterations`` clears
``train.epochs`` and the other way round, so the last layer decides the length.

The resolved config is saved as ``RUN_DIR/config.yaml`` and compared with the command on a
rerun (see :mod:`pipeline.runs`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from fss.errors import ConfigError

#: the repository's params.yaml (used when the working directory has none)
REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"

DEVICES = ("auto", "cpu", "cuda")
SELECTIONS = ("last", "best")


def _opt(default, help: str = "", *, choices=None, low=None, high=None):
    """A config field with its allowed values (checked by :func:`_coerce_field`)."""
    meta = {"help": help, "choices": choices, "low": low, "high": high}
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
    num_workers: int = _opt(0, "DataLoader worker processes (0 = load in the main process)", low=0, high=64)
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
    dist_backend: str = _opt("auto", "torchrun only: process-group backend, auto = nccl on CUDA, gloo on CPU", choices=("auto", "nccl", "gloo"))
    dist_timeout_minutes: float = _opt(60.0, "torchrun only: how long ranks wait for each other (rank 0 validates alone)", low=1.0)
    sync_batchnorm: bool = _opt(True, "torchrun only: BatchNorm layers in train mode use the global batch's statistics, as one process would; default true")
    ddp_find_unused_parameters: bool = _opt(True, "torchrun only: DDP find_unused_parameters (methods have training-only branches); default true")


@dataclass(frozen=True)
class ValidationConfig:
    """Model selection on validation episodes (protocol section 6).

    Episodes come from the fold's val list (the novel classes, as PFENet and SimPropNet
    select) with seed ``seed``, distinct from the test seeds; the test protocol's size and
    scoring are used.
    """

    select: str = _opt("last", "which weights the run keeps as model.pt: last or best (highest val mIoU)", choices=SELECTIONS)
    every: int = _opt(0, "validate every N iterations (0 = only at the end)", low=0)
    episodes: int = _opt(100, "validation episodes per check", low=1)
    seed: int = _opt(123, "episode seed of validation (test seeds: pfenet 321, hsnet 0, panet 1234+)", low=0)


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
    feature_cache_dir: str | None = _opt(None, "also keep evaluation features on disk here, shared between processes (unbounded); null = memory only")
    figure_episodes: int = _opt(4, "episodes drawn in the sample figure (0 = no figure)", low=0, high=32)


@dataclass(frozen=True)
class TrackingConfig:
    """Weights & Biases (optional; the run's own files are the source of truth)."""

    wandb: bool = _opt(False, "log to W&B (offline when no credentials; WANDB_MODE is respected)")
    project: str = _opt("fss", "W&B project")
    entity: str | None = _opt(None, "W&B entity (team or user); null = the default")
    init_timeout: float = _opt(30.0, "seconds wandb.init may take before tracking is given up", low=1.0)
    images: int = _opt(4, "sample predictions logged as W&B images per evaluation", low=0, high=32)


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


# ---------------------------------------------------------------- helpers


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


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base`` (nested dicts merged, anything else replaced).

    ``train.iterations`` and ``train.epochs`` exclude each other: a layer that sets one
    (non-null) and not the other clears the other.
    """
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    if isinstance(over, Mapping) and "iterations" in over and "epochs" not in over and over["iterations"] is not None:
        if "epochs" in out:
            out["epochs"] = None
    if isinstance(over, Mapping) and "epochs" in over and "iterations" not in over and over["epochs"] is not None:
        if "iterations" in out:
            out["iterations"] = None
    return out


def load_params(path: str | os.PathLike | None = None) -> tuple[dict, Path | None]:
    """The parsed params file and its path.

    ``path`` None: ``./params.yaml`` if present, else the repository's params.yaml, else
    empty (dataclass defaults only).
    """
    if path is None:
        candidates = [Path("params.yaml"), REPO_PARAMS]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            return {}, None
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"params file {p} does not exist; pass --params FILE or run from the repository root.")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"params file {p} is not valid YAML{where}; fix the file.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"params file {p} must hold a mapping at the top level.")
    return data, p


def _section_of(params: Mapping[str, Any], *keys: str) -> dict:
    node: Any = params
    for k in keys:
        if not isinstance(node, Mapping) or k not in node or node[k] is None:
            return {}
        node = node[k]
    if not isinstance(node, Mapping):
        raise ConfigError(f"params key {'.'.join(keys)} must be a mapping, got {node!r}.")
    return dict(node)


def parse_set_values(items: list[str] | None) -> dict[str, Any]:
    """``["a.b=1", "lam=0.3"]`` -> ``{"a.b": 1, "lam": 0.3}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not KEY=VALUE; write e.g. --set optim.lr=0.01.")
        key, _, raw = item.partition("=")
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item!r} has an empty key; write e.g. --set optim.lr=0.01.")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out[key] = value
    return out


def _section_keys() -> dict[str, list[str]]:
    return {name: [f.name for f in dataclasses.fields(cls)] for name, cls in SECTIONS.items()}


TOP_LEVEL_KEYS = ("method", "dataset", "fold", "shot", "backbone", "backbone_weights")


def expand_set_key(key: str, knob_names: list[str]) -> str:
    """A --set key -> its dotted path; bare names must match exactly one key."""
    sections = _section_keys()
    if "." in key:
        head, _, rest = key.partition(".")
        if head == "knobs":
            if rest not in knob_names:
                raise ConfigError(
                    f"--set {key}: the method has no knob {rest!r}; its knobs are: {', '.join(sorted(knob_names)) or '(none)'}."
                )
            return key
        if head in sections:
            if rest not in sections[head]:
                raise ConfigError(
                    f"--set {key}: section {head!r} has no key {rest!r}; its keys are: {', '.join(sections[head])}."
                )
            return key
        raise ConfigError(
            f"--set {key}: unknown section {head!r}; choose one of: knobs, {', '.join(sections)}."
        )
    if key in TOP_LEVEL_KEYS:
        return key
    matches = [f"{s}.{key}" for s, keys in sections.items() if key in keys]
    if key in knob_names:
        matches.append(f"knobs.{key}")
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"--set {key} is ambiguous; write one of: {', '.join(matches)}.")
    every = [f"{s}.{k}" for s, keys in sections.items() for k in keys] + [f"knobs.{k}" for k in knob_names]
    raise ConfigError(f"--set {key}: unknown key; valid keys are: {', '.join(every)}.")


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


# ---------------------------------------------------------------- typed construction


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce_scalar(value: Any, tp: Any) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
            return False
        raise ValueError
    if tp is int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(value, str):
            return int(value.strip())
        if isinstance(value, int):
            return value
        raise ValueError
    if tp is float:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value.strip())
        raise ValueError
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError
    raise ValueError


def _coerce_field(section: str, f: dataclasses.Field, tp: Any, value: Any) -> Any:
    key = f"{section}.{f.name}" if section else f.name
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    optional = origin in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    try:
        if origin is list:
            if isinstance(value, str):
                value = [v for v in value.strip("[]").split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            out = [_coerce_scalar(v, args[0]) for v in value]
        else:
            out = _coerce_scalar(value, tp)
    except (ValueError, TypeError):
        want = f"list of {_type_name(args[0])}" if origin is list else _type_name(tp)
        raise ConfigError(
            f"config key {key} must be {'null or ' if optional else ''}{want}, got {value!r}."
        ) from None
    meta = f.metadata
    items = out if isinstance(out, list) else [out]
    if meta.get("choices") is not None and any(i not in meta["choices"] for i in items):
        raise ConfigError(f"config key {key} got {value!r}; choose one of: {', '.join(map(str, meta['choices']))}.")
    low, high = meta.get("low"), meta.get("high")
    for i in items:
        if isinstance(i, (int, float)) and not isinstance(i, bool):
            if (low is not None and i < low) or (high is not None and i > high):
                bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
                raise ConfigError(f"config key {key} got {value!r}; it must be {bounds}.")
    return out


def build_section(name: str, values: Mapping[str, Any] | None):
    """Instantiate section ``name`` from a mapping, checking keys, types and ranges."""
    cls = SECTIONS[name]
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


# ---------------------------------------------------------------- resolution


def _check_backbone(method: str, backbone: str) -> None:
    from fss.models.backbones import list_backbones
    from fss.models.registry import get_method

    spec = get_method(method)
    allowed = list(spec.backbones) or list_backbones()
    if backbone not in allowed:
        raise ConfigError(
            f"unknown backbone {backbone!r} for method '{method}'; choose one of: {', '.join(allowed)}."
        )


def _check_shot(shot: Any) -> int:
    if isinstance(shot, bool) or not isinstance(shot, int) or shot < 1:
        raise ConfigError(f"shot {shot!r} must be a positive integer (1 or 5 in the papers).")
    return shot


def layered_values(params: Mapping[str, Any], method: str | None, dataset: str) -> dict[str, Any]:
    """The merged params layers: defaults < methods.M < datasets.D < methods.M.datasets.D.

    ``methods.M`` holds the paper's values; ``datasets.D`` what the dataset imposes (its
    root, sizes, and for the synthetic benchmark the scaled-down schedule);
    ``methods.M.datasets.D`` per-method values for one dataset (e.g. COCO learning rates).
    """
    merged = _section_of(params, "defaults")
    method_layer: dict = {}
    per_dataset: dict = {}
    if method is not None:
        method_layer = _section_of(params, "methods", method)
        per_dataset = _section_of(method_layer, "datasets", dataset)
        method_layer.pop("datasets", None)
    merged = deep_merge(merged, method_layer)
    merged = deep_merge(merged, _section_of(params, "datasets", dataset))
    merged = deep_merge(merged, per_dataset)
    return merged


def resolve_run_config(
    *,
    method: str,
    dataset: str,
    fold: int,
    shot: int,
    backbone: str | None = None,
    iterations: int | None = None,
    epochs: int | None = None,
    device: str | None = None,
    set_values: list[str] | None = None,
    params_path: str | os.PathLike | None = None,
) -> RunConfig:
    """The configuration of one training run (see the module docstring for the order)."""
    from fss.data.classes import check_dataset, check_fold
    from fss.models.registry import get_method

    spec = get_method(method)  # unknown method -> lists the registered ones
    check_dataset(dataset)
    check_fold(fold)
    _check_shot(shot)
    if iterations is not None and epochs is not None:
        raise ConfigError("give --iterations or --epochs, not both.")
    params, path = load_params(params_path)
    layers = layered_values(params, method, dataset)

    cli: dict[str, Any] = {}
    if backbone is not None:
        cli["backbone"] = backbone
    if iterations is not None:
        cli.setdefault("train", {})["iterations"] = iterations
    if epochs is not None:
        cli.setdefault("train", {})["epochs"] = epochs
    if device is not None:
        cli.setdefault("train", {})["device"] = device
    merged = deep_merge(layers, cli)
    overrides = parse_set_values(set_values)
    knob_names = list(spec.knobs)
    expanded = {expand_set_key(k, knob_names): v for k, v in overrides.items()}
    for key in ("method", "dataset", "fold", "shot"):
        if key in expanded:
            raise ConfigError(f"--set {key}=... is not allowed; use the --{key} option.")
    merged = deep_merge(merged, _nest(expanded))
    return build_run_config(
        merged, method=method, dataset=dataset, fold=fold, shot=shot,
        provenance={
            "params_file": str(path) if path else None,
            "set": dict(expanded),
            "cli": {k: v for k, v in dict(backbone=backbone, iterations=iterations, epochs=epochs, device=device).items() if v is not None},
        },
    )


def build_run_config(values: Mapping[str, Any], *, method: str, dataset: str, fold: int, shot: int,
                     provenance: Mapping[str, Any] | None = None) -> RunConfig:
    """Typed :class:`RunConfig` from merged values (also used to re-read config.yaml)."""
    from fss.models.registry import resolve_knobs

    values = dict(values)
    allowed_top = set(TOP_LEVEL_KEYS) | set(SECTIONS) | {"knobs", "provenance"}
    unknown = sorted(set(values) - allowed_top)
    if unknown:
        raise ConfigError(
            f"unknown config key {unknown[0]!r}; valid top-level keys are: {', '.join(sorted(allowed_top))}."
        )
    backbone = values.get("backbone") or "small"
    if not isinstance(backbone, str):
        raise ConfigError(f"config key backbone must be a string, got {backbone!r}.")
    _check_backbone(method, backbone)
    knobs_in = values.get("knobs") or {}
    if not isinstance(knobs_in, Mapping):
        raise ConfigError(f"config key knobs must be a mapping of knob names to values, got {knobs_in!r}.")
    knobs = resolve_knobs(method, dict(knobs_in))
    weights = values.get("backbone_weights")
    if weights is not None:
        if not isinstance(weights, str):
            raise ConfigError(f"config key backbone_weights must be a path string or null, got {weights!r}.")
        try:
            weights = weights.format(fold=fold, backbone=backbone, dataset=dataset, method=method)
        except (KeyError, IndexError, ValueError):
            raise ConfigError(
                f"config key backbone_weights={weights!r} may only use the fields {{fold}}, {{backbone}}, {{dataset}}, {{method}}."
            ) from None
        weights = weights or None
    sections = {name: build_section(name, values.get(name)) for name in SECTIONS}
    loop: TrainLoopConfig = sections["train"]
    if loop.iterations is None and loop.epochs is None:
        raise ConfigError(
            f"the run has no length: set train.iterations or train.epochs (params.yaml methods.{method} or --iterations N)."
        )
    if loop.iterations is not None and loop.epochs is not None:
        raise ConfigError("config sets both train.iterations and train.epochs; keep one of them.")
    sched: ScheduleConfig = sections["schedule"]
    if sched.name == "step" and any(not 0.0 < m < 1.0 for m in sched.milestones):
        raise ConfigError(
            f"config key schedule.milestones={sched.milestones} must be fractions in (0, 1) of the total iterations."
        )
    return RunConfig(
        method=method, dataset=dataset, fold=int(fold), shot=int(shot), backbone=backbone,
        backbone_weights=weights, knobs=knobs, provenance=dict(provenance or {}), **sections,
    )


def config_from_dict(d: Mapping[str, Any]) -> RunConfig:
    """Rebuild a :class:`RunConfig` from :meth:`RunConfig.to_dict` output (config.yaml)."""
    d = dict(d)
    missing = [k for k in ("method", "dataset", "fold", "shot") if k not in d]
    if missing:
        raise ConfigError(f"saved config lacks the keys {missing}; the run directory is not a training run of this project.")
    values = {k: v for k, v in d.items() if k not in ("method", "dataset", "fold", "shot", "provenance")}
    if "backbone_weights" in values and values["backbone_weights"] is not None:
        # already formatted; protect literal braces from a second format
        values["backbone_weights"] = values["backbone_weights"].replace("{", "{{").replace("}", "}}")
    return build_run_config(values, method=d["method"], dataset=d["dataset"], fold=int(d["fold"]),
                            shot=int(d["shot"]), provenance=d.get("provenance") or {})


def config_differences(saved: RunConfig, current: RunConfig, ignore=OPERATIONAL_KEYS) -> list[tuple[str, Any, Any]]:
    """Keys whose values differ (operational keys such as the device are ignored)."""
    a, b = saved.flat(), current.flat()
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == k or key.startswith(k + ".") for k in ignore):
            continue
        if a.get(key) != b.get(key):
            diffs.append((key, a.get(key), b.get(key)))
    return diffs


def eval_defaults(params: Mapping[str, Any], dataset: str, method: str | None = None) -> TestConfig:
    """The ``test`` section for an imported model (params layers, no run config)."""
    layers = layered_values(params, method, dataset)
    return build_section("test", layers.get("test"))


def tracking_defaults(params: Mapping[str, Any], dataset: str, method: str | None = None) -> TrackingConfig:
    layers = layered_values(params, method, dataset)
    return build_section("tracking", layers.get("tracking"))


def resolve_device(name: str) -> "torch.device":  # noqa: F821
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    import torch

    if name not in DEVICES:
        raise ConfigError(f"unknown device {name!r}; choose one of: {', '.join(DEVICES)}.")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto.")
    return torch.device(name)


def cpu_has_bf16() -> bool | None:
    """Whether this CPU has bf16 arithmetic instructions (AVX512-BF16 or AMX); None if torch cannot tell.

    Without them bf16 autocast on the CPU is emulated: on a 2-core AMD EPYC with AVX2 only, a
    2048x2048 bf16 matmul ran at 0.27 GFLOP/s against 57 GFLOP/s in fp32 (docs/benchmarks.md).
    """
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if not any(callable(p) for p in probes):
        return None
    return any(bool(p()) for p in probes if callable(p))


def bf16_cpu_warning(precision: str, device) -> str | None:
    """A one-line warning when bf16 autocast is asked for on a CPU without bf16 instructions."""
    if precision != "bf16" or getattr(device, "type", str(device)) != "cpu" or cpu_has_bf16() is not False:
        return None
    return ("warning: train.precision bf16 on a CPU without bf16 instructions (no AVX512-BF16 or AMX) is emulated "
            "and far slower than fp32; use --set train.precision=fp32 here, or bf16 on a GPU or a CPU that has them.")
