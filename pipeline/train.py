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
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fss.errors import ConfigError
from fss.evaluation import validation_protocol
from fss.layout import channels_last_batch
from fss.models.checkpoints import save_model_file
from fss.models.registry import create_model
from fss.precision import autocast
from fss.schedule import poly_lr

from pipeline import distributed as D, loop as L, runs as R
from pipeline.config import RunConfig, bf16_cpu_warning
from pipeline.eval_report import Interval, ScoredModel, run_settings, score
from pipeline.tracking import model_artifact_name, start_training
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


# ---------------------------------------------------------------- the run


def build_model(config: RunConfig, shot: int | None = None, with_weights: bool = True):
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
    if count > 0 and torch.get_num_threads() != count:
        torch.set_num_threads(count)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class Trainer:
    """What the loop works with, built once by :func:`setup` (the train state is separate); the
    task of :func:`pipeline.loop.run_steps` (learning rate, step, logging and validation, checkpoint)."""

    config: RunConfig
    out: str | os.PathLike
    main: L.MainProcess  # rank 0's run directory, logs and messages (stand-ins on the other ranks)
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
    on_validation: Callable[[int, float], None] | None = None

    @property
    def run(self):  # pipeline.runs.RunDir; rank > 0 gets a stand-in that writes nothing
        return self.main.run

    @property
    def ctx(self):  # pipeline.distributed.DistContext
        return self.main.ctx

    def say(self, message: str) -> None:
        self.main.say(message)

    def learning_rate(self, it: int) -> float:
        return learning_rate(self.config, it, self.total)

    def step(self, it: int, batch: dict, lr: float, stop_requested: bool) -> tuple[dict, bool]:
        if self.config.train.channels_last:
            batch = channels_last_batch(batch)
        return train_step(self, it, batch, lr, stop_requested)

    def after_step(self, state: L.LoopState, epoch: int, lr: float, losses: dict) -> None:
        """The curves.csv window, then validation (rank 0 validates, the other ranks wait for it)."""
        log_losses(self, state, epoch, lr, losses)
        every, done = self.config.validation.every, state.iteration
        if self.val_data is not None and ((every and done % every == 0) or done == self.total):
            self.main.only(validate, self, state, epoch, self.on_validation)

    def save_checkpoint(self, state: L.LoopState) -> None:
        last_lr = learning_rate(self.config, max(state.iteration - 1, 0), self.total)
        L.save_state(self.run.checkpoint_file, config=self.config, state=state, total=self.total, model=self.model,
                     optimizer=self.optimizer, scheduler_state={"name": self.config.schedule.name, "last_lr": last_lr})


def setup(config: RunConfig, out, say: Callable[[str], None], restart_on_change: bool = False) -> Trainer:
    """Processes, determinism, data, model and optimiser of a run (nothing read from a checkpoint yet)."""
    # torchrun: one process per device; rank 0 alone touches the run directory (pipeline.loop.MainProcess)
    D.per_rank_batch_size(config.train.batch_size, D.launched_world_size())  # before any rank waits for another
    ctx, device = D.setup_distributed(config.train.device, config.train.dist_backend, config.train.dist_timeout_minutes)
    D.per_rank_batch_size(config.train.batch_size, ctx.world_size)
    main = L.MainProcess(ctx, out, say)
    say = main.say
    # a rerun must match the saved config (operational keys aside), or start afresh with restart_on_change
    main.shared(lambda: main.run.prepare(config, restart_on_change=restart_on_change, say=say))
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
        config=config, out=out, main=main, device=device, deterministic=deterministic, dataset=dataset,
        per_epoch=per_epoch, total=total, model=model, optimizer=optimizer,
        curves=main.csv_log(R.CURVES_FILE, ("iteration", "epoch", "lr")),
        val_log=main.csv_log(R.VAL_FILE, ("iteration", "epoch")),
        val_data=open_split(config, config.validation.split) if validate else None,
        val_protocol=validation_protocol(config) if validate else None,
    )


def resume_or_start(t: Trainer) -> L.LoopState:
    """The state of ``checkpoint.pt`` when the run directory has one (model, optimiser and RNGs
    loaded from it), else a fresh state with emptied logs (detectron2's ``resume_or_load``)."""
    config = t.config
    state = L.resume(t.main, t.model, t.optimizer, t.total)  # torchrun: every rank resumes from rank 0's checkpoint
    if state is None:
        t.curves.reset()
        t.val_log.reset()
        t.run.log(f"started: {config.method} {config.dataset} fold {config.fold} {config.shot}-shot, {t.total} iterations")
        return L.LoopState()
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
    with autocast(t.config.train.precision, t.device):
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


def log_losses(t: Trainer, state: L.LoopState, epoch: int, lr: float, losses: dict) -> None:
    """Add the step's losses to the window; every ``train.log_every`` steps (and at the end)
    write their mean as a curves.csv row and to W&B."""
    row = L.log_window(state, t.curves, losses, every=t.config.train.log_every, total=t.total,
                       first={"epoch": epoch, "lr": lr})
    if row is not None:
        t.tracker.log({f"train/{k}": v for k, v in row.items() if k != "iteration"}, step=row["iteration"])


def validate(t: Trainer, state: L.LoopState, epoch: int, on_validation: Callable[[int, float], None] | None) -> None:
    """Score the model on the validation episodes; a better mIoU writes ``model_best.pt``."""
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
    """Train (or resume, or finish) the run in ``out``; returns :func:`run_result`'s one shape
    (``status`` done or stopped, the run summary under ``summary`` when done, on every rank).

    ``on_validation(iteration, miou)`` is called after each validation check (sweeps
    report it for pruning); an exception it raises (``optuna.TrialPruned``) stops the run
    after the check was logged, as a kill would: rerunning resumes from the last checkpoint.

    ``plots_dir``: where copies of curves.csv and val.csv go at the end (DVC plots).
    ``stop_after`` (testing): checkpoint and return after that many iterations, as if
    the process had been killed right after a checkpoint. ``restart_on_change``: a run directory
    of another configuration, code, backbone weights or data is emptied instead of refused.
    """
    t = setup(config, out, say or (lambda m: None), restart_on_change=restart_on_change)
    t.on_validation = on_validation
    state = resume_or_start(t)
    if state.iteration >= t.total > 0:
        t.say(f"{out} was already trained ({t.total} iterations); writing its final files.")
    t.net = D.wrap_model(t.model, t.ctx, t.device, find_unused_parameters=config.train.ddp_find_unused_parameters,
                         sync_batchnorm=config.train.sync_batchnorm)
    t.tracker = start_training(config, enabled=config.tracking.wandb and t.main.is_main, run_id=t.run.wandb_run_id(),
                               warn=t.say)
    t.run.save_wandb_run_id(t.tracker.run_id)
    t.model.train()
    batches = EpochBatches(t.dataset, t.per_epoch, config.train.batch_size, config.data.num_workers,
                           pin=t.device.type == "cuda", device=t.device, rank=t.ctx.rank, world_size=t.ctx.world_size)
    outcome = L.run_steps(t, batches, state, main=t.main, cadence=L.Cadence(config.train.checkpoint_every,
                          config.train.checkpoint_minutes), stop_after=stop_after, track=track,
                          label=f"train {config.method} fold {config.fold}")
    if outcome.reason is not None:
        t.run.log(outcome.reason)
        t.tracker.finish(exit_code=1)
        t.say(f"{outcome.reason}; rerun the same command to resume.")
        return run_result(t, state, "stopped", signal=outcome.signal)
    # torchrun: rank 0 writes the final files; the others wait for it and get its summary
    summary = t.main.shared(lambda: write_final_files(t, state, plots_dir))
    return run_result(t, state, "done", summary=summary)


def run_result(t: Trainer, state: L.LoopState, status: str, *, signal: int | None = None,
               summary: dict | None = None) -> dict:
    """What :func:`train_run` returns, one shape: ``status`` (done, stopped), ``iteration`` of
    ``total_iterations``, ``signal`` (the one that stopped it, else None), ``rank``/``world_size``
    and ``summary`` (train_summary.json's content when done, else None)."""
    return {"status": status, "iteration": state.iteration, "total_iterations": t.total, "signal": signal,
            "rank": t.ctx.rank, "world_size": t.ctx.world_size, "summary": summary}


def write_final_files(t: Trainer, state: L.LoopState, plots_dir) -> dict:
    """Rank 0, at the end (again when a finished run is rerun): the model files, train_summary.json,
    empty curves/val tables where nothing was logged, plot copies and W&B's summary; the summary."""
    run, config = t.run, t.config
    selected, source = save_selected_model(t)
    summary = train_summary(t, state, selected, source)
    R.write_json(run.file(R.SUMMARY_FILE), summary)
    run.log(f"finished: selected {selected} weights ({source.name})")
    if not run.file(R.CURVES_FILE).is_file():  # a training-free method: an empty curve, so the file always exists
        R.atomic_write_text(run.file(R.CURVES_FILE), "iteration,epoch,lr,loss\n")
    if not run.file(R.VAL_FILE).is_file():  # no validation: an empty table, so the file always exists
        R.atomic_write_text(run.file(R.VAL_FILE), "iteration,epoch,val_miou,val_fb_iou,val_episodes\n")
    if plots_dir is not None:
        for name in (R.CURVES_FILE, R.VAL_FILE):
            R.atomic_write_text(Path(plots_dir) / name, run.file(name).read_text())
    t.tracker.summary({"final/" + k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
    t.tracker.log_model(run.file(R.MODEL_SELECTED), model_artifact_name(
        config.method, config.dataset, config.backbone, config.shot, config.fold), metadata=summary)
    t.tracker.finish()
    return summary


def save_selected_model(t: Trainer) -> tuple[str, Path]:
    """model_last.pt, and model.pt linked to it or to model_best.pt (validation.select); which, and its file."""
    config, run = t.config, t.run
    save_model_file(run.file(R.MODEL_LAST), t.model, method=config.method, backbone=config.backbone,
                    shot=config.shot, knobs=dict(config.knobs), source=f"run:{run.path}@{t.total}")
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
    return selected, source


def train_summary(t: Trainer, state: L.LoopState, selected: str, source: Path) -> dict:
    """train_summary.json: what was trained, how long, which weights were selected."""
    config, best = t.config, state.best
    return {
        "kind": "fss-train-summary",
        "method": config.method,
        "dataset": config.dataset,
        "fold": config.fold,
        "shot": config.shot,
        "backbone": config.backbone,
        "group": config.group,
        "iterations": t.total,
        "iterations_per_epoch": t.per_epoch,
        "epochs": t.total / t.per_epoch,
        "selection": config.validation.select,
        "selected": selected,
        "selected_file": R.MODEL_SELECTED,
        "selected_from": source.name,
        "best_val_miou": best.get("miou"),
        "best_val_iteration": best.get("iteration"),
        "validation": {"split": config.validation.split, "seed": config.validation.seed,
                       "episodes": config.validation.episodes, "every": config.validation.every},
        "train_seconds": round(state.elapsed(), 3),
        "device": str(t.device),
        "world_size": t.ctx.world_size,  # torchrun processes (train.batch_size is their global batch)
        "deterministic_algorithms": t.deterministic,
    }
