"""The step loop of `fss train` and `fss pretrain`, and the rank-0 work of both in one place.

:func:`run_steps` is the loop: iterations ``state.iteration .. task.total - 1`` in order, the
learning rate of each from the task's schedule, one optimiser step, the task's logging and
checks, the resume checkpoint at the cadence of :func:`checkpoint_due`, and a stop on
SIGTERM/SIGINT (:class:`StopFlag`) or ``stop_after`` (testing) right after a checkpoint.
A task (:class:`pipeline.train.EpisodicTask`, :class:`pipeline.pretrain.PretrainTask`) says
what a step is; :func:`resume` / :func:`save_state` read and write the checkpoint
(:func:`pipeline.runs.save_checkpoint`'s format) of model, optimiser, global RNGs and
:class:`LoopState`, so a run killed at any moment and rerun ends with the same weights.

:class:`MainProcess` is where rank 0's work lives under torchrun (nanoGPT's
``master_process``): the run directory, the CSV logs, the messages, and the calls that only
rank 0 makes while the others wait. On other ranks its logs and run directory write nothing.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

from fss.errors import ConfigError

from pipeline import distributed as D
from pipeline import runs as R


class StopFlag:
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


# ---------------------------------------------------------------- rank 0's work


def _silent(message: str) -> None:
    pass


class NullLog:
    """Stands in for :class:`pipeline.runs.CsvLog` on ranks other than 0."""

    def truncate_after(self, iteration: int) -> None:
        pass

    def reset(self) -> None:
        pass

    def append(self, row) -> None:
        pass


class FollowerRunDir(R.RunDir):
    """The run directory's paths on ranks other than 0, whose ``log`` writes nothing (they never
    prepare, read or write the directory, which may live on another machine)."""

    def log(self, message: str) -> None:
        pass


class MainProcess:
    """Rank 0's work in one place: ``is_main`` is the one flag (nanoGPT's ``master_process``).

    On rank 0: the run directory, its CSV logs and ``say``; on the other ranks stand-ins that
    write nothing. :meth:`only` runs a call on rank 0 alone, :meth:`shared` gives rank 0's
    result (or its one-line error) to every rank.
    """

    def __init__(self, ctx: D.DistContext, out, say: Callable[[str], None]):
        self.ctx = ctx
        self.is_main = ctx.is_main
        self.run = R.RunDir(out) if self.is_main else FollowerRunDir(out)
        self.say = say if self.is_main else _silent

    def csv_log(self, name: str, first_columns: tuple[str, ...]):
        return R.CsvLog(self.run.file(name), first_columns) if self.is_main else NullLog()

    def only(self, fn: Callable[..., Any], *args, wait: bool = True) -> None:
        """``fn(*args)`` on rank 0; with ``wait`` the other ranks wait for it (a barrier)."""
        if self.is_main:
            fn(*args)
        if wait:
            D.barrier(self.ctx)

    def shared(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` run by rank 0, its result broadcast to every rank (:func:`pipeline.distributed.on_main`)."""
        return D.on_main(fn, self.ctx)


# ---------------------------------------------------------------- state and checkpoint


@dataclass
class LoopState:
    """Everything of a run's progress that a checkpoint holds besides weights, optimiser and RNGs."""

    iteration: int = 0
    best: dict = field(default_factory=lambda: {"miou": None, "iteration": None})  # training's validation
    window: dict = field(default_factory=dict)  # loss sums since the last curves.csv row
    extra: dict = field(default_factory=dict)  # what else a task keeps (JSON): pretraining's losses
    elapsed_before: float = 0.0  # seconds trained before this process resumed the run
    clock: float = field(default_factory=time.monotonic)
    last_checkpoint: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self.clock)


@dataclass(frozen=True)
class Cadence:
    """When the resume checkpoint is written besides the end and a stop (``checkpoint_every``
    iterations, ``checkpoint_minutes`` of work; 0 = never)."""

    every: int = 0
    minutes: float = 0.0


def checkpoint_due(state: LoopState, total: int, cadence: Cadence, stop_after: int | None, stopping: bool) -> bool:
    """At the end, every ``cadence.every`` steps or ``cadence.minutes``, and before any stop."""
    done = state.iteration
    return bool(
        done == total
        or (cadence.every and done % cadence.every == 0)
        or (cadence.minutes > 0 and time.monotonic() - state.last_checkpoint >= cadence.minutes * 60)
        or (stop_after is not None and done >= stop_after)
        or stopping
    )


def save_state(path, *, config, state: LoopState, total: int, model, optimizer,
               scheduler_state: Mapping[str, Any]) -> None:
    """Write the resume checkpoint of ``state`` atomically (``config``: anything with ``to_json``)."""
    R.save_checkpoint(path, config=config, iteration=state.iteration, total_iterations=total, model=model,
                      optimizer=optimizer, scheduler_state=scheduler_state, best=state.best, window=state.window,
                      elapsed_s=state.elapsed(), extra=state.extra)
    state.last_checkpoint = time.monotonic()


def resume(main: MainProcess, model, optimizer, total: int) -> LoopState | None:
    """The state of the run directory's ``checkpoint.pt`` (model, optimiser and RNGs loaded from
    it; under torchrun read by rank 0 and broadcast), or None when there is none."""
    path = main.run.checkpoint_file

    def read_checkpoint():
        if not path.is_file():
            return None
        blob = R.load_checkpoint(path)
        R.checkpoint_matches_model(blob, model, path)
        if blob["total_iterations"] != total:
            raise ConfigError(
                f"{path} was written for {blob['total_iterations']} iterations, this run has {total}; choose a new --out."
            )
        return blob

    blob = main.shared(read_checkpoint)
    if blob is None:
        return None
    model.load_state_dict(blob["model"])
    if optimizer is not None:
        try:
            optimizer.load_state_dict(blob["optimizer"])
        except (ValueError, KeyError, RuntimeError):
            raise ConfigError(f"{path} holds an optimiser state that does not fit; choose a new --out.") from None
    R.restore_rng_state(blob["rng"])
    return LoopState(iteration=int(blob["iteration"]), best=blob["best"], window=blob["window"],
                     extra=blob.get("extra", {}), elapsed_before=float(blob.get("elapsed_s", 0.0)))


def log_window(state: LoopState, curves, losses: Mapping[str, float], *, every: int, total: int,
               first: Mapping[str, Any]) -> dict | None:
    """Add the step's losses to the window; every ``every`` steps (and at the end) append their
    mean as a curves.csv row (``first`` columns, the losses sorted by name, ``seconds``); the row."""
    for name, value in losses.items():
        state.window[name] = state.window.get(name, 0.0) + value
    state.window["_n"] = state.window.get("_n", 0) + 1
    done = state.iteration
    if done % every != 0 and done != total:
        return None
    n = state.window.pop("_n")
    row = {"iteration": done, **first}
    row.update({k: v / n for k, v in sorted(state.window.items())})
    row["seconds"] = round(state.elapsed(), 3)
    curves.append(row)
    state.window = {}
    return row


# ---------------------------------------------------------------- the loop


class LoopTask(Protocol):
    """What :func:`run_steps` asks of a training task."""

    total: int

    def learning_rate(self, it: int) -> float: ...

    def step(self, it: int, batch: Any, lr: float, stop_requested: bool) -> tuple[dict, bool]:
        """One optimiser step: the losses and whether (any rank) was asked to stop."""

    def after_step(self, state: LoopState, epoch: int, lr: float, losses: dict) -> None:
        """Logging and checks after ``state.iteration`` steps."""

    def save_checkpoint(self, state: LoopState) -> None: ...


@dataclass(frozen=True)
class Outcome:
    """How :func:`run_steps` ended: ``reason`` is None when every iteration was done."""

    reason: str | None
    signal: int | None


def run_steps(task: LoopTask, batches, state: LoopState, *, main: MainProcess, cadence: Cadence,
              stop_after: int | None = None, track: Callable | None = None, label: str = "") -> Outcome:
    """Iterations ``state.iteration .. task.total - 1``; ``batches`` is a context manager with
    ``at(it) -> (epoch, batch)``. Stops after a checkpoint on a signal or at ``stop_after``
    (testing: as if the process had been killed right after that checkpoint)."""
    steps = range(state.iteration, task.total)
    if track is not None and len(steps):
        steps = track(steps, label, len(steps))
    reason = None
    with StopFlag() as stop, batches:
        for it in steps:
            epoch, batch = batches.at(it)
            lr = task.learning_rate(it)
            losses, stopping = task.step(it, batch, lr, stop.signal is not None)
            state.iteration = done = it + 1
            task.after_step(state, epoch, lr, losses)
            # checkpoint, then stop if asked: a rerun resumes exactly here (rank 0 writes, nobody waits:
            # the time-based cadence may differ between ranks)
            if checkpoint_due(state, task.total, cadence, stop_after, stopping):
                main.only(task.save_checkpoint, state, wait=False)
            if stop_after is not None and stop_after <= done < task.total:
                reason = f"stopped after iteration {done} (--stop-after)"
            elif stopping and done < task.total:
                reason = f"interrupted by signal {stop.signal} at iteration {done}; checkpoint saved"
            if reason is not None:
                break
    return Outcome(reason, stop.signal)
