"""The shape of params.yaml: every section and key is known, a misspelt one is refused.

A run reads only the layers of its own method and dataset, so a typo such as a
``methods.pfenett`` section, or ``methods.pfenet.optim.lrr``, would otherwise be skipped and
the run would silently use the defaults. :func:`check_params` runs on every params file
that :func:`pipeline.config.load_params` reads and names the valid choices in one line.
Values are checked where they are used (the run config, the pretrain section), because
only the merged layers decide a run's value.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Mapping

from fss.coerce import coerce_value
from fss.data.classes import DATASETS
from fss.errors import ConfigError
from fss.models.registry import get_method, list_methods

from pipeline.config_schema import SECTIONS, PretrainConfig, build_section, section_keys

#: top-level sections of params.yaml, and the keys of those read outside the run config
#: (``benchmark`` and ``prepare`` by dvc.yaml; ``pretrain`` by :func:`resolve_pretrain_config`)
PARAMS_SECTIONS = ("benchmark", "prepare", "pretrain", "cluster", "defaults", "methods", "datasets")
BENCHMARK_KEYS = ("dataset", "root", "backbone", "weights", "methods", "folds", "pretrain_backbones",
                  "pretrain_base_classes", "sweeps", "train_shot", "protocol", "device", "slots", "engine")
PREPARE_KEYS = ("seed", "size", "train_images", "val_images", "holdout_images")
#: section ``cluster``: the resources of one submitit job (a fold, a sweep worker; pipeline.parallel)
CLUSTER_DEFAULTS: dict[str, Any] = {
    "backend": "auto",  # auto (SLURM where sbatch exists, else local), slurm or local
    "folder": "logs/submitit",  # submitit's job scripts and logs
    "partition": "",
    "account": "",
    "gpus_per_job": 1,
    "cpus_per_job": 8,
    "mem_gb": 32,
    "time_minutes": 1440,
}
#: keys of section ``pretrain`` (:class:`pipeline.config_schema.PretrainConfig`)
PRETRAIN_KEYS = tuple(f.name for f in dataclasses.fields(PretrainConfig))
#: keys of one run-config layer (defaults, methods.M, datasets.D, methods.M.datasets.D)
LAYER_KEYS = ("backbone", "backbone_weights", "knobs", *SECTIONS)


def _mapping(node: Any, where: str, path: Path | None) -> Mapping:
    if node is None:
        return {}
    if not isinstance(node, Mapping):
        raise ConfigError(f"params file {path}: {where} must be a mapping, got {node!r}.")
    return node


def _refuse_unknown(keys: Iterable[str], valid: Iterable[str], where: str, what: str, path: Path | None) -> None:
    valid = list(valid)
    unknown = [k for k in keys if k not in valid]
    if unknown:
        raise ConfigError(
            f"params file {path}: {where} has no {what} {unknown[0]!r}; the valid ones are: {', '.join(map(str, valid))}."
        )


def _check_layer(layer: Any, where: str, knob_names: Iterable[str], path: Path | None, *, nested: bool) -> None:
    """One run-config layer; ``nested``: a method layer, which may hold ``datasets.D`` layers."""
    layer = _mapping(layer, where, path)
    _refuse_unknown(layer, LAYER_KEYS + (("datasets",) if nested else ()), where, "key", path)
    keys = section_keys()
    for name in SECTIONS:
        if name in layer:
            _refuse_unknown(_mapping(layer[name], f"{where}.{name}", path), keys[name], f"{where}.{name}", "key", path)
    if "knobs" in layer:
        knobs = _mapping(layer["knobs"], f"{where}.knobs", path)
        _refuse_unknown(knobs, sorted(knob_names), f"{where}.knobs", "knob", path)
    if nested and "datasets" in layer:
        per_dataset = _mapping(layer["datasets"], f"{where}.datasets", path)
        _refuse_unknown(per_dataset, DATASETS, f"{where}.datasets", "dataset", path)
        for dataset, sub in per_dataset.items():
            _check_layer(sub, f"{where}.datasets.{dataset}", knob_names, path, nested=False)


def check_params(params: Mapping[str, Any], path: Path | None = None) -> None:
    """Refuse any unknown section or key of a parsed params file (one line naming the valid ones)."""
    _refuse_unknown(params, PARAMS_SECTIONS, "the top level", "section", path)
    _refuse_unknown(_mapping(params.get("benchmark"), "benchmark", path), BENCHMARK_KEYS, "benchmark", "key", path)
    _refuse_unknown(_mapping(params.get("prepare"), "prepare", path), PREPARE_KEYS, "prepare", "key", path)
    _refuse_unknown(_mapping(params.get("cluster"), "cluster", path), CLUSTER_DEFAULTS, "cluster", "key", path)
    _refuse_unknown(_mapping(params.get("pretrain"), "pretrain", path), PRETRAIN_KEYS, "pretrain", "key", path)
    every_knob = {k for m in list_methods() for k in get_method(m).knobs}
    _check_layer(params.get("defaults"), "defaults", every_knob, path, nested=False)
    methods = _mapping(params.get("methods"), "methods", path)
    _refuse_unknown(methods, list_methods(), "methods", "method", path)
    for method, layer in methods.items():
        _check_layer(layer, f"methods.{method}", get_method(method).knobs, path, nested=True)
    datasets = _mapping(params.get("datasets"), "datasets", path)
    _refuse_unknown(datasets, DATASETS, "datasets", "dataset", path)
    for dataset, layer in datasets.items():
        _check_layer(layer, f"datasets.{dataset}", every_knob, path, nested=False)


def resolve_params_section(
    params: Mapping[str, Any], name: str, defaults: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A flat params section (e.g. ``pretrain``): ``defaults`` < ``params[name]`` < ``overrides``.

    Keys outside ``defaults`` are refused; every value is coerced to the type of its
    default (an int default accepts 3 and "3", a bool default true/false); overrides that
    are None count as not given (unset CLI options).
    """
    section = params.get(name)
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"params key {name} must be a mapping, got {section!r}.")
    unknown = sorted(set(section) - set(defaults))
    if unknown:
        raise ConfigError(f"params section {name} has no key {unknown[0]!r}; its keys are: {', '.join(defaults)}.")
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    merged = {**defaults, **section, **given}
    return {k: coerce_value(f"params key {name}.{k}", v, type(defaults[k])) for k, v in merged.items()}


def resolve_pretrain_config(params: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> PretrainConfig:
    """``fss pretrain``'s configuration: :class:`PretrainConfig`'s defaults < ``params["pretrain"]`` <
    ``overrides`` (None counts as not given: unset CLI options), every key and value checked."""
    section = _mapping(params.get("pretrain"), "pretrain", None)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    return build_section("pretrain", {**section, **given}, PretrainConfig)
