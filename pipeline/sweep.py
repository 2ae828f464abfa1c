"""`fss sweep`: the papers' ablation tables as Optuna studies (grids) and tuning studies.

::

    fss sweep run sweeps/apanet_lambda.yaml                       # one worker, SQLite
    fss sweep run sweeps/apanet_lambda.yaml --workers 2           # 2 processes, journal file
    fss sweep run sweeps/X.yaml --storage postgresql://u:p@db/fss # one worker per machine
    fss sweep report apanet_lambda --out results/sweeps/apanet_lambda
    fss sweep trial sweeps/X.yaml knobs.lam=0.5                   # one point (W&B agents)
    fss sweep wandb sweeps/X.yaml                                  # the W&B sweep file

Each trial trains one run per (fold, shot) of the study (``fss train`` code path, its own
run directory under the study's ``output``) and scores the selected weights on
*validation* episodes (``validation.seed``, never a test seed), written as the project's
evaluation JSON and read back; the objective is the mean mIoU. Test-time-only knobs are
re-evaluated on the study's ``checkpoint`` without training.

Resume and several workers:

* every trial records its worker (host, pid and the process start time) and a heartbeat;
  a RUNNING trial whose process is gone (same host) or whose heartbeat is older than
  ``--grace`` seconds is set to FAIL by exactly one worker (a state change the storage
  serialises) and its point is queued again, inheriting its run directory so training
  resumes from the checkpoint;
* a grid is queued once when the study is created (the creator is unique); points that
  are missing later (failed trials) are queued again under a lock study whose name is
  derived from the failures, so two workers never queue the same point twice; a WAITING
  trial is claimed with a compare-and-set of its state, so no two workers run it;
* the study file's fingerprint is a study attribute: a changed file under the same study
  name is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import typer

from fss.errors import CheckpointError, ConfigError, DataError
from pipeline.sweep_study import (
    StudySpec,
    load_study,
    point_key,
    point_slug,
    resolve_trial_config,
)

app = typer.Typer(help="Sweeps: grids that rebuild the papers' ablation tables, samplers that tune.",
                  no_args_is_help=True)

GRID_READY = "fss_grid_enqueued"
FINGERPRINT = "fss_fingerprint"
STUDY_INFO = "fss_study"
LOCK_MARK = ".requeue-"
EVAL_KIND = "fss-evaluation"

Say = Callable[[str], None]


def _quiet(message: str) -> None:
    pass


# ---------------------------------------------------------------- samplers and pruners


def make_sampler(spec: StudySpec):
    import optuna

    opts = {k: v for k, v in spec.sampler.items() if k != "name"}
    name = spec.sampler.get("name", "grid")
    try:
        if spec.mode == "grid" or name == "random":
            return optuna.samplers.RandomSampler(seed=opts.get("seed"))  # grid points are all queued
        if name == "tpe":
            return optuna.samplers.TPESampler(**opts)
        if name == "cmaes":
            return optuna.samplers.CmaEsSampler(**opts)
        return optuna.samplers.QMCSampler(**opts)
    except TypeError as exc:
        raise ConfigError(f"study file {spec.path}: sampler options {opts} are not accepted by {name} ({exc}).") from None


def make_pruner(spec: StudySpec):
    import optuna

    opts = {k: v for k, v in spec.pruner.items() if k != "name"}
    name = spec.pruner.get("name", "none")
    try:
        if name == "median":
            return optuna.pruners.MedianPruner(**opts)
        if name == "hyperband":
            return optuna.pruners.HyperbandPruner(**opts)
        return optuna.pruners.NopPruner()
    except TypeError as exc:
        raise ConfigError(f"study file {spec.path}: pruner options {opts} are not accepted by {name} ({exc}).") from None


# ---------------------------------------------------------------- opening a study


def study_info(spec: StudySpec) -> dict:
    """What the report needs, stored with the study (so it works from the storage alone)."""
    params = []
    for p in spec.params:
        entry: dict[str, Any] = {"name": p.name, "kind": p.kind}
        if p.is_grid_axis or p.kind == "choices":
            entry["values"] = p.grid_values()
        else:
            entry.update(low=p.low, high=p.high, log=p.log)
        params.append(entry)
    return {"name": spec.name, "title": spec.title, "method": spec.method, "dataset": spec.dataset,
            "folds": list(spec.folds), "shots": list(spec.shots), "mode": spec.mode, "params": params,
            "n_trials": spec.n_trials, "reference": dict(spec.reference), "file": str(spec.path),
            "test_time": spec.test_time}


def _wait_for_attr(study, key: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if key in study.user_attrs:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def open_study(spec: StudySpec, storage, storage_url: str, name: str | None = None, *,
               setup_timeout: float = 60.0, say: Say = _quiet):
    """Create or load the study; refuse a changed study file; queue a new grid."""
    import optuna

    name = name or spec.name
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own one-line messages instead
    sampler, pruner = make_sampler(spec), make_pruner(spec)
    try:
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                    direction="maximize", load_if_exists=False)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        created = False
    fingerprint = spec.fingerprint()
    if created:
        study.set_user_attr("fss_study_file", spec.fingerprint_source())
        study.set_user_attr(STUDY_INFO, study_info(spec))
        study.set_user_attr(FINGERPRINT, fingerprint)
    elif not _wait_for_attr(study, FINGERPRINT, setup_timeout):
        study.set_user_attr("fss_study_file", spec.fingerprint_source())
        study.set_user_attr(STUDY_INFO, study_info(spec))
        study.set_user_attr(FINGERPRINT, fingerprint)
    attrs = study.user_attrs
    if attrs.get(FINGERPRINT) != fingerprint:
        from pipeline.sweep_study import first_difference

        diff = first_difference(attrs.get("fss_study_file"), json.loads(json.dumps(spec.fingerprint_source(), default=str)))
        raise ConfigError(
            f"study '{name}' in {storage_url} was created from a different version of {spec.path} "
            f"(first difference: {diff}); pass a new --study name or storage instead of mixing them."
        )
    if spec.mode == "grid":
        if created:
            _lock(study, storage, name, "initial")
            for point in spec.grid():
                study.enqueue_trial(point, user_attrs={"fss_point": point_key(point)})
            study.set_user_attr(GRID_READY, True)
            say(f"study '{name}': queued {len(spec.grid())} grid points")
        elif not _wait_for_attr(study, GRID_READY, setup_timeout):
            requeue_missing(study, storage, spec, name, reason="initial-recovery", say=say)
            study.set_user_attr(GRID_READY, True)
    return study


def _lock(study, storage, name: str, reason: str) -> bool:
    """Take the one-time lock ``reason`` of study ``name`` (True for exactly one caller).

    A lock is an empty study named ``NAME.requeue-HASH``: creating a study name is atomic in
    every Optuna storage, so of several workers asking at once exactly one gets it."""
    import optuna

    lock = f"{name}{LOCK_MARK}{hashlib.sha256(reason.encode()).hexdigest()[:16]}"
    try:
        optuna.create_study(study_name=lock, storage=storage, load_if_exists=False)
        return True
    except optuna.exceptions.DuplicatedStudyError:
        return False


# ---------------------------------------------------------------- worker liveness


def _pid_token(pid: int) -> str | None:
    """The process start time (Linux /proc), so a reused pid is not taken for the dead one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, token: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _pid_token(pid)
    return token is None or now is None or now == token


def is_dead(trial, grace: float, now: float | None = None) -> bool:
    """A RUNNING trial whose worker is gone (same host: its process; else: its heartbeat)."""
    attrs = trial.user_attrs
    now = time.time() if now is None else now
    if attrs.get("fss_host") == socket.gethostname() and attrs.get("fss_pid") is not None:
        return not _alive(int(attrs["fss_pid"]), attrs.get("fss_pid_token"))
    last = attrs.get("fss_heartbeat")
    if last is None and trial.datetime_start is not None:
        last = trial.datetime_start.timestamp()
    return last is None or now - float(last) > grace


class Heartbeat:
    """Writes ``fss_heartbeat`` on a running trial every ``interval`` seconds."""

    def __init__(self, storage, trial_id: int, interval: float):
        self._storage, self._trial_id, self._interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def _beat(self):
        while not self._stop.wait(self._interval):
            try:
                self._storage.set_trial_user_attr(self._trial_id, "fss_heartbeat", time.time())
            except Exception:  # noqa: BLE001 - the trial finished meanwhile
                return

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        return False


# ---------------------------------------------------------------- recovery and queueing


def recover_dead_trials(study, storage, spec: StudySpec, grace: float, say: Say = _quiet) -> list[int]:
    """Set the RUNNING trials of dead workers to FAIL (one worker wins each) and queue them again."""
    import optuna
    from optuna.trial import TrialState

    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_dead(t, grace):
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "fss_dead_worker", True)
            ok = storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        if ok:
            failed.append(t)
            say(f"trial {t.number} ({t.user_attrs.get('fss_point') or t.params}) was left RUNNING by a dead worker: failed, queued again")
    if spec.mode == "grid":
        if failed:
            requeue_missing(study, storage, spec, study.study_name, say=say)
    else:
        for t in failed:
            params = t.system_attrs.get("fixed_params") or t.params
            study.enqueue_trial(params, user_attrs=_inherit(t))
    return [t.number for t in failed]


def _inherit(trial) -> dict:
    """User attributes a retry takes over: the point and, after a kill, the run directory."""
    out = {"fss_retry_of": trial.number}
    if "fss_point" in trial.user_attrs:
        out["fss_point"] = trial.user_attrs["fss_point"]
    if (trial.user_attrs.get("fss_dead_worker") or trial.user_attrs.get("fss_interrupted")) and \
            trial.user_attrs.get("fss_run_dir"):
        out["fss_run_dir"] = trial.user_attrs["fss_run_dir"]
    return out


def _trial_key(trial) -> str | None:
    if "fss_point" in trial.user_attrs:
        return trial.user_attrs["fss_point"]
    fixed = trial.system_attrs.get("fixed_params")
    return point_key(fixed) if fixed else (point_key(trial.params) if trial.params else None)


def _missing_points(study, spec: StudySpec) -> list[dict]:
    from optuna.trial import TrialState

    covered = {_trial_key(t) for t in study.get_trials(deepcopy=False) if t.state in (
        TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)}
    return [p for p in spec.grid() if point_key(p) not in covered]


def requeue_missing(study, storage, spec: StudySpec, name: str, reason: str = "", say: Say = _quiet) -> int:
    """Queue the grid points that have no COMPLETE, WAITING or RUNNING trial, once.

    The lock is keyed by the failed trials that made the points missing, so workers that
    look at the same state agree on one of them doing it."""
    from optuna.trial import TrialState

    missing = _missing_points(study, spec)
    if not missing:
        return 0
    trials = study.get_trials(deepcopy=False)
    failed = sorted(t.number for t in trials if t.state == TrialState.FAIL)
    if not _lock(study, storage, name, f"{reason}:{failed}"):
        return 0
    by_key: dict[str, Any] = {}
    for t in trials:
        if t.state == TrialState.FAIL:
            by_key[_trial_key(t)] = t  # the latest failure of each point
    for point in missing:
        key = point_key(point)
        attrs = _inherit(by_key[key]) if key in by_key else {"fss_point": key}
        attrs["fss_point"] = key
        study.enqueue_trial(point, user_attrs=attrs)
    say(f"queued {len(missing)} grid point(s) again")
    return len(missing)


def claim_waiting(study, storage):
    """A WAITING trial this worker now owns (compare-and-set WAITING -> RUNNING), or None."""
    import optuna
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                return optuna.trial.Trial(study, t._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def _duplicate_of(study, trial, key: str) -> int | None:
    """An earlier trial of the same grid point that is complete or running (last guard)."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False):
        if t.number == trial.number or _trial_key(t) != key:
            continue
        if t.state == TrialState.COMPLETE or (t.state == TrialState.RUNNING and t.number < trial.number):
            return t.number
    return None


# ---------------------------------------------------------------- one trial


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


def _test_seeds(config) -> set[int]:
    from pipeline.evaluate import make_protocol

    proto = make_protocol(config.test.protocol, config.dataset, episodes=config.test.episodes,
                          size=config.test.size, runs=config.test.runs)
    return set(proto.seeds)


def evaluate_on_validation(config, model_path: Path, shot: int, out: Path, knob_overrides: Mapping[str, Any] | None = None,
                           tracking_off: bool = True) -> float:
    """Score a model file on the run's validation episodes; writes the evaluation JSON
    (``split: val``) and returns the mIoU read back from it."""
    from fss.models.checkpoints import MODEL_FILE_FORMAT, load_strict, safe_torch_load
    from fss.models.registry import create_model
    from pipeline.config import resolve_device
    from pipeline.evaluate import evaluate_model, validation_protocol
    from pipeline.runs import read_json, write_json
    from pipeline.train import open_split

    protocol = validation_protocol(config)
    overlap = set(protocol.seeds) & _test_seeds(config)
    if overlap:
        raise ConfigError(
            f"validation.seed {config.validation.seed} gives the episode seeds {sorted(overlap)} of the test protocol "
            f"{config.test.protocol}; choose another validation.seed so the test numbers are not tuned on."
        )
    blob = safe_torch_load(model_path)
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FILE_FORMAT:
        raise CheckpointError(f"{model_path} is not a model file of this project; pass a run directory or an "
                              f"'fss checkpoint import' output as the study's checkpoint.")
    if blob.get("method") != config.method:
        raise CheckpointError(f"{model_path} holds a {blob.get('method')} model, the study sweeps {config.method}; "
                              f"fix the study's checkpoint path.")
    knobs = {**dict(blob.get("knobs", {})), **dict(knob_overrides or {})}
    model = create_model(blob["method"], backbone=blob["backbone"], shot=int(shot), **knobs)
    load_strict(model, blob["state_dict"], str(model_path))
    device = resolve_device(config.train.device)
    data = open_split(config, "val")
    start = time.monotonic()
    result = evaluate_model(model.to(device), data, protocol, shot=int(shot), device=device,
                            batch_size=config.test.batch_size, num_workers=config.data.num_workers,
                            precision=config.train.precision)
    report = {
        "kind": EVAL_KIND, "version": 1, "split": "val", "method": blob["method"], "dataset": config.dataset,
        "backbone": blob["backbone"], "fold": config.fold, "shot": int(shot), "train_shot": blob.get("shot"),
        "knobs": knobs, "miou": result["miou"], "fb_iou": result["fb_iou"],
        "class_iou": {str(k): v for k, v in result.get("class_iou", {}).items()},
        "episodes": result["episodes"], "protocol": protocol.name, "protocol_options": protocol.describe(),
        "checkpoint": str(model_path), "data_root": str(data.root), "device": str(device),
        "seconds": round(time.monotonic() - start, 3),
    }
    write_json(out, report)
    return float(read_json(out, "evaluation")["miou"])


def _tracking_off(config):
    return dataclasses.replace(config, tracking=dataclasses.replace(config.tracking, wandb=False))


def run_point(spec: StudySpec, point: Mapping[str, Any], trial_dir: Path, *,
              report: Callable[[int, float], None] | None = None, say: Say = _quiet) -> dict:
    """Train (or re-evaluate) every (fold, shot) of one point; returns the scores and objective.

    ``report(step, miou)`` gets the validation checks during training (step = count of
    checks so far in this trial), for pruning and W&B."""
    from pipeline import runs as R
    from pipeline.train import train_run

    scores: dict[str, dict[str, float]] = {}
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

                summary = train_run(_tracking_off(config), run_dir, on_validation=on_validation,
                                    say=lambda m: None if "\n" in m else say("  " + m))
                if summary.get("status") == "stopped":
                    raise TrialStopped(f"training of {run_dir} was interrupted")
                model_path = run_dir / R.MODEL_SELECTED
                out = run_dir / "val.json"
            miou = evaluate_on_validation(_tracking_off(config), model_path, shot, out, knob_overrides=test_time_knobs)
            scores.setdefault(str(shot), {})[str(fold)] = miou
            say(f"  {tag}: validation mIoU {100 * miou:.2f}")
    values = [v for per_shot in scores.values() for v in per_shot.values()]
    return {"scores": scores, "objective": sum(values) / len(values)}


def _trial_tracker(spec: StudySpec, point: Mapping[str, Any], name: str, say: Say, *, force: bool | None = None):
    from pipeline.tracking import Tracker

    config = resolve_trial_config(spec, point, spec.folds[0], spec.shots[0])
    enabled = config.tracking.wandb if force is None else force
    return Tracker(
        enabled=enabled, project=config.tracking.project, entity=config.tracking.entity, group=spec.name,
        job_type="sweep-trial", name=name, init_timeout=config.tracking.init_timeout, warn=say,
        config={"study": spec.name, "method": spec.method, "dataset": spec.dataset, "folds": list(spec.folds),
                "shots": list(spec.shots), **{k: v for k, v in point.items()}},
    )


def execute_trial(study, storage, trial, spec: StudySpec, *, heartbeat: float, say: Say) -> str:
    """Run one claimed trial to its end state; returns COMPLETE / PRUNED / FAIL / DUPLICATE."""
    import optuna
    from optuna.trial import TrialState

    frozen = storage.get_trial(trial._trial_id)
    set_attr = lambda k, v: storage.set_trial_user_attr(trial._trial_id, k, v)  # noqa: E731
    set_attr("fss_host", socket.gethostname())
    set_attr("fss_pid", os.getpid())
    set_attr("fss_pid_token", _pid_token(os.getpid()))
    set_attr("fss_heartbeat", time.time())
    point = suggest(trial, spec)
    key = point_key(point)
    if "fss_point" not in frozen.user_attrs:
        set_attr("fss_point", key)
    if spec.mode == "grid":
        dup = _duplicate_of(study, trial, key)
        if dup is not None:
            set_attr("fss_duplicate_of", dup)
            study.tell(trial, state=TrialState.FAIL)
            say(f"trial {trial.number}: point {key} is already done or running (trial {dup}); skipped")
            return "DUPLICATE"
    run_dir = frozen.user_attrs.get("fss_run_dir") or str(spec.output / f"trial-{trial.number:04d}-{point_slug(point)}")
    set_attr("fss_run_dir", run_dir)
    say(f"trial {trial.number}: {key} -> {run_dir}")
    tracker = _trial_tracker(spec, point, f"trial-{trial.number}", say)

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
        study.tell(trial, result["objective"])
    tracker.log({"objective": result["objective"],
                 **{f"miou/{s}shot/fold{f}": v for s, d in result["scores"].items() for f, v in d.items()}})
    tracker.summary({"objective": result["objective"]})
    tracker.finish()
    say(f"trial {trial.number}: objective (mean validation mIoU) {100 * result['objective']:.2f}")
    return "COMPLETE"


# ---------------------------------------------------------------- the worker loop


def counts(study) -> dict[str, int]:
    from collections import Counter

    c = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    return {k: c.get(k, 0) for k in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}


def work(study, storage, spec: StudySpec, *, n_trials: int | None = None, grace: float = 600.0,
         heartbeat: float = 30.0, say: Say = _quiet) -> dict:
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
        ran[execute_trial(study, storage, trial, spec, heartbeat=heartbeat, say=say)] += 1
    return ran


def _summary(study, storage_url: str, ran: Mapping[str, int] | None = None) -> dict:
    c = counts(study)
    out: dict[str, Any] = {"study": study.study_name, "storage": storage_url, "trials": c}
    if ran is not None:
        out["ran_now"] = dict(ran)
    if c["COMPLETE"]:
        best = study.best_trial
        out.update(best_value=best.value, best_params=best.params, best_trial=best.number)
    return out


def _say_console() -> Say:
    from pipeline.console import console

    return lambda m: console.print(m, highlight=False, markup=False, soft_wrap=True)


def _spawn_workers(spec_path: Path, name: str, storage_url: str, workers: int, n_trials: Optional[int],
                   grace: float, heartbeat: float, say: Say) -> int:
    """Start ``workers`` processes on one storage (one GPU each when several are visible)."""
    try:
        import torch

        gpus = torch.cuda.device_count() if "CUDA_VISIBLE_DEVICES" not in os.environ else 0
    except Exception:  # noqa: BLE001
        gpus = 0
    procs = []
    for i in range(workers):
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
        if gpus > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        cmd = [sys.executable, "-c", "from pipeline.cli import main; main()", "sweep", "run", str(spec_path),
               "--study", name, "--storage", storage_url, "--workers", "1", "--grace", str(grace),
               "--heartbeat", str(heartbeat)]
        if n_trials is not None:
            cmd += ["--n-trials", str(n_trials)]
        procs.append(subprocess.Popen(cmd, env=env))
        say(f"worker {i + 1}/{workers} started (pid {procs[-1].pid})")
    codes = []
    try:
        for p in procs:
            codes.append(p.wait())
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        raise
    return max(codes, key=abs) if any(codes) else 0


@app.command("run")
def run_command(
    study_file: Path = typer.Argument(..., help="Study file (sweeps/*.yaml)."),
    study: Optional[str] = typer.Option(None, "--study", help="Study name (default: the file's 'study' key or stem)."),
    storage: Optional[str] = typer.Option(None, help="sqlite:///x.db, x.log (journal file), postgresql://..., mysql://... "
                                                      "(default: OUTPUT/study.db, or OUTPUT/journal.log with --workers > 1)."),
    n_trials: Optional[int] = typer.Option(None, "--n-trials", help="Tuning: the total trial budget (default: the file's "
                                                                    "n_trials). Grid: at most N trials in this run."),
    workers: int = typer.Option(1, help="Worker processes on this machine (several need a journal file or a server)."),
    grace: float = typer.Option(600.0, help="Seconds without heartbeat after which another machine's RUNNING trial is dead."),
    heartbeat: float = typer.Option(30.0, help="Seconds between heartbeats of a running trial."),
) -> None:
    """Run (or continue) a study: every grid point once, or a sampler up to its budget."""
    from pipeline.sweep_storage import default_storage, is_sqlite, normalize_storage, open_storage

    if workers < 1:
        raise ConfigError(f"--workers {workers} must be at least 1.")
    if n_trials is not None and n_trials < 1:
        raise ConfigError(f"--n-trials {n_trials} must be at least 1.")
    say = _say_console()
    spec = load_study(study_file)
    name = study or spec.name
    url = normalize_storage(storage) if storage else default_storage(spec.output, workers)
    if workers > 1 and is_sqlite(url):
        raise ConfigError(f"--storage {url} is SQLite, which serves one worker; give a journal file (.log) or a "
                          f"PostgreSQL/MySQL URL for --workers {workers}.")
    store = open_storage(url, create_dirs=storage is None)
    opened = open_study(spec, store, url, name, say=say)
    if workers > 1:
        code = _spawn_workers(study_file, name, url, workers, n_trials, grace, heartbeat, say)
        typer.echo(json.dumps(_summary(opened, url), sort_keys=True, default=str))
        if code:
            raise typer.Exit(code if code > 0 else 1)
        return
    try:
        ran = work(opened, store, spec, n_trials=n_trials, grace=grace, heartbeat=heartbeat, say=say)
    except TrialStopped:
        say("interrupted: the running trial is queued again; rerun the same command to continue.")
        raise typer.Exit(130)
    typer.echo(json.dumps(_summary(opened, url, ran), sort_keys=True, default=str))
    if ran["FAIL"] and not ran["COMPLETE"] and not ran["PRUNED"]:
        raise typer.Exit(1)


def _open_for_report(name: str, storage: Optional[str]):
    """(study, url, info) of an existing study; NAME may be the study file."""
    import optuna

    from pipeline.sweep_storage import DEFAULT_JOURNAL, DEFAULT_SQLITE, normalize_storage, open_storage

    output = Path("runs/sweeps") / name
    if name.endswith((".yaml", ".yml")):
        spec = load_study(name, check_configs=False)
        name, output = spec.name, spec.output
    if storage:
        url = normalize_storage(storage)
    else:
        candidates = [output / DEFAULT_JOURNAL, output / DEFAULT_SQLITE]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise ConfigError(f"no storage of study '{name}' in {output}; pass --storage URL (where 'fss sweep run' wrote it).")
        url = normalize_storage(str(found))
    store = open_storage(url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=name, storage=store)
    except KeyError:
        names = [s for s in optuna.get_all_study_names(store) if LOCK_MARK not in s]
        raise ConfigError(f"storage {url} has no study '{name}'; its studies: {', '.join(names) or '(none)'}.") from None
    info = study.user_attrs.get(STUDY_INFO)
    if not info:
        raise ConfigError(f"study '{name}' in {url} was not created by 'fss sweep run'; nothing to report.")
    return study, url, info


@app.command("report")
def report_command(
    name: str = typer.Argument(..., help="Study name (or its study file)."),
    storage: Optional[str] = typer.Option(None, help="Storage URL (default: the study's output directory)."),
    out: Path = typer.Option(..., help="Directory for the table (CSV, LaTeX, Markdown), plots and trials CSV."),
) -> None:
    """The ablation table in the paper's layout, importance and slice plots, the trials CSV."""
    from pipeline.sweep_report import write_report

    study, url, info = _open_for_report(name, storage)
    files = write_report(study, info, out)
    typer.echo(json.dumps({"study": study.study_name, "storage": url, "files": [str(f) for f in files]}, sort_keys=True))


def parse_assignments(spec: StudySpec, items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` (or W&B's ``--KEY=VALUE``) for every swept parameter, checked against the space."""
    from pipeline.config import parse_set_values

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


@app.command("trial")
def trial_command(
    study_file: Path = typer.Argument(..., help="Study file (sweeps/*.yaml)."),
    assignments: Optional[list[str]] = typer.Argument(None, help="KEY=VALUE for every swept parameter (W&B: ${args_no_hyphens})."),
    out: Optional[Path] = typer.Option(None, help="Trial directory (default OUTPUT/points/<point>)."),
    wandb: bool = typer.Option(True, "--wandb/--no-wandb", help="Log the trial as a W&B run grouped by study (a W&B agent's run)."),
) -> None:
    """Run ONE point of a study outside Optuna (what a W&B sweep agent calls); prints the objective."""
    say = _say_console()
    spec = load_study(study_file)
    point = parse_assignments(spec, assignments or [])
    trial_dir = out or spec.output / "points" / point_slug(point)
    tracker = _trial_tracker(spec, point, point_slug(point), say, force=wandb)
    try:
        result = run_point(spec, point, trial_dir, report=lambda step, miou: tracker.log({"val/miou": miou}, step=step), say=say)
    except TrialStopped:
        tracker.finish(exit_code=1)
        say("interrupted; rerun the same command to resume the point.")
        raise typer.Exit(130)
    tracker.log({"objective": result["objective"],
                 **{f"miou/{s}shot/fold{f}": v for s, d in result["scores"].items() for f, v in d.items()}})
    tracker.summary({"objective": result["objective"]})
    tracker.finish()
    typer.echo(json.dumps({"study": spec.name, "point": point, "run_dir": str(trial_dir), **result}, sort_keys=True))


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
        config["early_terminate"] = {"type": "hyperband", "min_iter": int(spec.pruner.get("min_resource", 1) or 1)}
    return config


@app.command("wandb")
def wandb_command(
    study_file: Path = typer.Argument(..., help="Study file (sweeps/*.yaml)."),
    out: Optional[Path] = typer.Option(None, help="Write the W&B sweep file here (default: print it)."),
) -> None:
    """The W&B sweep file of a study (`wandb sweep FILE`, then `wandb agent ID`)."""
    import yaml

    spec = load_study(study_file, check_configs=False)
    text = (f"# W&B sweep of {study_file} (generated by 'fss sweep wandb'; Optuna runs the same study offline)\n"
            + yaml.safe_dump(wandb_sweep(spec, str(study_file)), sort_keys=False, default_flow_style=None))
    if out is None:
        typer.echo(text, nl=False)
    else:
        from pipeline.runs import atomic_write_text

        atomic_write_text(out, text)
