"""The W&B side of a study: its sweep file (``fss sweep wandb``) and the ``KEY=VALUE`` arguments
a W&B agent passes to ``fss sweep trial``."""

from __future__ import annotations

from typing import Any

from fss.errors import ConfigError
from pipeline.config import parse_set_values
from pipeline.sweep.study import StudySpec


def parse_assignments(spec: StudySpec, items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` (or W&B's ``--KEY=VALUE``) for every swept parameter, checked against the space."""
    values = parse_set_values([i.lstrip("-") for i in items])
    unknown = sorted(set(values) - set(spec.param_names))
    if unknown:
        raise ConfigError(f"{unknown[0]} is not a parameter of study {spec.name}; its parameters: {', '.join(spec.param_names)}.")
    missing = [n for n in spec.param_names if n not in values]
    if missing:
        raise ConfigError(f"give a value for {missing[0]} (e.g. {missing[0]}=...); study {spec.name} sweeps {', '.join(spec.param_names)}.")
    point = {}
    for p in spec.params:
        v = values[p.name]
        if p.kind in ("values", "choices", "variants"):
            allowed = p.grid_values()
            match = [a for a in allowed if a == v or str(a) == str(v)]
            if not match:
                raise ConfigError(f"{p.name}={v!r} is not in the study's values: {allowed}.")
            v = match[0]
        else:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not p.low <= v <= p.high:
                raise ConfigError(f"{p.name}={v!r} must be a number in [{p.low}, {p.high}].")
            v = int(v) if p.kind == "int" else float(v)
        point[p.name] = v
    return point


def wandb_sweep(spec: StudySpec, study_file: str | None = None) -> dict:
    """The W&B sweep configuration equivalent to a study file."""
    method = spec.wandb.get("method", "grid" if spec.mode == "grid" else "bayes")
    parameters: dict[str, Any] = {}
    for p in spec.params:
        if p.kind in ("values", "choices", "variants"):
            parameters[p.name] = {"values": p.grid_values()}
        elif p.log:
            parameters[p.name] = {"distribution": "q_log_uniform_values" if p.kind == "int" else "log_uniform_values",
                                  "min": p.low, "max": p.high}
        else:
            entry = {"distribution": "int_uniform" if p.kind == "int" else "uniform", "min": p.low, "max": p.high}
            if p.step and p.kind != "int":
                entry = {"distribution": "q_uniform", "min": p.low, "max": p.high, "q": p.step}
            parameters[p.name] = entry
    config: dict[str, Any] = {
        "name": spec.name,
        "description": spec.title,
        "program": "fss",
        "method": method,
        "metric": {"name": "objective", "goal": "maximize"},
        "parameters": parameters,
        "command": ["${env}", "fss", "sweep", "trial", study_file or str(spec.path), "${args_no_hyphens}"],
    }
    if spec.wandb.get("project"):
        config["project"] = spec.wandb["project"]
    if spec.mode == "tune" and spec.pruner.get("name", "none") != "none":
        # W&B's hyperband watches the sweep's metric at each logged step: 'objective' is logged
        # once, at the end, so early termination watches val/miou, logged at every validation
        # check during training (its summary, with define_metric's max, is the best check)
        config["metric"] = {"name": "val/miou", "goal": "maximize"}
        config["early_terminate"] = {"type": "hyperband",
                                     "min_iter": max(1, int(spec.pruner.get("n_warmup_steps", 0) or 0) + 1)}
    return config
