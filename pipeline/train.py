"""`fss train`: episodic training of one method on one fold, resumable at any moment.

Launch (one GPU or CPU; the run directory holds everything)::

    fss train --method apanet --dataset pascal --fold 0 --shot 1 --backbone resnet50v2 \\
        --set backbone_weights=weights/resnet50_v2.pth --device cuda --out runs/apanet-pascal-f0

Running the same command again on the same ``--out`` resumes from ``checkpoint.pt``; a run
killed at any moment and resumed ends with the same weights and metrics as an
uninterrupted one (same seed, same device): the episodes of (seed, epoch, index) are
deterministic (``fss.data.episodes``), the model/optimiser/RNG states are checkpointed,
validation leaves the global RNGs untouched, and rows a killed run logged after its last
checkpoint are dropped on resume.

Learning rate per iteration ``it`` (0-based) of ``total`` (protocol section 6):

* ``poly`` (PFENet's ``poly_learning_rate`` with ``curr_iter = it + 1``):
  ``lr = base * (1 - (it + 1) / total) ** power``;
* ``step`` (PANet): ``lr = base * gamma ** (number of milestones m with it >= round(m * total))``;
* ``constant`` (CANet).

``optim.pfenet_lr_x10`` multiplies the result by 10 (PFENet's reference quirk; off).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from fss.data.access import open_prepared
from fss.errors import ConfigError
from fss.evaluation import evaluate_model, validation_protocol
from fss.layout import channels_last_batch

from pipeline.config import RunConfig, bf16_cpu_warning, resolve_run_config

TrackFn = Callable[..., Any]


# ---------------------------------------------------------------- schedule and optimiser


def learning_rate(config: RunConfig, iteration: int, total: int) -> float:
    """The lr of (0-based) ``iteration`` of ``total`` (see the module docstring)."""
    base = config.optim.lr
    sched = config.schedule
    if sched.name == "poly":
        lr = base * max(0.0, 1.0 - (iteration + 1) / total) ** sched.power
    elif sched.name == "step":
        passed = sum(1 for m in sched.milestones if iteration >= int(round(m * total)))
        lr = base * sched.gamma ** passed
    else:
        lr = base
    if sched.warmup_iterations and iteration < sched.warmup_iterations:
        lr *= (iteration + 1) / sched.warmup_iterations
    if config.optim.pfenet_lr_x10:
        lr *= 10.0
    return lr


def make_optimizer(config: RunConfig, model):
    import torch

    params = model.trainable_parameters() if hasattr(model, "trainable_parameters") else [
        p for p in model.parameters() if p.requires_grad
    ]
    if not params:
        raise ConfigError(f"method {config.method} has no trainable parameter with these knobs; nothing to train.")
    o = config.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                               nesterov=o.nesterov and o.momentum > 0)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


# ---------------------------------------------------------------- data


def open_split(config: RunConfig, split: str):
    """The run's fold list ``split`` (checked to hold the run's dataset)."""
    data = open_prepared(config.data.root, config.fold, split, config.data.convention, dataset=config.dataset,
                         cache=config.data.cache_images)
    if config.data.cache_images and config.data.num_workers > 0:
        data.preload()  # decoded once, shared by the forked workers
    return data


def training_ways(config: RunConfig) -> int:
    return int(config.knobs.get("ways", 1) or 1)


def build_training_episodes(config: RunConfig):
    from fss.data.episodes import EpisodeDataset, TrainEpisodeSampler
    from fss.data.transforms import build_train_transform

    data = open_split(config, "train")
    ways = training_ways(config)
    sampling = config.data.sampling if ways == 1 else "panet"
    sampler = TrainEpisodeSampler(
        data, shot=config.shot, seed=config.train.seed, ways=ways, sampling=sampling,
        episodes_per_epoch=config.data.episodes_per_epoch if sampling == "panet" else None,
    )
    transform = build_train_transform(config.data.augment, config.dataset, size=config.data.train_size)
    return EpisodeDataset(data, sampler, transform, seed=config.train.seed, keep_original=False)


def epoch_loader(dataset, epoch: int, first_batch: int, batch_size: int, num_workers: int, pin: bool,
                 rank: int = 0, world_size: int = 1):
    """Batches ``first_batch..`` of ``epoch`` (drop_last); no global RNG is consumed.

    ``batch_size`` is the global batch; under torchrun rank ``rank`` of ``world_size`` loads
    its contiguous slice of each global batch (``pipeline.distributed.rank_slice``).
    """
    import torch

    from fss.data.episodes import EpisodeLoader
    from pipeline.distributed import rank_slice

    dataset.set_epoch(epoch)
    n = len(dataset) // batch_size
    batches = [rank_slice(list(range(b * batch_size, (b + 1) * batch_size)), rank, world_size)
               for b in range(first_batch, n)]
    return EpisodeLoader(
        dataset, num_workers=num_workers, pin=pin, batch_sampler=batches,
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=worker_ignores_stop_signals if num_workers > 0 else None,
    )


def worker_ignores_stop_signals(_worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the training process: a Ctrl-C or a kill
    of the process group (torchrun, a scheduler) then ends with the checkpoint the training
    loop writes, instead of a "DataLoader worker killed" error; the loader stops its workers
    when the loop returns."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v) for k, v in batch.items()}


# ---------------------------------------------------------------- the loop


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the end of the step and exits."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def build_model(config: RunConfig, shot: int | None = None, with_weights: bool = True):
    from fss.models.registry import create_model

    return create_model(
        config.method, backbone=config.backbone, shot=shot or config.shot,
        backbone_weights=config.backbone_weights if with_weights else None, **dict(config.knobs),
    )


def set_determinism(config: RunConfig, device) -> bool:
    import torch

    mode = config.train.deterministic
    on = (device.type == "cpu") if mode == "auto" else mode == "on"
    torch.use_deterministic_algorithms(on, warn_only=True)
    # cuDNN autotuning (fastest conv algorithms for the fixed episode size) unless determinism is asked for
    torch.backends.cudnn.benchmark = device.type == "cuda" and not on
    return on


def set_threads(count: int) -> None:
    """``train.num_threads``: torch's intra-op threads (0 keeps torch's default)."""
    import torch

    if count > 0 and torch.get_num_threads() != count:
        torch.set_num_threads(count)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def train_run(
    config: RunConfig,
    out: str | os.PathLike,
    *,
    stop_after: int | None = None,
    track: TrackFn | None = None,
    say: Callable[[str], None] | None = None,
    plots_dir: str | os.PathLike | None = None,
    on_validation: Callable[[int, float], None] | None = None,
) -> dict:
    """Train (or resume, or finish) the run in ``out``; returns the run summary.

    ``on_validation(iteration, miou)`` is called after each validation check (sweeps
    report it for pruning); an exception it raises (``optuna.TrialPruned``) stops the run
    after the check was logged, as a kill would: rerunning resumes from the last checkpoint.

    ``plots_dir``: where copies of curves.csv and val.csv go at the end (DVC plots).
    ``stop_after`` (testing): checkpoint and return after that many iterations, as if
    the process had been killed right after a checkpoint.
    """
    import torch

    from fss.models.checkpoints import save_model_file
    from pipeline import runs as R
    from pipeline.tracking import Tracker

    from pipeline import distributed as D

    # torchrun: one process per device; rank 0 alone touches the run directory (see pipeline.distributed)
    D.per_rank_batch_size(config.train.batch_size, D.launched_world_size())  # before any rank waits for another
    ctx, device = D.setup_distributed(config.train.device, config.train.dist_backend, config.train.dist_timeout_minutes)
    D.per_rank_batch_size(config.train.batch_size, ctx.world_size)
    say = (say or (lambda m: None)) if ctx.is_main else (lambda m: None)
    run = D.rank_run_dir(out, ctx)
    D.on_main(lambda: run.prepare(config), ctx)  # a rerun must match the saved config (operational keys aside)
    deterministic = set_determinism(config, device)
    warning = bf16_cpu_warning(config.train.precision, device)
    if warning:
        say(warning)
    set_threads(config.train.num_threads)

    dataset = build_training_episodes(config)
    bs = config.train.batch_size
    per_epoch = len(dataset) // bs
    if per_epoch == 0:
        raise ConfigError(
            f"train.batch_size={bs} is larger than the {len(dataset)} training episodes per epoch of fold {config.fold}; lower it."
        )
    total = config.train.iterations or config.train.epochs * per_epoch

    # validation data (novel classes of the fold, seed distinct from the test seeds)
    val_every = config.validation.every
    validate = val_every > 0 or config.validation.select == "best"
    val_data = open_split(config, "val") if validate else None
    val_protocol = validation_protocol(config) if validate else None

    seed_everything(config.train.seed)
    model = build_model(config).to(device)
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(config, model)
    say(f"train {config.group} fold {config.fold}: {total} iterations ({per_epoch} per epoch) on {device} -> {out}")
    say(config.to_yaml().rstrip())

    if ctx.distributed:
        say(f"torchrun: {ctx.world_size} processes ({ctx.backend}), {bs // ctx.world_size} episodes each per step of {bs}")
    curves = R.CsvLog(run.file(R.CURVES_FILE), ("iteration", "epoch", "lr")) if ctx.is_main else D.NullLog()
    val_log = R.CsvLog(run.file(R.VAL_FILE), ("iteration", "epoch")) if ctx.is_main else D.NullLog()
    start, best, window, elapsed_before = 0, {"miou": None, "iteration": None}, {}, 0.0

    def read_checkpoint():
        if not run.checkpoint_file.is_file():
            return None
        blob = R.load_checkpoint(run.checkpoint_file)
        R.checkpoint_matches_model(blob, model, run.checkpoint_file)
        if blob["total_iterations"] != total:
            raise ConfigError(
                f"{run.checkpoint_file} was written for {blob['total_iterations']} iterations, this run has {total}; choose a new --out."
            )
        return blob

    blob = D.on_main(read_checkpoint, ctx)  # torchrun: every rank resumes from rank 0's checkpoint
    if blob is not None:
        model.load_state_dict(blob["model"])
        try:
            optimizer.load_state_dict(blob["optimizer"])
        except (ValueError, KeyError, RuntimeError):
            raise ConfigError(f"{run.checkpoint_file} holds an optimiser state that does not fit; choose a new --out.") from None
        R.restore_rng_state(blob["rng"])
        start, best, window = int(blob["iteration"]), blob["best"], blob["window"]
        elapsed_before = float(blob.get("elapsed_s", 0.0))
        curves.truncate_after(start)
        val_log.truncate_after(start)
        run.log(f"resumed at iteration {start}/{total}")
        say(f"resuming {out} at iteration {start}/{total}")
    else:
        curves.reset()
        val_log.reset()
        run.log(f"started: {config.method} {config.dataset} fold {config.fold} {config.shot}-shot, {total} iterations")

    # the module called in training (DDP under torchrun); ``model`` stays the plain one that is saved
    net = D.wrap_model(model, ctx, device, find_unused_parameters=config.train.ddp_find_unused_parameters,
                       sync_batchnorm=config.train.sync_batchnorm)
    tracker = Tracker(
        enabled=config.tracking.wandb and ctx.is_main, project=config.tracking.project, entity=config.tracking.entity,
        group=config.group, job_type="train", name=f"fold{config.fold}", config=config.to_dict(),
        run_id=_wandb_id(run), init_timeout=config.tracking.init_timeout, warn=say,
    )
    _save_wandb_id(run, tracker)

    autocast = _autocast(config, device)
    progress_hook = getattr(model, "set_train_progress", None)
    clock = time.monotonic()
    last_checkpoint = clock
    elapsed = lambda: elapsed_before + (time.monotonic() - clock)  # noqa: E731
    stop_reason = None

    def save_state(iteration: int) -> None:
        nonlocal last_checkpoint
        R.save_checkpoint(
            run.checkpoint_file, config=config, iteration=iteration, total_iterations=total, model=model,
            optimizer=optimizer, scheduler_state={"name": config.schedule.name, "last_lr": learning_rate(config, max(iteration - 1, 0), total)},
            best=best, window=window, elapsed_s=elapsed(),
        )
        last_checkpoint = time.monotonic()

    def run_validation(iteration: int, epoch: int) -> None:
        nonlocal best
        with R.rng_preserved():
            result = evaluate_model(
                model, val_data, val_protocol, shot=config.shot, device=device,
                batch_size=config.test.batch_size,
                num_workers=config.data.num_workers if config.test.num_workers is None else config.test.num_workers,
                precision=config.train.precision, ways=1, channels_last=config.train.channels_last,
            )
        model.train()
        row = {"iteration": iteration, "epoch": epoch, "val_miou": result["miou"], "val_fb_iou": result["fb_iou"],
               "val_episodes": result["episodes"]}
        val_log.append(row)
        tracker.log({"val/miou": result["miou"], "val/fb_iou": result["fb_iou"]}, step=iteration)
        if best["miou"] is None or result["miou"] > best["miou"]:
            best = {"miou": float(result["miou"]), "fb_iou": float(result["fb_iou"]), "iteration": iteration}
            save_model_file(run.file(R.MODEL_BEST), model, method=config.method, backbone=config.backbone,
                            shot=config.shot, knobs=dict(config.knobs), source=f"run:{run.path}@{iteration}")
        run.log(f"validation at {iteration}: mIoU {result['miou']:.4f} FB-IoU {result['fb_iou']:.4f}")
        if on_validation is not None:
            on_validation(iteration, float(result["miou"]))

    model.train()
    done = start
    with _StopFlag() as stop:
        iterator = None
        steps = range(start, total)
        if track is not None and start < total:
            steps = track(steps, f"train {config.method} fold {config.fold}", total - start)
        for it in steps:
            epoch, batch_index = divmod(it, per_epoch)
            if iterator is None or batch_index == 0:
                iterator = iter(epoch_loader(dataset, epoch, batch_index, bs, config.data.num_workers,
                                             pin=device.type == "cuda", rank=ctx.rank, world_size=ctx.world_size))
            batch = to_device(next(iterator), device)
            if config.train.channels_last:
                batch = channels_last_batch(batch)
            lr = learning_rate(config, it, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if progress_hook is not None:
                progress_hook(it / total)
            if ctx.distributed:  # per-rank training randomness keyed by (seed, rank, iteration)
                D.seed_rank_step(config.train.seed, ctx.rank, it)
            with autocast():
                output = net(batch)
            loss = output.losses["loss"]
            # mean over ranks of the losses (the global batch's loss) and, in the same all-reduce,
            # whether any rank got a stop signal: every rank stops at the same step
            losses, stopping = D.reduce_mean(output.losses, ctx, flag=stop.signal is not None)
            if not math.isfinite(losses["loss"]):
                raise ConfigError(
                    f"the loss became {losses['loss']} at iteration {it}; lower optim.lr or check the data (run {out})."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], config.train.grad_clip)
            optimizer.step()

            for name, value in losses.items():
                window[name] = window.get(name, 0.0) + value
            window["_n"] = window.get("_n", 0) + 1
            done = it + 1
            if done % config.train.log_every == 0 or done == total:
                n = window.pop("_n")
                row = {"iteration": done, "epoch": epoch, "lr": lr}
                row.update({k: v / n for k, v in sorted(window.items())})
                row["seconds"] = round(elapsed(), 3)
                curves.append(row)
                tracker.log({f"train/{k}": v for k, v in row.items() if k != "iteration"}, step=done)
                window = {}
            if validate and ((val_every and done % val_every == 0) or done == total):
                if ctx.is_main:  # torchrun: rank 0 validates, the others wait
                    run_validation(done, epoch)
                D.barrier(ctx)
            minutes = config.train.checkpoint_minutes
            due = (
                done == total
                or (config.train.checkpoint_every and done % config.train.checkpoint_every == 0)
                or (minutes > 0 and time.monotonic() - last_checkpoint >= minutes * 60)
                or (stop_after is not None and done >= stop_after)
                or stopping
            )
            if due and ctx.is_main:
                save_state(done)
            if stop_after is not None and done >= stop_after and done < total:
                stop_reason = f"stopped after iteration {done} (--stop-after)"
                break
            if stopping and done < total:
                stop_reason = f"interrupted by signal {stop.signal} at iteration {done}; checkpoint saved"
                break
    if stop_reason is not None:
        run.log(stop_reason)
        tracker.finish(exit_code=1)
        say(f"{stop_reason}; rerun the same command to resume.")
        return {"status": "stopped", "iteration": done, "total_iterations": total,
                "signal": stop.signal}

    if not ctx.is_main:  # torchrun: rank 0 writes the final files; the others wait for it
        D.barrier(ctx)
        return {"status": "done", "rank": ctx.rank, "world_size": ctx.world_size, "iterations": total}
    if start >= total:
        say(f"{out} was already trained ({total} iterations); writing its final files.")
    summary = _finish(config, run, model, best, total, per_epoch, elapsed(), deterministic, device,
                      world_size=ctx.world_size)
    if not run.file(R.VAL_FILE).is_file():  # no validation: an empty table, so the file always exists
        R.atomic_write_text(run.file(R.VAL_FILE), "iteration,epoch,val_miou,val_fb_iou,val_episodes\n")
    if plots_dir is not None:
        for name in (R.CURVES_FILE, R.VAL_FILE):
            R.atomic_write_text(Path(plots_dir) / name, run.file(name).read_text())
    tracker.summary({"final/" + k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
    tracker.finish()
    D.barrier(ctx)
    return summary


def _finish(config: RunConfig, run, model, best, total, per_epoch, elapsed_s, deterministic, device,
            world_size: int = 1) -> dict:
    """Final model files and summary (idempotent: redone when a finished run is rerun)."""
    from fss.models.checkpoints import save_model_file
    from pipeline import runs as R

    save_model_file(run.file(R.MODEL_LAST), model, method=config.method, backbone=config.backbone,
                    shot=config.shot, knobs=dict(config.knobs), source=f"run:{run.path}@{total}")
    selected = "last"
    if config.validation.select == "best" and run.file(R.MODEL_BEST).is_file():
        selected = "best"
    source = run.file(R.MODEL_BEST if selected == "best" else R.MODEL_LAST)
    tmp = run.file(".model.pt.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(source, tmp)  # a hard link: the selected weights are not stored twice
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, run.file(R.MODEL_SELECTED))
    summary = {
        "kind": "fss-train-summary",
        "method": config.method,
        "dataset": config.dataset,
        "fold": config.fold,
        "shot": config.shot,
        "backbone": config.backbone,
        "group": config.group,
        "iterations": total,
        "iterations_per_epoch": per_epoch,
        "epochs": total / per_epoch,
        "selection": config.validation.select,
        "selected": selected,
        "selected_file": R.MODEL_SELECTED,
        "selected_from": source.name,
        "best_val_miou": best.get("miou"),
        "best_val_iteration": best.get("iteration"),
        "validation": {"split": "val (the fold's novel classes)", "seed": config.validation.seed,
                       "episodes": config.validation.episodes, "every": config.validation.every},
        "train_seconds": round(elapsed_s, 3),
        "device": str(device),
        "world_size": world_size,  # torchrun processes (train.batch_size is their global batch)
        "deterministic_algorithms": deterministic,
    }
    R.write_json(run.file(R.SUMMARY_FILE), summary)
    run.log(f"finished: selected {selected} weights ({source.name})")
    return summary


def _wandb_id(run) -> str | None:
    p = run.file("wandb_run_id.txt")
    return p.read_text().strip() or None if p.is_file() else None


def _save_wandb_id(run, tracker) -> None:
    if tracker.run_id:
        from pipeline.runs import atomic_write_text

        atomic_write_text(run.file("wandb_run_id.txt"), tracker.run_id + "\n")


def _autocast(config: RunConfig, device):
    import contextlib

    import torch

    if config.train.precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


# ---------------------------------------------------------------- the command


def train_command(
    method: str = typer.Option(..., help="Method name (see 'fss methods')."),
    dataset: str = typer.Option(..., help="pascal, coco or synthetic."),
    fold: int = typer.Option(..., help="Fold 0..3."),
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
) -> None:
    """Train METHOD on one fold; the resolved config is saved in OUT and printed."""
    import json

    from fss.errors import FSSError
    from pipeline import distributed as D
    from pipeline.console import console, track

    follower = D.launched_rank() > 0  # torchrun rank > 0: silent (rank 0 prints, logs and errors)
    try:
        config = resolve_run_config(
            method=method, dataset=dataset, fold=fold, shot=shot, backbone=backbone, iterations=iterations,
            epochs=epochs, device=device, set_values=set_, params_path=params,
        )
        summary = train_run(config, out, stop_after=stop_after, track=None if follower else track, plots_dir=plots_dir,
                            say=lambda m: console.print(m, highlight=False, markup=False, soft_wrap=True))
    except FSSError:
        if follower:
            raise typer.Exit(2) from None  # the same one-line error is printed by rank 0
        raise
    finally:
        D.teardown_distributed()
    if not follower:
        typer.echo(json.dumps(summary, sort_keys=True, default=str))
    if summary.get("status") == "stopped" and summary.get("signal") is not None:
        raise typer.Exit(130)  # interrupted: never report success (DVC must not record the outputs)
