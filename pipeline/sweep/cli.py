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
  are missing later (failed trials) are queued again under a one-time mark derived from the
  failures (stored beside the studies, see :mod:`pipeline.sweep.storage`), so two workers
  never queue the same point twice; a WAITING
  trial is claimed with a compare-and-set of its state, so no two workers run it;
* the study file's fingerprint is a study attribute: a changed file under the same study
  name is refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

import optuna
import torch
import typer
import yaml

from fss.errors import ConfigError
from pipeline.console import console
from pipeline.runs import atomic_write_text
from pipeline.sweep.queueing import LEGACY_LOCK, STUDY_INFO, Say, counts, open_study
from pipeline.sweep.report import write_report
from pipeline.sweep.run import TrialStopped, _trial_tracker, run_point, work
from pipeline.sweep.storage import (
    DEFAULT_JOURNAL,
    DEFAULT_SQLITE,
    default_storage,
    is_sqlite,
    normalize_storage,
    open_storage,
)
from pipeline.sweep.study import load_study, point_slug
from pipeline.sweep.wandb_file import parse_assignments, wandb_sweep

app = typer.Typer(help="Sweeps: grids that rebuild the papers' ablation tables, samplers that tune.",
                  no_args_is_help=True)


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
    return lambda m: console.print(m, highlight=False, markup=False, soft_wrap=True)


def _spawn_workers(spec_path: Path, name: str, storage_url: str, workers: int, n_trials: Optional[int],
                   grace: float, heartbeat: float, say: Say, wandb: Optional[bool] = None) -> int:
    """Start ``workers`` processes on one storage (one GPU each when several are visible)."""
    try:
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
        if wandb is not None:
            cmd += ["--wandb" if wandb else "--no-wandb"]
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
    say = _say_console()
    spec = load_study(study_file)
    name = study or spec.name
    url = normalize_storage(storage) if storage else default_storage(spec.output, workers)
    if workers > 1 and is_sqlite(url):
        raise ConfigError(f"--storage {url} is SQLite, which serves one worker; give a journal file (.log) or a "
                          f"PostgreSQL/MySQL URL for --workers {workers}.")
    store = open_storage(url, create_dirs=storage is None)
    opened = open_study(spec, store, url, name, say=say, restart_on_change=restart_on_change)
    if workers > 1:
        code = _spawn_workers(study_file, name, url, workers, n_trials, grace, heartbeat, say, wandb)
        typer.echo(json.dumps(_summary(opened, url), sort_keys=True, default=str))
        if code:
            raise typer.Exit(code if code > 0 else 1)
        return
    try:
        ran = work(opened, store, spec, n_trials=n_trials, grace=grace, heartbeat=heartbeat, say=say, wandb=wandb)
    except TrialStopped:
        say("interrupted: the running trial is queued again; rerun the same command to continue.")
        raise typer.Exit(130)
    typer.echo(json.dumps(_summary(opened, url, ran), sort_keys=True, default=str))
    if ran["FAIL"] and not ran["COMPLETE"] and not ran["PRUNED"]:
        raise typer.Exit(1)


def _open_for_report(name: str, storage: Optional[str]):
    """(study, url, info) of an existing study; NAME may be the study file."""
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
        names = [s for s in optuna.get_all_study_names(store) if LEGACY_LOCK not in s]
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
    study, url, info = _open_for_report(name, storage)
    files = write_report(study, info, out)
    typer.echo(json.dumps({"study": study.study_name, "storage": url, "files": [str(f) for f in files]}, sort_keys=True))


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


@app.command("wandb")
def wandb_command(
    study_file: Path = typer.Argument(..., help="Study file (sweeps/*.yaml)."),
    out: Optional[Path] = typer.Option(None, help="Write the W&B sweep file here (default: print it)."),
) -> None:
    """The W&B sweep file of a study (`wandb sweep FILE`, then `wandb agent ID`)."""
    spec = load_study(study_file, check_configs=False)
    text = (f"# W&B sweep of {study_file} (generated by 'fss sweep wandb'; Optuna runs the same study offline)\n"
            + yaml.safe_dump(wandb_sweep(spec, str(study_file)), sort_keys=False, default_flow_style=None))
    if out is None:
        typer.echo(text, nl=False)
    else:
        atomic_write_text(out, text)
