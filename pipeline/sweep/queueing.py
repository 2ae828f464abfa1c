"""A study in its storage: samplers and pruners, creating or joining a study (fingerprint check,
the grid queued once), worker liveness and heartbeats, dead trials recovered, missing grid
points queued again under a one-time mark, WAITING trials claimed by compare-and-set (see
:mod:`pipeline.sweep.cli` for how workers use them)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from fss.errors import ConfigError
from pipeline.sweep.storage import take_mark
from pipeline.sweep.study import StudySpec, first_difference, point_key

GRID_READY = "fss_grid_enqueued"
FINGERPRINT = "fss_fingerprint"
STUDY_INFO = "fss_study"
LEGACY_LOCK = ".requeue-"  # helper studies of storages written before the marks (hidden from listings)

Say = Callable[[str], None]


def quiet(message: str) -> None:
    pass


# ---------------------------------------------------------------- samplers and pruners


def make_sampler(spec: StudySpec):
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
               setup_timeout: float = 60.0, say: Say = quiet, restart_on_change: bool = False):
    """Create or load the study; refuse a changed study file or params (``restart_on_change``:
    delete that study and its trial runs and start afresh instead); queue a new grid."""
    name = name or spec.name
    try:
        return _open_study(spec, storage, storage_url, name, setup_timeout=setup_timeout, say=say)
    except StudyChanged as changed:
        if not restart_on_change:
            raise ConfigError(str(changed)) from None
        say(f"{changed.reason}: deleting it and its trial runs in {spec.output}, starting afresh.")
        optuna.delete_study(study_name=name, storage=storage)
        for old in sorted(Path(spec.output).glob("trial-*")):
            shutil.rmtree(old)
        return _open_study(spec, storage, storage_url, name, setup_timeout=setup_timeout, say=say)


class StudyChanged(Exception):
    """The stored study was created from another study file or params file."""

    def __init__(self, reason: str, advice: str):
        super().__init__(f"{reason}; {advice}")
        self.reason = reason


def _open_study(spec: StudySpec, storage, storage_url: str, name: str, *, setup_timeout: float, say: Say):
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
        diff = first_difference(attrs.get("fss_study_file"), json.loads(json.dumps(spec.fingerprint_source(), default=str)))
        raise StudyChanged(
            f"study '{name}' in {storage_url} was created from a different version of {spec.path} or of "
            f"its params file (first difference: {diff})",
            "pass a new --study name or storage instead of mixing them, or --restart-on-change to start afresh")
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
    """Take the one-time mark ``reason`` of study ``name`` (True for exactly one caller of
    several workers asking at once; see :func:`pipeline.sweep.storage.take_mark`)."""
    return take_mark(storage, name, reason)


# ---------------------------------------------------------------- worker liveness


def pid_token(pid: int) -> str | None:
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
    now = pid_token(pid)
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


def recover_dead_trials(study, storage, spec: StudySpec, grace: float, say: Say = quiet) -> list[int]:
    """Set the RUNNING trials of dead workers to FAIL (one worker wins each) and queue them again."""
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
    covered = {_trial_key(t) for t in study.get_trials(deepcopy=False) if t.state in (
        TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)}
    return [p for p in spec.grid() if point_key(p) not in covered]


def requeue_missing(study, storage, spec: StudySpec, name: str, reason: str = "", say: Say = quiet) -> int:
    """Queue the grid points that have no COMPLETE, WAITING or RUNNING trial, once.

    The lock is keyed by the failed trials that made the points missing, so workers that
    look at the same state agree on one of them doing it."""
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
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if storage.set_trial_state_values(t._trial_id, TrialState.RUNNING):
                return optuna.trial.Trial(study, t._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def duplicate_of(study, trial, key: str) -> int | None:
    """An earlier trial of the same grid point that is complete or running (last guard)."""
    for t in study.get_trials(deepcopy=False):
        if t.number == trial.number or _trial_key(t) != key:
            continue
        if t.state == TrialState.COMPLETE or (t.state == TrialState.RUNNING and t.number < trial.number):
            return t.number
    return None




def counts(study) -> dict[str, int]:
    """Trials of the study per state."""
    c = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    return {k: c.get(k, 0) for k in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}

