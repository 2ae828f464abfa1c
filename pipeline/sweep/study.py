"""Study files (``sweeps/*.yaml``): loading, validation, grid points, fingerprints.

A study file describes one ablation (a grid that rebuilds a paper table) or one tuning
study (a sampler over ranges)::

    study: apanet_lambda            # the Optuna study name (default: the file's stem)
    title: "APANet Table VII: lambda of Eq. 9"
    method: apanet
    dataset: pascal
    folds: [0, 1, 2, 3]
    shots: [1]                      # one model per (fold, shot), trained and scored at that shot
    backbone: resnet50v2            # optional (default: params.yaml)
    set:                            # fixed overrides, the keys of `fss train --set`
      backbone_weights: pretrained/resnet50_v2.pth
    params:                         # dotted config keys (knobs.lam, optim.lr, ...)
      knobs.lam: {values: [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0]}     # a grid axis
      # optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}           # a tuning range
      # components: {variants: {baseline: {knobs.dpr: false}, ...}} # named settings
    mode: grid                      # grid (every point once) or tune (sampler + budget)
    n_trials: 20                    # tune only: COMPLETE + PRUNED trials to reach
    sampler: {name: tpe, seed: 0}   # tune only: tpe | random | cmaes | qmc
    pruner: {name: median}          # tune only: median | hyperband | none
    checkpoint: runs/dpnet/fold{fold}   # test-time-only studies: the trained run (or model file)
    output: runs/sweeps/{study}     # trial run directories (and the default storage)
    reference: {0.5: 57.9}          # optional: the paper's mean mIoU per row (shown in the table)

The objective is the mean validation mIoU (``validation.seed`` episodes, never the test
seeds) over every listed (fold, shot). Test-time-only knobs (``Knob(test_time=True)`` in the
registry: ``fss methods``) are swept by re-evaluating ``checkpoint``; a study may not mix them with training parameters.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Mapping

import optuna.distributions as D
import yaml

from fss.data.classes import check_dataset
from fss.errors import ConfigError
from fss.evaluation import make_protocol, validation_protocol
from fss.models.registry import get_method
from pipeline.config import expand_set_key, resolve_run_config

TOP_KEYS = {
    "study": "the study name (default: the file's stem)",
    "title": "a line describing the table",
    "method": "a registered method (fss methods)",
    "dataset": "pascal, coco or synthetic",
    "folds": "list of folds 0..3",
    "shots": "list of shots (default [1])",
    "backbone": "backbone name (default: params.yaml)",
    "set": "mapping of fixed config overrides (keys of fss train --set)",
    "params": "mapping of swept keys to {values}, {low, high[, log, step]}, {choices} or {variants}",
    "mode": "grid or tune",
    "n_trials": "trial budget of a tuning study",
    "sampler": "tune: {name: tpe|random|cmaes|qmc, seed, ...}",
    "pruner": "tune: {name: median|hyperband|none, ...}",
    "checkpoint": "trained run directory or model file for test-time studies ({fold}, {shot} filled)",
    "output": "directory of the trial runs (default runs/sweeps/{study})",
    "params_file": "params file of the run configs (default ./params.yaml)",
    "reference": "mapping row label -> the paper's mean mIoU (%)",
    "wandb": "W&B sweep options: {method: grid|bayes|random, project}",
}
SAMPLERS = ("tpe", "random", "cmaes", "qmc")
PRUNERS = ("median", "hyperband", "none")
#: keys that do not change what a trial computes (left out of the fingerprint)
UNFINGERPRINTED = ("n_trials", "title", "reference", "wandb", "output")


@dataclass(frozen=True)
class ParamSpec:
    """One swept parameter: a grid axis (``values``/``variants``) or a tuning range."""

    name: str
    kind: str  # values | variants | float | int | choices
    values: tuple = ()
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    @property
    def is_grid_axis(self) -> bool:
        return self.kind in ("values", "variants")

    def grid_values(self) -> list:
        return list(self.variants) if self.kind == "variants" else list(self.values)

    def distribution(self):
        """The Optuna distribution of this parameter."""
        if self.kind in ("values", "choices"):
            return D.CategoricalDistribution(list(self.values))
        if self.kind == "variants":
            return D.CategoricalDistribution(list(self.variants))
        if self.kind == "int":
            return D.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return D.FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)

    def overrides(self, value: Any) -> dict[str, Any]:
        """Config overrides (dotted keys) that this parameter's ``value`` stands for."""
        if self.kind == "variants":
            return dict(self.variants[value])
        return {self.name: value}


@dataclass(frozen=True)
class StudySpec:
    """A validated study file."""

    path: Path
    name: str
    title: str
    method: str
    dataset: str
    folds: tuple[int, ...]
    shots: tuple[int, ...]
    backbone: str | None
    fixed: Mapping[str, Any]
    params: tuple[ParamSpec, ...]
    mode: str
    n_trials: int
    sampler: Mapping[str, Any]
    pruner: Mapping[str, Any]
    checkpoint: str | None
    output: Path
    params_file: str | None
    reference: Mapping[str, float]
    wandb: Mapping[str, Any]
    raw: Mapping[str, Any]

    @property
    def test_time(self) -> bool:
        """True when every swept key is a test-time-only knob (re-evaluation, no training)."""
        return self.checkpoint is not None

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    def grid(self) -> list[dict[str, Any]]:
        """Every grid point (param name -> value), in the file's order."""
        axes = [p.grid_values() for p in self.params]
        return [dict(zip(self.param_names, combo)) for combo in product(*axes)]

    def overrides(self, point: Mapping[str, Any]) -> dict[str, Any]:
        """Dotted config overrides of one point (the fixed ``set`` first)."""
        out = dict(self.fixed)
        for p in self.params:
            out.update(p.overrides(point[p.name]))
        return out

    def fingerprint_source(self) -> dict:
        """What the trials' results depend on: the study file (less ``UNFINGERPRINTED``) and the
        run configuration that the params file gives each (fold, shot) before the swept values,
        so that an edited method or dataset section is a different study, not a silent reuse."""
        source = {k: v for k, v in self.raw.items() if k not in UNFINGERPRINTED}
        sets = [f"{k}={_yaml_scalar(v)}" for k, v in self.fixed.items()]
        source["base_configs"] = {
            f"fold{fold}-{shot}shot": resolve_run_config(
                method=self.method, dataset=self.dataset, fold=fold, shot=shot, backbone=self.backbone,
                set_values=sets, params_path=self.params_file).to_dict()
            for fold in self.folds for shot in self.shots
        }
        return json.loads(json.dumps(source, sort_keys=True, default=str))

    def fingerprint(self) -> str:
        blob = json.dumps(self.fingerprint_source(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def checkpoint_for(self, fold: int, shot: int) -> Path:
        assert self.checkpoint is not None
        return Path(self.checkpoint.format(fold=fold, shot=shot, study=self.name, method=self.method,
                                           dataset=self.dataset))


def point_key(point: Mapping[str, Any]) -> str:
    """A canonical string of a parameter point (grid de-duplication)."""
    return json.dumps({k: _canonical(v) for k, v in sorted(point.items())}, sort_keys=True)


def _canonical(v: Any) -> Any:
    if isinstance(v, float) and v.is_integer():
        return float(v)
    return v


def label(value: Any) -> str:
    """A table row label of a value (booleans read on/off, as the papers' with/without rows)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def point_slug(point: Mapping[str, Any]) -> str:
    """A short directory name for a point: ``lam-0.5`` (plus a hash when long)."""
    parts = [f"{k.split('.')[-1]}-{v}" for k, v in point.items()]
    slug = re.sub(r"[^A-Za-z0-9_.+-]+", "_", "_".join(parts)) or "default"
    if len(slug) > 60:
        slug = slug[:48] + "-" + hashlib.sha256(point_key(point).encode()).hexdigest()[:8]
    return slug


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """The first dotted key where two parsed study files differ (None when equal)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for k in sorted(set(a) | set(b), key=str):
            d = first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d is not None:
                return d
        return None
    if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
        return prefix.rstrip(".") or "(top level)"
    return None


# ---------------------------------------------------------------- loading


def _err(path: Path, message: str) -> ConfigError:
    return ConfigError(f"study file {path}: {message}")


def _int_list(path: Path, key: str, value: Any, low: int, high: int | None) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value or any(
        isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high) for v in value
    ):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise _err(path, f"key '{key}' must be a non-empty list of integers {bounds}, got {value!r}.")
    if len(set(value)) != len(value):
        raise _err(path, f"key '{key}' lists a value twice: {value!r}.")
    return tuple(value)


def _number(path: Path, where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _err(path, f"{where} must be a finite number, got {value!r}.")
    return value


def _param(path: Path, name: str, spec: Any) -> ParamSpec:
    where = f"params.{name}"
    if not isinstance(spec, Mapping):
        raise _err(path, f"{where} must be a mapping with values, variants, choices or low/high; got {spec!r}.")
    kinds = [k for k in ("values", "variants", "choices", "low") if k in spec]
    allowed = {"values", "variants", "choices", "low", "high", "log", "step", "type"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise _err(path, f"{where} has no key '{unknown[0]}'; allowed: {', '.join(sorted(allowed))}.")
    if len(kinds) != 1:
        raise _err(path, f"{where} needs exactly one of values (grid), variants (named settings), "
                         f"choices or low/high (tuning); got {sorted(spec) or 'none'}.")
    kind = kinds[0]
    if kind in ("values", "choices"):
        values = spec[kind]
        if not isinstance(values, list) or not values:
            raise _err(path, f"{where}.{kind} must be a non-empty list, got {values!r}.")
        if any(isinstance(v, (dict, list)) for v in values):
            raise _err(path, f"{where}.{kind} must hold scalars (numbers, strings, booleans); "
                             f"use variants for settings of several keys.")
        if len({json.dumps(v) for v in values}) != len(values):
            raise _err(path, f"{where}.{kind} lists a value twice: {values!r}.")
        return ParamSpec(name, kind, values=tuple(values))
    if kind == "variants":
        variants = spec["variants"]
        if not isinstance(variants, Mapping) or not variants:
            raise _err(path, f"{where}.variants must map labels to mappings of config keys, got {variants!r}.")
        out = {}
        for label, settings in variants.items():
            if not isinstance(settings, Mapping):
                raise _err(path, f"{where}.variants.{label} must be a mapping of config keys to values "
                                 f"({{}} for the defaults), got {settings!r}.")
            out[str(label)] = dict(settings)
        return ParamSpec(name, "variants", variants=out)
    if "high" not in spec:
        raise _err(path, f"{where} has low but no high.")
    low = _number(path, f"{where}.low", spec["low"])
    high = _number(path, f"{where}.high", spec["high"])
    if not low < high:
        raise _err(path, f"{where}: low {low} must be smaller than high {high}.")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise _err(path, f"{where}.log must be true or false, got {log!r}.")
    if log and low <= 0:
        raise _err(path, f"{where}: log ranges need low > 0, got {low}.")
    step = spec.get("step")
    if step is not None:
        step = _number(path, f"{where}.step", step)
        if step <= 0:
            raise _err(path, f"{where}.step must be > 0, got {step}.")
    typ = spec.get("type")
    if typ not in (None, "int", "float"):
        raise _err(path, f"{where}.type must be int or float, got {typ!r}.")
    is_int = typ == "int" or (typ is None and all(isinstance(v, int) for v in (spec["low"], spec["high"]))
                              and (step is None or isinstance(step, int)))
    if is_int and log and step not in (None, 1):
        raise _err(path, f"{where}: an integer log range cannot have a step.")
    return ParamSpec(name, "int" if is_int else "float", low=low, high=high, log=log, step=step)




def _read_raw(path: Path) -> dict:
    """The parsed study file, with its top-level keys checked."""
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist; pass one of the files in sweeps/.")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise _err(path, f"not valid YAML{where}; fix the file.") from None
    if not isinstance(raw, dict):
        raise _err(path, "must hold a mapping at the top level (method, dataset, folds, params, ...).")
    unknown = sorted(set(map(str, raw)) - set(TOP_KEYS))
    if unknown:
        raise _err(path, f"unknown key '{unknown[0]}'; allowed keys: {', '.join(TOP_KEYS)}.")
    for key in ("method", "dataset", "folds", "params"):
        if key not in raw:
            raise _err(path, f"missing key '{key}' ({TOP_KEYS[key]}).")
    return raw


def _method_spec(path: Path, raw: Mapping[str, Any]):
    """The registered method of the study (its knob table), the dataset checked."""
    method = raw["method"]
    if not isinstance(method, str):
        raise _err(path, f"key 'method' must be a method name, got {method!r}.")
    try:
        spec = get_method(method)
        check_dataset(raw["dataset"])
    except ConfigError as exc:
        raise _err(path, str(exc)) from None
    return spec


def _mode(path: Path, raw: Mapping[str, Any], params: tuple[ParamSpec, ...]) -> tuple[str, int, dict, dict]:
    """(mode, n_trials, sampler, pruner) of the study, checked against each other."""
    mode = raw.get("mode", "grid" if all(p.is_grid_axis for p in params) else "tune")
    if mode not in ("grid", "tune"):
        raise _err(path, f"key 'mode' must be grid or tune, got {mode!r}.")
    if mode == "grid":
        bad = [p.name for p in params if not p.is_grid_axis]
        if bad:
            raise _err(path, f"params.{bad[0]}: a grid needs values or variants, not a range or choices "
                             f"(or set mode: tune).")
    pruner = raw.get("pruner") or {"name": "none"}
    sampler = raw.get("sampler") or {"name": "tpe" if mode == "tune" else "grid"}
    if mode == "grid":
        if "n_trials" in raw:
            raise _err(path, "key 'n_trials' is for tuning studies; a grid runs every point once.")
        if pruner.get("name", "none") != "none":
            raise _err(path, "pruning is off for grids (every point is a table row); remove 'pruner'.")
        if "sampler" in raw:
            raise _err(path, "key 'sampler' is for tuning studies; a grid needs none.")
        n_trials = len(list(product(*[p.grid_values() for p in params])))
    else:
        n_trials = raw.get("n_trials")
        if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
            raise _err(path, f"key 'n_trials' must be a positive integer for mode tune, got {n_trials!r}.")
        if not isinstance(sampler, Mapping) or sampler.get("name") not in SAMPLERS:
            raise _err(path, f"key 'sampler.name' must be one of: {', '.join(SAMPLERS)}; got {sampler!r}.")
    if not isinstance(pruner, Mapping) or pruner.get("name", "none") not in PRUNERS:
        raise _err(path, f"key 'pruner.name' must be one of: {', '.join(PRUNERS)}; got {pruner!r}.")
    return mode, int(n_trials), dict(sampler), dict(pruner)


def _checkpoint(path: Path, raw: Mapping[str, Any], method: str, knob_names: list[str],
                params: tuple[ParamSpec, ...]) -> str | None:
    """The study's checkpoint: required when every swept key is a test-time-only knob, refused
    otherwise; swept keys must be config keys of the method, never test-time and training mixed."""
    swept: list[str] = []
    for p in params:
        keys = [k for v in p.variants.values() for k in v] if p.kind == "variants" else [p.name]
        for key in keys:
            try:
                full = expand_set_key(str(key), knob_names)
            except ConfigError as exc:
                raise _err(path, f"params.{p.name}: {exc}") from None
            if full in ("method", "dataset", "fold", "shot"):
                raise _err(path, f"params.{p.name}: '{full}' is set by the study's method/dataset/folds/shots keys.")
            swept.append(full)
    test_time_knobs = get_method(method).test_time_knobs
    is_test_time = [k.startswith("knobs.") and k[6:] in test_time_knobs for k in swept]
    checkpoint = raw.get("checkpoint")
    if any(is_test_time) and not all(is_test_time):
        raise _err(path, "mixes test-time-only knobs "
                         f"({', '.join(k for k, t in zip(swept, is_test_time) if t)}) with training parameters; "
                         "split it into two studies (test-time knobs re-evaluate a trained checkpoint).")
    if all(is_test_time):
        if not isinstance(checkpoint, str) or not checkpoint:
            raise _err(path, "sweeps only test-time knobs, so it needs 'checkpoint': the trained run directory "
                             "(or model file) per fold, e.g. runs/dpnet_pfenet/fold{fold}.")
    elif checkpoint is not None:
        raise _err(path, "key 'checkpoint' is only for studies of test-time-only knobs "
                         f"({', '.join(sorted(test_time_knobs)) or 'none for ' + method}); this one trains.")
    return checkpoint


def _extras(path: Path, raw: Mapping[str, Any]) -> tuple[str, dict, dict]:
    """(output, reference, wandb options) of the study file."""
    output = raw.get("output", "runs/sweeps/{study}")
    if not isinstance(output, str):
        raise _err(path, f"key 'output' must be a directory path, got {output!r}.")
    reference = raw.get("reference") or {}
    if not isinstance(reference, Mapping) or any(
        isinstance(v, bool) or not isinstance(v, (int, float)) for v in reference.values()
    ):
        raise _err(path, "key 'reference' must map row labels to the paper's mean mIoU (numbers).")
    wandb_opts = raw.get("wandb") or {}
    if not isinstance(wandb_opts, Mapping):
        raise _err(path, f"key 'wandb' must be a mapping, got {wandb_opts!r}.")
    return output, {label(k): float(v) for k, v in reference.items()}, dict(wandb_opts)


def load_study(path: str | Path, *, check_configs: bool = True) -> StudySpec:
    """Read and validate a study file; errors name the key and what is allowed."""
    path = Path(path)
    raw = _read_raw(path)
    method = raw["method"]
    method_spec = _method_spec(path, raw)
    name = raw.get("study", path.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise _err(path, f"key 'study' must be a name of letters, digits, '_', '.', '-', got {name!r}.")
    folds = _int_list(path, "folds", raw["folds"], 0, 3)
    shots = _int_list(path, "shots", raw.get("shots", [1]), 1, None)
    backbone = raw.get("backbone")
    if backbone is not None and not isinstance(backbone, str):
        raise _err(path, f"key 'backbone' must be a backbone name, got {backbone!r}.")
    fixed = raw.get("set") or {}
    if not isinstance(fixed, Mapping):
        raise _err(path, f"key 'set' must map config keys to values, got {fixed!r}.")
    params_raw = raw["params"]
    if not isinstance(params_raw, Mapping) or not params_raw:
        raise _err(path, "key 'params' must map at least one config key to its values or range.")
    params = tuple(_param(path, str(k), v) for k, v in params_raw.items())
    mode, n_trials, sampler, pruner = _mode(path, raw, params)
    checkpoint = _checkpoint(path, raw, method, list(method_spec.knobs), params)
    output, reference, wandb_opts = _extras(path, raw)
    study = StudySpec(
        path=path, name=name, title=str(raw.get("title", name)), method=method, dataset=raw["dataset"],
        folds=folds, shots=shots, backbone=backbone, fixed=dict(fixed), params=params, mode=mode,
        n_trials=n_trials, sampler=sampler, pruner=pruner, checkpoint=checkpoint,
        output=Path(output.format(study=name)), params_file=raw.get("params_file"),
        reference=reference, wandb=wandb_opts, raw=raw,
    )
    if check_configs:
        _check_configs(study)
    return study


def resolve_trial_config(study: StudySpec, point: Mapping[str, Any], fold: int, shot: int):
    """The RunConfig of one (point, fold, shot) of a study."""
    sets = [f"{k}={_yaml_scalar(v)}" for k, v in study.overrides(point).items()]
    return resolve_run_config(method=study.method, dataset=study.dataset, fold=fold, shot=shot,
                              backbone=study.backbone, set_values=sets, params_path=study.params_file)


def _yaml_scalar(v: Any) -> str:
    """A value written so that ``parse_set_values`` (YAML) reads it back unchanged."""
    if isinstance(v, str):
        return json.dumps(v)
    return json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else repr(v)

def test_seed_overlap(config) -> list[int]:
    """The episode seeds that the run's validation shares with its test protocol (none allowed:
    the objective would tune on the test episodes)."""
    proto = make_protocol(config.test.protocol, config.dataset, episodes=config.test.episodes,
                          size=config.test.size, runs=config.test.runs)
    return sorted(set(validation_protocol(config).seeds) & set(proto.seeds))


def _probes(study: StudySpec) -> list[dict]:
    """Every grid point, or both ends of every range (the others at their low end)."""
    if study.mode == "grid":
        return study.grid()

    def ends(q: ParamSpec) -> list:
        if q.kind in ("choices", "values", "variants"):
            return q.grid_values()
        cast = int if q.kind == "int" else float
        return [cast(q.low), cast(q.high)]

    base = {q.name: ends(q)[0] for q in study.params}
    return [{**base, q.name: v} for q in study.params for v in ends(q)]


def _check_configs(study: StudySpec) -> None:
    """Resolve the run config of every probe point on the first fold, so a bad value (or a
    validation seed of the test protocol) fails before any trial starts."""
    for point in _probes(study):
        try:
            config = resolve_trial_config(study, point, study.folds[0], study.shots[0])
        except ConfigError as exc:
            raise _err(study.path, f"point {point_key(point)}: {exc}") from None
        overlap = test_seed_overlap(config)
        if overlap:
            raise _err(study.path, f"validation.seed {config.validation.seed} gives the episode seeds {overlap} of "
                                   f"the test protocol {config.test.protocol}; set another validation.seed in 'set' "
                                   f"so the test numbers are not tuned on.")
    if study.mode == "tune" and study.pruner.get("name", "none") != "none" and not study.test_time:
        if config.validation.every <= 0:
            raise _err(study.path, "the pruner needs validation during training: add validation.every: N "
                                   "to 'set' (or use pruner: {name: none}).")

