"""`fss train`: the command. One fold is one :func:`pipeline.train.train_run`; several folds run at
once on this machine's slots or as submitit jobs (:mod:`pipeline.parallel`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from fss.errors import ConfigError, FSSError
from pipeline import distributed as D
from pipeline import parallel as P
from pipeline import train as T
from pipeline.config import resolve_run_config
from pipeline.console import console, track


# ---------------------------------------------------------------- the command


def train_command(
    method: str = typer.Option(..., help="Method name (see 'fss methods')."),
    dataset: str = typer.Option(..., help="pascal, coco or synthetic."),
    fold: list[int] = typer.Option(..., "--fold", help="Fold 0..3; repeat for several, trained at once (--out and "
                                   "--plots-dir then contain {fold}; see --slots)."),
    shot: int = typer.Option(1, help="Shots per training episode."),
    out: Path = typer.Option(..., help="Run directory (created; rerun the same command to resume)."),
    backbone: Optional[str] = typer.Option(None, help="Backbone (default from params.yaml)."),
    iterations: Optional[int] = typer.Option(None, help="Train for N optimiser steps (overrides params.yaml)."),
    epochs: Optional[int] = typer.Option(None, help="Train for E passes over the training list."),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda (default from params.yaml: auto)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="KEY=VALUE override, repeatable (optim.lr=0.01, knobs.lam=0.3, lam=0.3)."),
    params: Optional[Path] = typer.Option(None, help="Params file (default ./params.yaml, else the repository's)."),
    plots_dir: Optional[Path] = typer.Option(None, help="Also copy curves.csv and val.csv here at the end (DVC plots)."),
    stop_after: Optional[int] = typer.Option(None, hidden=True, help="Testing: checkpoint and stop after N iterations."),
    wandb: Optional[bool] = typer.Option(None, "--wandb/--no-wandb", help="Log to W&B (the same as --set tracking.wandb=true/false)."),
    restart_on_change: bool = typer.Option(
        False, "--restart-on-change",
        help="When OUT holds a run of another config, code, backbone weights or data, empty it and start afresh "
             "instead of refusing (dvc.yaml's train stages); the same inputs resume."),
    slots: Optional[str] = typer.Option(None, help="With several --fold: folds at once on this machine: auto (one per "
                                        "GPU, or the CPU cores over train.num_threads) or N (default: params benchmark.slots, auto)."),
    engine: Optional[str] = typer.Option(None, help="With several --fold: local (processes on this machine's slots) or "
                                         "submitit (a job per fold: SLURM, resources from params 'cluster'; default: "
                                         "params benchmark.engine, local)."),
) -> None:
    """Train METHOD on one fold (or several at once); the resolved config is saved in OUT and printed."""
    options = dict(method=method, dataset=dataset, shot=shot, backbone=backbone, iterations=iterations, epochs=epochs,
                   device=device, set_=set_ or [], params=params, stop_after=stop_after, wandb=wandb,
                   restart_on_change=restart_on_change)
    if len(fold) > 1 or "{fold}" in str(out):
        return train_folds(fold, out, plots_dir, options, slots=slots, engine=engine)
    train_one(fold[0], out, plots_dir, options)


def train_one(fold: int, out: Path, plots_dir: Path | None, o: dict) -> None:
    """One fold's `fss train`: resolve, train or resume, print the summary (options ``o`` as train_command got them)."""
    follower = D.launched_rank() > 0  # torchrun rank > 0: silent (rank 0 prints, logs and errors)
    wandb = o["wandb"]
    try:
        config = resolve_run_config(
            method=o["method"], dataset=o["dataset"], fold=fold, shot=o["shot"], backbone=o["backbone"],
            iterations=o["iterations"], epochs=o["epochs"], device=o["device"], params_path=o["params"],
            set_values=[*o["set_"], *([f"tracking.wandb={str(wandb).lower()}"] if wandb is not None else [])],
        )
        result = T.train_run(config, out, stop_after=o["stop_after"], track=None if follower else track,
                             plots_dir=plots_dir, restart_on_change=o["restart_on_change"],
                             say=lambda m: console.print(m, highlight=False, markup=False, soft_wrap=True))
    except FSSError:
        if follower:
            raise typer.Exit(2) from None  # the same one-line error is printed by rank 0
        raise
    finally:
        D.teardown_distributed()
    if not follower:
        typer.echo(json.dumps(result, sort_keys=True, default=str))
    if result["status"] == "stopped" and result["signal"] is not None:
        raise typer.Exit(130)  # interrupted: never report success (DVC must not record the outputs)


# ---------------------------------------------------------------- several folds at once


def fold_train_args(folds: list[int], out: str, plots_dir: str | None, o: dict) -> list[str]:
    """The `fss train` arguments that train ``folds`` one after another in one process (--slots 1;
    options ``o`` as train_command got them, ``{fold}`` left in --out and --plots-dir)."""
    args = ["train", "--method", o["method"], "--dataset", o["dataset"], *(a for k in folds for a in ("--fold", str(k))),
            "--shot", str(o["shot"]), "--out", out, "--slots", "1", "--engine", "local"]
    for flag, key in (("--backbone", "backbone"), ("--iterations", "iterations"), ("--epochs", "epochs"),
                      ("--device", "device"), ("--params", "params"), ("--stop-after", "stop_after")):
        if o[key] is not None:
            args += [flag, str(o[key])]
    for value in o["set_"]:
        args += ["--set", value]
    if plots_dir is not None:
        args += ["--plots-dir", plots_dir]
    if o["wandb"] is not None:
        args.append("--wandb" if o["wandb"] else "--no-wandb")
    if o["restart_on_change"]:
        args.append("--restart-on-change")
    return args


def train_folds(folds: list[int], out: Path, plots_dir: Path | None, o: dict, *, slots: str | None,
                engine: str | None) -> None:
    """Train ``folds``: at once on this machine's slots, as submitit jobs, or one after another (pipeline.parallel)."""
    if len(set(folds)) != len(folds) or "{fold}" not in str(out) or (plots_dir is not None and "{fold}" not in str(plots_dir)):
        raise ConfigError("several --fold need distinct folds and {fold} in --out (and in --plots-dir), e.g. --out runs/M/fold{fold}.")
    config = resolve_run_config(method=o["method"], dataset=o["dataset"], fold=folds[0], shot=o["shot"],
                                backbone=o["backbone"], iterations=o["iterations"], epochs=o["epochs"],
                                device=o["device"], params_path=o["params"], set_values=o["set_"])
    plots = None if plots_dir is None else str(plots_dir)
    P.run_folds(
        folds, name=lambda k: f"fold {k}", command=lambda share: fold_train_args(share, str(out), plots, o),
        run_one=lambda k: train_one(k, Path(str(out).format(fold=k)), None if plots is None else Path(plots.format(fold=k)), o),
        what=f"train {o['method']}", device=config.train.device, threads=config.train.num_threads, params=o["params"],
        slots=slots, engine=engine, say=lambda m: console.print(m, highlight=False, markup=False, soft_wrap=True))
