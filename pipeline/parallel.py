"""Run one `fss` command per fold (or per sweep worker) at once: on this machine's device slots,
or as cluster jobs through submitit.

**Local** (``engine: local``): one child process per slot. A slot is a GPU
(``CUDA_VISIBLE_DEVICES`` set to its index) or, on the CPU, a share of the cores
(``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` set to cores / slots, which torch's default thread count
follows; a config's ``train.num_threads`` still wins; ``FSS_CPU_SHARE`` for the loading
workers). ``slots: auto`` is the number of visible GPUs, or on the CPU the usable cores over the
threads each fold asks for, never more than the folds. Each child runs its share of the folds
one after another (``--slots 1``; with one slot that happens in this process), each fold with its
own run folder, resume and log lines prefixed ``[fold k]``; a fold's arithmetic does not depend
on the slot, so the weights equal a serial run's (tested). When one fold fails the others run to
their end; the command then fails with one line naming the failed folds. SIGINT/SIGTERM are passed to every child, which checkpoints
and stops; a SIGKILL of this process reaches the children as SIGTERM (``PR_SET_PDEATHSIG``), so
they checkpoint too, and nothing is left running.

**Cluster** (``engine: submitit``): each command is a submitit job (``AutoExecutor``: SLURM where
``sbatch`` exists, else submitit's local executor), with the resources of params ``cluster``.
This process waits for the jobs and cancels them when it is interrupted. We schedule nothing
ourselves.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import submitit
import torch
import typer

from fss.errors import ConfigError, FSSError
from pipeline.config import CPU_SHARE_ENV, load_params, usable_cores
from pipeline.config_params import CLUSTER_DEFAULTS, resolve_params_section
from pipeline.console import LOG_PREFIX_ENV, set_line_prefix

Say = Callable[[str], None]
T = TypeVar("T")
ENGINES = ("local", "submitit")


@dataclass(frozen=True)
class Job:
    """One `fss` command (a share of the folds, or a sweep worker) and the name its messages carry."""

    name: str
    argv: list[str]


#: the directory holding this process's `pipeline` package: children import the same code
CODE_ROOT = str(Path(__file__).resolve().parent.parent)


def fss_argv(*args: str) -> list[str]:
    """The `fss` command line run by this interpreter (also where `fss` is not on PATH). ``-P``:
    the working directory is not put first on the module path, so a checkout there cannot
    shadow the code this process runs (local children also get CODE_ROOT first on PYTHONPATH)."""
    return [sys.executable, "-P", "-m", "pipeline.cli", *args]


def _pythonpath() -> str:
    return os.pathsep.join(p for p in (CODE_ROOT, os.environ.get("PYTHONPATH", "")) if p)


def visible_gpus() -> list[str]:
    """GPU ids this process may hand out: CUDA_VISIBLE_DEVICES's entries, or every CUDA device."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def uses_gpu(device: str | None) -> bool:
    if device == "cuda":
        return True
    return device in (None, "auto") and bool(visible_gpus())


def parse_slots(value: str | int) -> int | None:
    """``auto`` -> None; a positive integer -> itself."""
    if str(value).strip().lower() == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--slots {value!r} must be auto or a positive integer.")
    return n


def slot_envs(slots: str | int, jobs: int, device: str | None, threads_per_job: int = 0) -> list[dict[str, str]]:
    """The environment of each slot: a GPU each on CUDA, a share of the cores on the CPU.

    ``threads_per_job`` is the torch threads a command pins (``train.num_threads``; 0: torch's
    default, which then follows the slot's share)."""
    asked, cores = parse_slots(slots), usable_cores()
    if uses_gpu(device):
        gpus = visible_gpus() or ["0"]
        n = min(jobs, asked or len(gpus))
        share = str(max(1, cores // n))  # the fold's loading workers (data.num_workers: auto) follow it
        return [{"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)], CPU_SHARE_ENV: share} for i in range(n)]
    n = max(1, min(jobs, asked or cores // max(1, threads_per_job)))
    share = str(threads_per_job or max(1, cores // n))
    return [{"OMP_NUM_THREADS": share, "MKL_NUM_THREADS": share, "CUDA_VISIBLE_DEVICES": "", CPU_SHARE_ENV: share}
            for _ in range(n)]


def runner_settings(params: Path | None, slots: str | None, engine: str | None) -> tuple[str, str, dict]:
    """(slots, engine, cluster resources): the given values, else params ``benchmark.slots`` (auto),
    ``benchmark.engine`` (local) and section ``cluster``. Read by the commands, not written into
    the graph's stage commands, so changing them reruns no DVC stage."""
    values, _ = load_params(params)
    bench = values.get("benchmark") or {}
    slots = str(bench.get("slots", "auto")) if slots is None else str(slots)
    engine = str(bench.get("engine", "local")) if engine is None else engine
    if engine not in ENGINES:
        raise ConfigError(f"--engine {engine!r} is not known; choose one of: {', '.join(ENGINES)}.")
    return slots, engine, resolve_params_section(values, "cluster", CLUSTER_DEFAULTS)


def run_folds(items: Sequence[T], *, name: Callable[[T], str], command: Callable[[list[T]], list[str]],
              run_one: Callable[[T], None], what: str, device: str | None, threads: int, params: Path | None,
              slots: str | None, engine: str | None, say: Say) -> None:
    """Run ``items`` (folds, or the runs of folds): with one slot one after another in this process
    (``run_one``); with several, one `fss` child per slot taking its share (``command(share)``, a
    command that runs them one after another, ``--slots 1``); with submitit one job per item."""
    slots, engine, cluster = runner_settings(params, slots, engine)
    if engine == "submitit":
        jobs = [Job(name(item), fss_argv(*command([item]))) for item in items]
        say(f"{what}: one submitit job each for {len(jobs)} folds")
        return run_jobs(jobs, engine=engine, slots=[], say=say, cluster=cluster)
    envs = slot_envs(slots, len(items), device, threads)
    if len(envs) == 1:
        return run_here(items, name=name, run_one=run_one, say=say)
    shares = [list(items[i::len(envs)]) for i in range(len(envs))]
    jobs = [Job(", ".join(name(item) for item in share), fss_argv(*command(share))) for share in shares]
    say(f"{what}: {len(items)} folds on {len(envs)} slots of this machine")
    run_jobs(jobs, engine="local", slots=envs, say=say)


def run_here(items: Sequence[T], *, name: Callable[[T], str], run_one: Callable[[T], None], say: Say) -> None:
    """``run_one`` for each item in turn; a failed one lets the others run, then one line names it."""
    failed: list[tuple[str, int]] = []
    for item in items:
        set_line_prefix(f"[{name(item)}] ")
        try:
            run_one(item)
        except typer.Exit as exc:
            if exc.exit_code == 130:  # interrupted: checkpointed, the rest is left for the rerun
                raise KeyboardInterrupt from None
            if exc.exit_code:
                failed.append((name(item), exc.exit_code))
        except FSSError as exc:
            say(f"error: {exc}")
            failed.append((name(item), 2))
        except Exception:  # noqa: BLE001  (the other folds still run; the traceback is printed)
            traceback.print_exc()
            failed.append((name(item), 1))
    set_line_prefix(None)
    _raise_failed(failed, len(items))


def run_jobs(jobs: Sequence[Job], *, engine: str, slots: Sequence[Mapping[str, str]], say: Say,
             cluster: Mapping[str, Any] | None = None) -> None:
    """Run ``jobs`` with ``engine``; raises one :class:`FSSError` line naming any that failed."""
    if engine == "local":
        failed, interrupted = run_local(jobs, slots, say)
    else:
        failed, interrupted = run_submitit(jobs, {**CLUSTER_DEFAULTS, **(cluster or {})}, say)
    if interrupted:
        raise KeyboardInterrupt
    order = {id(j): i for i, j in enumerate(jobs)}
    _raise_failed([(j.name, code) for j, code in sorted(failed, key=lambda f: order[id(f[0])])], len(jobs))


def _raise_failed(failed: Sequence[tuple[str, int]], total: int) -> None:
    """One line naming each failed fold (or worker) and its exit code, in order."""
    if failed:
        names = ", ".join(f"{name} (exit code {code})" for name, code in failed)
        others = "the others ran to their end; " if len(failed) < total else ""
        raise FSSError(f"{names} failed (output above); {others}rerun the same command to resume "
                       f"{'it' if len(failed) == 1 else 'them'}.")


# ---------------------------------------------------------------- local: a process per slot


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (SIGKILL included), so the
    child checkpoints and stops instead of running on unattended."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _Interrupt:
    """SIGINT/SIGTERM while children run: remember it and pass SIGTERM on to each child."""

    def __init__(self, running: dict):
        self.running, self.signal, self._old = running, None, {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.signal = signum
        for proc in self.running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def run_local(jobs: Sequence[Job], slots: Sequence[Mapping[str, str]], say: Say) -> tuple[list, bool]:
    """Run ``jobs`` on ``slots`` (at most one each at a time); returns (failed (job, code), interrupted)."""
    pending, free = list(jobs), list(range(len(slots)))
    running: dict[subprocess.Popen, tuple[Job, int]] = {}
    failed: list[tuple[Job, int]] = []
    with _Interrupt(running) as stop:
        while pending or running:
            while pending and free and stop.signal is None:
                job, slot = pending.pop(0), free.pop(0)
                running[_start(job, slots[slot], say)] = (job, slot)
            for proc in [p for p in running if p.poll() is not None]:
                job, slot = running.pop(proc)
                free.append(slot)
                if proc.returncode != 0 and stop.signal is None:
                    failed.append((job, proc.returncode))
            if stop.signal is not None and not running:
                break
            time.sleep(0.05)
    return failed, stop.signal is not None


def _start(job: Job, slot_env: Mapping[str, str], say: Say) -> subprocess.Popen:
    """The job's process, writing to this one's stdout/stderr (no pipe that would break if this
    process died) with each line prefixed ``[job]`` by `fss` itself (FSS_LOG_PREFIX)."""
    env = {**os.environ, **slot_env, "PYTHONUNBUFFERED": "1", "PYTHONPATH": _pythonpath(),
           LOG_PREFIX_ENV: f"[{job.name}] "}
    proc = subprocess.Popen(job.argv, env=env, preexec_fn=_die_with_parent)
    where = f"GPU {slot_env['CUDA_VISIBLE_DEVICES']}" if slot_env.get("CUDA_VISIBLE_DEVICES") else \
        f"{slot_env.get('OMP_NUM_THREADS', '?')} CPU threads"
    say(f"{job.name}: started (pid {proc.pid}, {where})")
    return proc


# ---------------------------------------------------------------- cluster: submitit jobs


def make_executor(cluster: Mapping[str, Any]) -> submitit.AutoExecutor:
    backend = str(cluster["backend"])
    if backend not in ("auto", "slurm", "local"):
        raise ConfigError(f"params cluster.backend {backend!r} is not known; choose auto, slurm or local.")
    executor = submitit.AutoExecutor(folder=Path(cluster["folder"]), cluster=None if backend == "auto" else backend)
    resources: dict[str, Any] = {"timeout_min": int(cluster["time_minutes"]), "gpus_per_node": int(cluster["gpus_per_job"]),
                                 "cpus_per_task": int(cluster["cpus_per_job"]), "mem_gb": int(cluster["mem_gb"]),
                                 "tasks_per_node": 1, "nodes": 1}
    if cluster["partition"]:
        resources["slurm_partition"] = str(cluster["partition"])
    if cluster["account"]:
        resources["slurm_account"] = str(cluster["account"])
    executor.update_parameters(**resources)
    return executor


def run_submitit(jobs: Sequence[Job], cluster: Mapping[str, Any], say: Say) -> tuple[list, bool]:
    """Submit each job, wait for all; returns (failed (job, code), interrupted)."""
    executor = make_executor(cluster)
    cwd = os.getcwd()
    with executor.batch():
        futures = [executor.submit(submitit.helpers.CommandFunction(job.argv, cwd=cwd)) for job in jobs]
    for job, future in zip(jobs, futures):
        say(f"{job.name}: submitted as {executor.cluster} job {future.job_id} (logs {future.paths.stdout.parent})")
    failed = []
    try:
        for job, future in zip(jobs, futures):
            try:
                future.result()
            except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as exc:
                say(f"{job.name}: job {future.job_id} failed; its log: {future.paths.stderr}")
                failed.append((job, getattr(exc, "returncode", 1) or 1))
    except KeyboardInterrupt:
        for future in futures:
            future.cancel(check=False)
        return failed, True
    return failed, False
