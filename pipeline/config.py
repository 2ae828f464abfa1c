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

Modules, importing one way: :mod:`pipeline.config_schema` (the sections and their
validation) <- :mod:`pipeline.config_params` (the shape of params.yaml: unknown sections and
keys refused; flat sections such as ``pretrain``) <- this module (the layer resolution),
which re-exports the names the rest of the pipeline imports from ``pipeline.config``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

from fss.data.classes import DATASETS, check_dataset, check_fold
from fss.errors import ConfigError
from fss.models.backbones import list_backbones
from fss.models.registry import get_method, list_methods, resolve_knobs
from pipeline.config_params import check_params, resolve_params_section  # noqa: F401  (re-exported)
from pipeline.config_schema import (  # noqa: F401  (re-exported: the public API of the run config)
    AUTO,
    DEVICES,
    OPERATIONAL_KEYS,
    SECTIONS,
    SELECTIONS,
    TOP_LEVEL_KEYS,
    DataConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    TestConfig,
    TrackingConfig,
    TrainLoopConfig,
    ValidationConfig,
    build_section,
    describe_sections,
    flatten,
    section_keys,
)

#: the repository's params.yaml (used when the working directory has none)
REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


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
    empty (dataclass defaults only). Every section and key is checked by
    :func:`~pipeline.config_params.check_params` (a typo is refused, not skipped).
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
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"params file {p} is not valid YAML{where}; fix the file.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"params file {p} must hold a mapping at the top level.")
    check_params(data, p)
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




def expand_set_key(key: str, knob_names: list[str]) -> str:
    """A --set key -> its dotted path; bare names must match exactly one key."""
    sections = section_keys()
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


# ---------------------------------------------------------------- resolution


def _check_backbone(method: str, backbone: str) -> None:

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
    config = build_run_config(
        merged, method=method, dataset=dataset, fold=fold, shot=shot,
        provenance={
            "params_file": str(path) if path else None,
            "set": dict(expanded),
            "cli": {k: v for k, v in dict(backbone=backbone, iterations=iterations, epochs=epochs, device=device).items() if v is not None},
        },
    )
    if config.data.num_workers == AUTO:  # the run's config.yaml records the number used
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, num_workers=auto_workers()))
    return config


#: a fold's share of this machine's cores, set by pipeline.parallel in each slot's environment
CPU_SHARE_ENV = "FSS_CPU_SHARE"
#: the most workers data.num_workers: auto starts: the most any method needs to feed an A100 at
#: its datasheet peak, from the measured images per second per worker (docs/benchmarks.md)
AUTO_WORKERS_MAX = 8


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_workers() -> int:
    """``data.num_workers: auto``: this fold's share of the cores (all of them when it runs
    alone) less one for the training process, at most :data:`AUTO_WORKERS_MAX`."""
    share = os.environ.get(CPU_SHARE_ENV)
    cores = int(share) if share and share.isdigit() else usable_cores()
    return max(0, min(AUTO_WORKERS_MAX, cores - 1))


def build_run_config(values: Mapping[str, Any], *, method: str, dataset: str, fold: int, shot: int,
                     provenance: Mapping[str, Any] | None = None) -> RunConfig:
    """Typed :class:`RunConfig` from merged values (also used to re-read config.yaml)."""

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


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
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

