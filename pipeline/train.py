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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from fss.errors import ConfigError
from fss.evaluation import validation_protocol
from fss.layout import channels_last_batch
from fss.schedule import poly_lr

from pipeline import distributed as D
from pipeline.config import RunConfig, bf16_cpu_warning
from pipeline.eval_report import Interval, ScoredModel, run_settings, score
from pipeline.train_data import EpochBatches, build_training_episodes, open_split

TrackFn = Callable[..., Any]


# ---------------------------------------------------------------- schedule and optimiser


def learning_rate(config: RunConfig, iteration: int, total: int) -> float:
    """The lr of (0-based) ``iteration`` of ``total`` (see the module docstring)."""
    base = config.optim.lr
    sched = config.schedule
    if sched.name == "poly":
        lr = poly_lr(base, iteration, total, sched.power)
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
    params = model.trainable_parameters()
    if not params:
        raise ConfigError(f"method {config.method} has no trainable parameter with these knobs; nothing to train.")
    o = config.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                               nesterov=o.nesterov and o.momentum > 0)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)


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
        backbone_weights=config.backbone_weights if with_weights else None,
        fg_weight=float(config.train.fg_weight), **dict(config.knobs),
    )


def set_determinism(config: RunConfig, device) -> bool:
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


@dataclass
class Trainer:
    """What the loop works with, built once by :func:`setup` (the train state is separate)."""

    config: RunConfig
    out: str | os.PathLike
    run: Any  # pipeline.runs.RunDir; rank > 0 gets a stand-in that writes nothing
    ctx: Any  # pipeline.distributed.DistContext
    device: Any
    deterministic: bool
    dataset: Any
    per_epoch: int
    total: int
    model: Any  # the plain module: saved, validated
    optimizer: Any
    curves: Any
    val_log: Any
    val_data: Any
    val_protocol: Any
    net: Any = None  # the module called in training (DDP under torchrun), wrapped once resumed
    tracker: Any = None
    say: Callable[[str], None] = lambda m: None


@dataclass
class TrainState:
    """Everything of a run's progress that a checkpoint holds besides weights, optimiser and RNGs."""

    iteration: int = 0
    best: dict = field(default_factory=lambda: {"miou": None, "iteration": None})
    window: dict = field(default_factory=dict)  # loss sums since the last curves.csv row
    elapsed_before: float = 0.0  # seconds trained before this process resumed the run
    clock: float = field(default_factory=time.monotonic)
    last_checkpoint: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self.clock)


def setup(config: RunConfig, out, say: Callable[[str], None], restart_on_change: bool = False) -> Trainer:
    """Processes, determinism, data, model and optimiser of a run (nothing read from a checkpoint yet)."""
    from pipeline import runs as R

    # torchrun: one process per device; rank 0 alone touches the run directory (see pipeline.distributed)
    D.per_rank_batch_size(config.train.batch_size, D.launched_world_size())  # before any rank waits for another
    ctx, device = D.setup_distributed(config.train.device, config.train.dist_backend, config.train.dist_timeout_minutes)
    D.per_rank_batch_size(config.train.batch_size, ctx.world_size)
    say = say if ctx.is_main else (lambda m: None)
    run = D.rank_run_dir(out, ctx)
    # a rerun must match the saved config (operational keys aside), or start afresh with restart_on_change
    D.on_main(lambda: run.prepare(config, restart_on_change=restart_on_change, say=say), ctx)
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
    # validation data: novel classes of the fold, seed distinct from the test seeds
    validate = config.validation.every > 0 or config.validation.select == "best"

    seed_everything(config.train.seed)  # the model's initial weights depend on the seed only
    model = build_model(config).to(device)
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if model.training_free:  # e.g. prototype: the run directory holds the fixed model, 0 steps
        total, validate = 0, False
    optimizer = make_optimizer(config, model) if total else None
    say(f"train {config.group} fold {config.fold}: {total} iterations ({per_epoch} per epoch) on {device} -> {out}")
    say(config.to_yaml().rstrip())
    if ctx.distributed:
        say(f"torchrun: {ctx.world_size} processes ({ctx.backend}), {bs // ctx.world_size} episodes each per step of {bs}")
    return Trainer(
        config=config, out=out, run=run, ctx=ctx, device=device, deterministic=deterministic, dataset=dataset,
        per_epoch=per_epoch, total=total, model=model, optimizer=optimizer,
        curves=R.CsvLog(run.file(R.CURVES_FILE), ("iteration", "epoch", "lr")) if ctx.is_main else D.NullLog(),
        val_log=R.CsvLog(run.file(R.VAL_FILE), ("iteration", "epoch")) if ctx.is_main else D.NullLog(),
        val_data=open_split(config, config.validation.split) if validate else None,
        val_protocol=validation_protocol(config) if validate else None, say=say,
    )


def resume_or_start(t: Trainer) -> TrainState:
    """The state of ``checkpoint.pt`` when the run directory has one (model, optimiser and RNGs
    loaded from it), else a fresh state with emptied logs (detectron2's ``resume_or_load``)."""
    from pipeline import runs as R

    def read_checkpoint():
        if not t.run.checkpoint_file.is_file():
            return None
        blob = R.load_checkpoint(t.run.checkpoint_file)
        R.checkpoint_matches_model(blob, t.model, t.run.checkpoint_file)
        if blob["total_iterations"] != t.total:
            raise ConfigError(
                f"{t.run.checkpoint_file} was written for {blob['total_iterations']} iterations, this run has {t.total}; choose a new --out."
            )
        return blob

    config = t.config
    blob = D.on_main(read_checkpoint, t.ctx)  # torchrun: every rank resumes from rank 0's checkpoint
    if blob is None:
        t.curves.reset()
        t.val_log.reset()
        t.run.log(f"started: {config.method} {config.dataset} fold {config.fold} {config.shot}-shot, {t.total} iterations")
        return TrainState()
    t.model.load_state_dict(blob["model"])
    try:
        t.optimizer.load_state_dict(blob["optimizer"])
    except (ValueError, KeyError, RuntimeError):
        raise ConfigError(f"{t.run.checkpoint_file} holds an optimiser state that does not fit; choose a new --out.") from None
    R.restore_rng_state(blob["rng"])
    state = TrainState(iteration=int(blob["iteration"]), best=blob["best"], window=blob["window"],
                       elapsed_before=float(blob.get("elapsed_s", 0.0)))
    # rows a killed run logged after its last checkpoint are logged again by this one
    t.curves.truncate_after(state.iteration)
    t.val_log.truncate_after(state.iteration)
    t.run.log(f"resumed at iteration {state.iteration}/{t.total}")
    t.say(f"resuming {t.out} at iteration {state.iteration}/{t.total}")
    return state


def train_step(t: Trainer, it: int, batch: dict, lr: float, stop_requested: bool) -> tuple[dict, bool]:
    """One optimiser step at ``lr``; the losses (mean over ranks) and whether any rank was asked to stop."""

    for group in t.optimizer.param_groups:
        group["lr"] = lr
    t.model.set_train_progress(it / t.total)  # methods whose training follows the schedule (FSSModel)
    if t.ctx.distributed:  # per-rank training randomness keyed by (seed, rank, iteration)
        D.seed_rank_step(t.config.train.seed, t.ctx.rank, it)
    with _autocast(t.config, t.device)():
        output = t.net(batch)
    # mean over ranks of the losses (the global batch's loss) and, in the same all-reduce,
    # whether any rank got a stop signal: every rank stops at the same step
    losses, stopping = D.reduce_mean(output.losses, t.ctx, flag=stop_requested)
    if not math.isfinite(losses["loss"]):
        raise ConfigError(
            f"the loss became {losses['loss']} at iteration {it}; lower optim.lr or check the data (run {t.out})."
        )
    t.optimizer.zero_grad(set_to_none=True)
    output.losses["loss"].backward()
    if t.config.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(t.optimizer.param_groups[0]["params"], t.config.train.grad_clip)
    t.optimizer.step()
    return losses, stopping


def log_losses(t: Trainer, state: TrainState, epoch: int, lr: float, losses: dict) -> None:
    """Add the step's losses to the window; every ``train.log_every`` steps (and at the end)
    write their mean as a curves.csv row and to W&B."""
    for name, value in losses.items():
        state.window[name] = state.window.get(name, 0.0) + value
    state.window["_n"] = state.window.get("_n", 0) + 1
    done = state.iteration
    if done % t.config.train.log_every != 0 and done != t.total:
        return
    n = state.window.pop("_n")
    row = {"iteration": done, "epoch": epoch, "lr": lr}
    row.update({k: v / n for k, v in sorted(state.window.items())})
    row["seconds"] = round(state.elapsed(), 3)
    t.curves.append(row)
    t.tracker.log({f"train/{k}": v for k, v in row.items() if k != "iteration"}, step=done)
    state.window = {}


def validate(t: Trainer, state: TrainState, epoch: int, on_validation: Callable[[int, float], None] | None) -> None:
    """Score the model on the validation episodes; a better mIoU writes ``model_best.pt``."""
    from fss.models.checkpoints import save_model_file
    from pipeline import runs as R

    config, iteration = t.config, state.iteration
    with R.rng_preserved():  # validation must not change the training randomness (bit-identical resume)
        result, _ = score(t.model, ScoredModel.from_config(config, selection=f"iteration {iteration}"), t.val_data,
                          t.val_protocol, run_settings(config, t.device), interval=Interval.of(config.test))
    R.write_json(t.run.file(R.VAL_REPORT), result)  # the latest check's report (the evaluation report's fields)
    t.model.train()
    t.val_log.append({"iteration": iteration, "epoch": epoch, "val_miou": result["miou"],
                      "val_fb_iou": result["fb_iou"], "val_episodes": result["episodes"]})
    t.tracker.log({"val/miou": result["miou"], "val/fb_iou": result["fb_iou"]}, step=iteration)
    if state.best["miou"] is None or result["miou"] > state.best["miou"]:
        state.best = {"miou": float(result["miou"]), "fb_iou": float(result["fb_iou"]), "iteration": iteration}
        save_model_file(t.run.file(R.MODEL_BEST), t.model, method=config.method, backbone=config.backbone,
                        shot=config.shot, knobs=dict(config.knobs), source=f"run:{t.run.path}@{iteration}")
    t.run.log(f"validation at {iteration}: mIoU {result['miou']:.4f} FB-IoU {result['fb_iou']:.4f}")
    if on_validation is not None:
        on_validation(iteration, float(result["miou"]))


def checkpoint_due(t: Trainer, state: TrainState, stop_after: int | None, stopping: bool) -> bool:
    """At the end, every ``train.checkpoint_every`` steps or ``train.checkpoint_minutes``, and before any stop."""
    train, done = t.config.train, state.iteration
    return bool(
        done == t.total
        or (train.checkpoint_every and done % train.checkpoint_every == 0)
        or (train.checkpoint_minutes > 0 and time.monotonic() - state.last_checkpoint >= train.checkpoint_minutes * 60)
        or (stop_after is not None and done >= stop_after)
        or stopping
    )


def save_checkpoint(t: Trainer, state: TrainState) -> None:
    from pipeline import runs as R

    last_lr = learning_rate(t.config, max(state.iteration - 1, 0), t.total)
    R.save_checkpoint(
        t.run.checkpoint_file, config=t.config, iteration=state.iteration, total_iterations=t.total, model=t.model,
        optimizer=t.optimizer, scheduler_state={"name": t.config.schedule.name, "last_lr": last_lr},
        best=state.best, window=state.window, elapsed_s=state.elapsed(),
    )
    state.last_checkpoint = time.monotonic()


def train_run(
    config: RunConfig,
    out: str | os.PathLike,
    *,
    stop_after: int | None = None,
    track: TrackFn | None = None,
    say: Callable[[str], None] | None = None,
    plots_dir: str | os.PathLike | None = None,
    on_validation: Callable[[int, float], None] | None = None,
    restart_on_change: bool = False,
) -> dict:
    """Train (or resume, or finish) the run in ``out``; returns the run summary.

    ``on_validation(iteration, miou)`` is called after each validation check (sweeps
    report it for pruning); an exception it raises (``optuna.TrialPruned``) stops the run
    after the check was logged, as a kill would: rerunning resumes from the last checkpoint.

    ``plots_dir``: where copies of curves.csv and val.csv go at the end (DVC plots).
    ``stop_after`` (testing): checkpoint and return after that many iterations, as if
    the process had been killed right after a checkpoint. ``restart_on_change``: a run directory
    of another configuration, code, backbone weights or data is emptied instead of refused.
    """
    from pipeline.tracking import start_training

    t = setup(config, out, say or (lambda m: None), restart_on_change=restart_on_change)
    state = resume_or_start(t)
    if state.iteration >= t.total > 0:
        t.say(f"{out} was already trained ({t.total} iterations); writing its final files.")
    t.net = D.wrap_model(t.model, t.ctx, t.device, find_unused_parameters=config.train.ddp_find_unused_parameters,
                         sync_batchnorm=config.train.sync_batchnorm)
    t.tracker = start_training(config, enabled=config.tracking.wandb and t.ctx.is_main, run_id=t.run.wandb_run_id(),
                               warn=t.say)
    t.run.save_wandb_run_id(t.tracker.run_id)
    val_every = config.validation.every
    steps = range(state.iteration, t.total)
    if track is not None and len(steps):
        steps = track(steps, f"train {config.method} fold {config.fold}", len(steps))
    t.model.train()
    stop_reason = None
    batches = EpochBatches(t.dataset, t.per_epoch, config.train.batch_size, config.data.num_workers,
                           pin=t.device.type == "cuda", device=t.device, rank=t.ctx.rank, world_size=t.ctx.world_size)
    with _StopFlag() as stop, batches:
        for it in steps:
            epoch, batch = batches.at(it)
            if config.train.channels_last:
                batch = channels_last_batch(batch)

            lr = learning_rate(config, it, t.total)
            losses, stopping = train_step(t, it, batch, lr, stop.signal is not None)
            state.iteration = done = it + 1
            log_losses(t, state, epoch, lr, losses)

            # validation (rank 0 validates, the other ranks wait for it)
            if t.val_data is not None and ((val_every and done % val_every == 0) or done == t.total):
                if t.ctx.is_main:
                    validate(t, state, epoch, on_validation)
                D.barrier(t.ctx)

            # checkpoint, then stop if asked: a rerun resumes exactly here
            if checkpoint_due(t, state, stop_after, stopping) and t.ctx.is_main:
                save_checkpoint(t, state)
            if stop_after is not None and stop_after <= done < t.total:
                stop_reason = f"stopped after iteration {done} (--stop-after)"
            elif stopping and done < t.total:
                stop_reason = f"interrupted by signal {stop.signal} at iteration {done}; checkpoint saved"
            if stop_reason is not None:
                break
    if stop_reason is not None:
        t.run.log(stop_reason)
        t.tracker.finish(exit_code=1)
        t.say(f"{stop_reason}; rerun the same command to resume.")
        return {"status": "stopped", "iteration": state.iteration, "total_iterations": t.total, "signal": stop.signal}
    return finish(t, state, plots_dir)


def finish(t: Trainer, state: TrainState, plots_dir) -> dict:
    """Final model files, empty val.csv without validation, plot copies and W&B summary."""
    from pipeline import runs as R
    from pipeline.tracking import model_artifact_name

    if not t.ctx.is_main:  # torchrun: rank 0 writes the final files; the others wait for it
        D.barrier(t.ctx)
        return {"status": "done", "rank": t.ctx.rank, "world_size": t.ctx.world_size, "iterations": t.total}
    run = t.run
    summary = _finish(t.config, run, t.model, state.best, t.total, t.per_epoch, state.elapsed(), t.deterministic,
                      t.device, world_size=t.ctx.world_size)
    if not run.file(R.CURVES_FILE).is_file():  # a training-free method: an empty curve, so the file always exists
        R.atomic_write_text(run.file(R.CURVES_FILE), "iteration,epoch,lr,loss\n")
    if not run.file(R.VAL_FILE).is_file():  # no validation: an empty table, so the file always exists
        R.atomic_write_text(run.file(R.VAL_FILE), "iteration,epoch,val_miou,val_fb_iou,val_episodes\n")
    if plots_dir is not None:
        for name in (R.CURVES_FILE, R.VAL_FILE):
            R.atomic_write_text(Path(plots_dir) / name, run.file(name).read_text())
    t.tracker.summary({"final/" + k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
    t.tracker.log_model(run.file(R.MODEL_SELECTED), model_artifact_name(
        t.config.method, t.config.dataset, t.config.backbone, t.config.shot, t.config.fold), metadata=summary)
    t.tracker.finish()
    D.barrier(t.ctx)
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
        "validation": {"split": config.validation.split, "seed": config.validation.seed,
                       "episodes": config.validation.episodes, "every": config.validation.every},
        "train_seconds": round(elapsed_s, 3),
        "device": str(device),
        "world_size": world_size,  # torchrun processes (train.batch_size is their global batch)
        "deterministic_algorithms": deterministic,
    }
    R.write_json(run.file(R.SUMMARY_FILE), summary)
    run.log(f"finished: selected {selected} weights ({source.name})")
    return summary


def _autocast(config: RunConfig, device):
    import contextlib

    import torch

    if config.train.precision == "bf16":
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext
