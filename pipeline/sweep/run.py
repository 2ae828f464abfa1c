"""Running trials: one point trained (or re-evaluated) per (fold, shot) and scored on validation
episodes, one claimed trial taken to its end state, and the worker loop."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import optuna
import typer
from optuna.trial import TrialState

from fss.errors import CheckpointError, ConfigError, DataError
from fss.evaluation import validation_protocol
from fss.models.checkpoints import load_model_file
from pipeline import parallel as P
from pipeline import runs as R
from pipeline.config import resolve_device
from pipeline.console import console
from pipeline.eval_report import Interval, ScoredModel, run_settings, score
from pipeline.runs import read_json, write_json
from pipeline.sweep.queueing import (
    Heartbeat,
    open_study,
    Say,
    claim_waiting,
    counts,
    duplicate_of,
    pid_token,
    quiet,
    recover_dead_trials,
    requeue_missing,
)
from pipeline.sweep.storage import default_storage, is_sqlite, normalize_storage, open_storage
from pipeline.sweep.study import StudySpec, load_study, point_key, point_slug, resolve_trial_config, test_seed_overlap
from pipeline.tracking import Tracker
from pipeline.train import train_run
from pipeline.train_data import open_split


def suggest(trial, spec: StudySpec) -> dict[str, Any]:
    """The trial's point (fixed for queued grid points, sampled for tuning)."""
    point = {}
    for p in spec.params:
        if p.kind in ("values", "choices", "variants"):
            point[p.name] = trial.suggest_categorical(p.name, p.grid_values())
        elif p.kind == "int":
            point[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            point[p.name] = trial.suggest_float(p.name, float(p.low), float(p.high), step=p.step, log=p.log)
    return point


class TrialStopped(Exception):
    """Training was interrupted by a signal (checkpoint saved); the trial is queued again."""


def evaluate_on_validation(config, model_path: Path, shot: int, out: Path, knob_overrides: Mapping[str, Any] | None = None,
                           tracking_off: bool = True) -> float:
    """Score a model file on the run's validation episodes (``pipeline.eval_report.score``: the
    report of ``fss evaluate``, with ``split`` the validation list, val or holdout); writes it
    to ``out`` and returns the mIoU read back from it."""
    overlap = test_seed_overlap(config)
    if overlap:  # load_study refuses this already; a guard for configs built elsewhere
        raise ConfigError(
            f"validation.seed {config.validation.seed} gives the episode seeds {overlap} of the test protocol "
            f"{config.test.protocol}; choose another validation.seed so the test numbers are not tuned on."
        )
    model, meta = load_model_file(model_path, shot=int(shot), dataset=config.dataset, method=config.method,
                                  knobs=dict(knob_overrides or {}))
    device = resolve_device(config.train.device)
    data = open_split(config, config.validation.split)
    report, _ = score(model.to(device), ScoredModel.from_meta(meta, model_path, "trial", int(config.train.seed)), data,
                      validation_protocol(config), run_settings(config, device, shot=int(shot)),
                      interval=Interval.of(config.test))
    write_json(out, report)
    return float(read_json(out, "evaluation")["miou"])


def _tracking_off(config):
    return dataclasses.replace(config, tracking=dataclasses.replace(config.tracking, wandb=False))


def run_point(spec: StudySpec, point: Mapping[str, Any], trial_dir: Path, *,
              report: Callable[[int, float], None] | None = None, say: Say = quiet) -> dict:
    """Train (or re-evaluate) every (fold, shot) of one point; returns the scores and objective.

    ``report(step, miou)`` gets the validation checks during training (step = count of
    checks so far in this trial), for pruning and W&B."""
    scores: dict[str, dict[str, float]] = {}
    reports: dict[str, dict[str, str]] = {}  # the validation reports (their episode counts: fss sweep report's intervals)
    checks = [0]
    overrides = spec.overrides(point)
    test_time_knobs = {k[len("knobs."):]: v for k, v in overrides.items() if k.startswith("knobs.")} \
        if spec.test_time else {}
    for shot in spec.shots:
        for fold in spec.folds:
            config = resolve_trial_config(spec, point, fold, shot)
            tag = f"fold{fold}" if len(spec.shots) == 1 else f"fold{fold}-{shot}shot"
            if spec.test_time:
                source = spec.checkpoint_for(fold, shot)
                model_path = source / R.MODEL_SELECTED if source.is_dir() else source
                if not model_path.is_file():
                    raise CheckpointError(f"checkpoint {model_path} of fold {fold} does not exist; train it first "
                                          f"('fss train' / dvc repro) or fix the study's 'checkpoint'.")
                out = trial_dir / f"val-{tag}.json"
            else:
                run_dir = trial_dir / tag

                def on_validation(iteration: int, miou: float) -> None:
                    checks[0] += 1
                    if report is not None:
                        report(checks[0], miou)

                result = train_run(_tracking_off(config), run_dir, on_validation=on_validation,
                                   say=lambda m: None if "\n" in m else say("  " + m))
                if result["status"] == "stopped":
                    raise TrialStopped(f"training of {run_dir} was interrupted")
                model_path = run_dir / R.MODEL_SELECTED
                out = run_dir / "val.json"
            miou = evaluate_on_validation(_tracking_off(config), model_path, shot, out, knob_overrides=test_time_knobs)
            scores.setdefault(str(shot), {})[str(fold)] = miou
            reports.setdefault(str(shot), {})[str(fold)] = str(out)
            say(f"  {tag}: validation mIoU {100 * miou:.2f}")
    values = [v for per_shot in scores.values() for v in per_shot.values()]
    return {"scores": scores, "objective": sum(values) / len(values), "reports": reports}


def _trial_tracker(spec: StudySpec, point: Mapping[str, Any], name: str, say: Say, *, force: bool | None = None):
    config = resolve_trial_config(spec, point, spec.folds[0], spec.shots[0])
    enabled = config.tracking.wandb if force is None else force
    tracker = Tracker(
        enabled=enabled, project=config.tracking.project, entity=config.tracking.entity, group=spec.name,
        job_type="sweep-trial", name=f"{spec.name}-{name}", init_timeout=config.tracking.init_timeout, warn=say,
        config={"study": spec.name, "method": spec.method, "dataset": spec.dataset, "folds": list(spec.folds),
                "shots": list(spec.shots), **{k: v for k, v in point.items()}},
    )
    tracker.define_metric("val/miou", summary="max")  # logged at each validation check (W&B early termination)
    return tracker


def execute_trial(study, storage, trial, spec: StudySpec, *, heartbeat: float, say: Say,
                  wandb: bool | None = None) -> str:
    """Run one claimed trial to its end state; returns COMPLETE / PRUNED / FAIL / DUPLICATE."""
    frozen = storage.get_trial(trial._trial_id)
    set_attr = lambda k, v: storage.set_trial_user_attr(trial._trial_id, k, v)  # noqa: E731
    set_attr("fss_host", socket.gethostname())
    set_attr("fss_pid", os.getpid())
    set_attr("fss_pid_token", pid_token(os.getpid()))
    set_attr("fss_heartbeat", time.time())
    point = suggest(trial, spec)
    key = point_key(point)
    if "fss_point" not in frozen.user_attrs:
        set_attr("fss_point", key)
    if spec.mode == "grid":
        dup = duplicate_of(study, trial, key)
        if dup is not None:
            set_attr("fss_duplicate_of", dup)
            study.tell(trial, state=TrialState.FAIL)
            say(f"trial {trial.number}: point {key} is already done or running (trial {dup}); skipped")
            return "DUPLICATE"
    run_dir = frozen.user_attrs.get("fss_run_dir") or str(spec.output / f"trial-{trial.number:04d}-{point_slug(point)}")
    set_attr("fss_run_dir", run_dir)
    say(f"trial {trial.number}: {key} -> {run_dir}")
    tracker = _trial_tracker(spec, point, f"trial-{trial.number}", say, force=wandb)

    def report(step: int, miou: float) -> None:
        tracker.log({"val/miou": miou}, step=step)
        if spec.mode == "tune":
            trial.report(miou, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation mIoU {miou:.4f} at check {step}")

    with Heartbeat(storage, trial._trial_id, heartbeat):
        try:
            result = run_point(spec, point, Path(run_dir), report=report, say=say)
        except optuna.TrialPruned as exc:
            study.tell(trial, state=TrialState.PRUNED)
            tracker.summary({"state": "pruned"})
            tracker.finish()
            say(f"trial {trial.number}: pruned ({exc})")
            return "PRUNED"
        except TrialStopped:
            set_attr("fss_interrupted", True)
            study.tell(trial, state=TrialState.FAIL)
            tracker.finish(exit_code=1)
            raise
        except KeyboardInterrupt:
            set_attr("fss_interrupted", True)
            study.tell(trial, state=TrialState.FAIL)
            tracker.finish(exit_code=1)
            raise
        except Exception as exc:  # noqa: BLE001 - a failing point must not end the sweep
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            set_attr("fss_error", f"{type(exc).__name__}: {first}")
            study.tell(trial, state=TrialState.FAIL)
            tracker.finish(exit_code=1)
            say(f"trial {trial.number}: FAILED ({type(exc).__name__}: {first})")
            if isinstance(exc, (CheckpointError, DataError)):
                raise  # missing data or weights: every other trial would fail the same way
            return "FAIL"
        set_attr("fss_scores", result["scores"])
        set_attr("fss_reports", result["reports"])
        study.tell(trial, result["objective"])
    tracker.log({"objective": result["objective"],
                 **{f"miou/{s}shot/fold{f}": v for s, d in result["scores"].items() for f, v in d.items()}})
    tracker.summary({"objective": result["objective"]})
    tracker.finish()
    say(f"trial {trial.number}: objective (mean validation mIoU) {100 * result['objective']:.2f}")
    return "COMPLETE"




def work(study, storage, spec: StudySpec, *, n_trials: int | None = None, grace: float = 600.0,
         heartbeat: float = 30.0, say: Say = quiet, wandb: bool | None = None) -> dict:
    """One worker: recover dead trials, then claim and run trials until the study is done."""
    ran = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0, "DUPLICATE": 0}
    budget = n_trials if (n_trials is not None and spec.mode == "tune") else spec.n_trials
    cap = n_trials if (n_trials is not None and spec.mode == "grid") else None
    if spec.mode == "grid":  # points whose trials failed in an earlier run are queued again (once)
        requeue_missing(study, storage, spec, study.study_name, reason="rerun", say=say)
    while True:
        recover_dead_trials(study, storage, spec, grace, say=say)
        if cap is not None and sum(v for k, v in ran.items() if k != "DUPLICATE") >= cap:
            break
        if spec.mode == "grid":
            trial = claim_waiting(study, storage)
            if trial is None:
                break
        else:
            c = counts(study)
            if c["COMPLETE"] + c["PRUNED"] + c["RUNNING"] >= budget:
                break
            trial = study.ask()
        ran[execute_trial(study, storage, trial, spec, heartbeat=heartbeat, say=say, wandb=wandb)] += 1
    return ran


# ---------------------------------------------------------------- the command `fss sweep run`


def _summary(study, storage_url: str, ran: Mapping[str, int] | None = None) -> dict:
    c = counts(study)
    out: dict[str, Any] = {"study": study.study_name, "storage": storage_url, "trials": c}
    if ran is not None:
        out["ran_now"] = dict(ran)
    if c["COMPLETE"]:
        best = study.best_trial
        out.update(best_value=best.value, best_params=best.params, best_trial=best.number)
    return out


def _worker_jobs(spec_path: Path, name: str, storage_url: str, workers: int, n_trials: Optional[int],
                 grace: float, heartbeat: float, wandb: Optional[bool]) -> list[P.Job]:
    """One single-worker `fss sweep run` on the shared storage per worker."""
    args = ["sweep", "run", str(spec_path), "--study", name, "--storage", storage_url, "--workers", "1",
            "--grace", str(grace), "--heartbeat", str(heartbeat)]
    if n_trials is not None:
        args += ["--n-trials", str(n_trials)]
    if wandb is not None:
        args += ["--wandb" if wandb else "--no-wandb"]
    return [P.Job(f"worker {i + 1}", P.fss_argv(*args)) for i in range(workers)]


def run_command(
    study_file: Path = typer.Argument(..., help="Study file (sweeps/*.yaml)."),
    study: Optional[str] = typer.Option(None, "--study", help="Study name (default: the file's 'study' key or stem)."),
    storage: Optional[str] = typer.Option(None, help="sqlite:///x.db, x.log (journal file), postgresql://..., mysql://... "
                                                      "(default: OUTPUT/study.db, or OUTPUT/journal.log with --workers > 1)."),
    n_trials: Optional[int] = typer.Option(None, "--n-trials", help="Tuning: the total trial budget (default: the file's "
                                                                    "n_trials). Grid: at most N trials in this run."),
    workers: int = typer.Option(1, help="Worker processes (several need a journal file or a server): on this machine "
                                        "(one GPU each when several are visible), or jobs with --engine submitit."),
    engine: Optional[str] = typer.Option(None, help="With --workers > 1: local (processes on this machine) or submitit "
                                         "(a job per worker: SLURM, resources from params 'cluster'; default: params "
                                         "benchmark.engine, local)."),
    grace: float = typer.Option(600.0, help="Seconds without heartbeat after which another machine's RUNNING trial is dead."),
    heartbeat: float = typer.Option(30.0, help="Seconds between heartbeats of a running trial."),
    wandb: Optional[bool] = typer.Option(None, "--wandb/--no-wandb", help="Log each trial as a W&B run grouped by "
                                                                         "study (default: the study's tracking.wandb)."),
    restart_on_change: bool = typer.Option(False, "--restart-on-change", help="A stored study of another study file "
                                           "or params (dvc.yaml's persisted storage) is deleted with its trial runs "
                                           "and started afresh instead of refused."),
) -> None:
    """Run (or continue) a study: every grid point once, or a sampler up to its budget."""
    if workers < 1:
        raise ConfigError(f"--workers {workers} must be at least 1.")
    if n_trials is not None and n_trials < 1:
        raise ConfigError(f"--n-trials {n_trials} must be at least 1.")
    say = lambda m: console.print(m, highlight=False, markup=False, soft_wrap=True)  # noqa: E731
    spec = load_study(study_file)
    name = study or spec.name
    url = normalize_storage(storage) if storage else default_storage(spec.output, workers)
    if workers > 1 and is_sqlite(url):
        raise ConfigError(f"--storage {url} is SQLite, which serves one worker; give a journal file (.log) or a "
                          f"PostgreSQL/MySQL URL for --workers {workers}.")
    store = open_storage(url, create_dirs=storage is None)
    opened = open_study(spec, store, url, name, say=say, restart_on_change=restart_on_change)
    if workers > 1:
        jobs = _worker_jobs(study_file, name, url, workers, n_trials, grace, heartbeat, wandb)
        _, engine, cluster = P.runner_settings(None, None, engine)
        P.run_jobs(jobs, engine=engine, slots=P.slot_envs(workers, workers, None), say=say, cluster=cluster)
        typer.echo(json.dumps(_summary(opened, url), sort_keys=True, default=str))
        return
    try:
        ran = work(opened, store, spec, n_trials=n_trials, grace=grace, heartbeat=heartbeat, say=say, wandb=wandb)
    except TrialStopped:
        say("interrupted: the running trial is queued again; rerun the same command to continue.")
        raise typer.Exit(130)
    typer.echo(json.dumps(_summary(opened, url, ran), sort_keys=True, default=str))
    if ran["FAIL"] and not ran["COMPLETE"] and not ran["PRUNED"]:
        raise typer.Exit(1)
