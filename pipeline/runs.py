"""Run directories and the resumable training checkpoint.

A run directory (``fss train --out RUN_DIR``) holds::

    config.yaml        the resolved configuration (written before training starts)
    checkpoint.pt      resume state, replaced atomically (see below)
    curves.csv         iteration, epoch, lr, loss terms (window means), seconds
    val.csv            iteration, val_miou, val_fb_iou, episodes (validation checks)
    model_last.pt      final weights (model file, fss.models.checkpoints format)
    model_best.pt      weights of the best validation check (when there is validation)
    model.pt           the selected weights (validation.select: last or best)
    train_summary.json what was trained, how long, which weights were selected
    train.log          one line per event
    inputs.json        digests of the code, backbone weights and data index it was trained
                       from (with ``fss train --restart-on-change``, the DVC stages' way)

The resume checkpoint is a dict of tensors, numbers, strings and lists only, so it loads
with ``torch.load(weights_only=True)`` (no pickled code runs): model and optimiser state
dicts, the iteration, the RNG states (torch CPU/CUDA as byte tensors, numpy and python as
lists) and JSON strings for the config and the logging window.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import yaml

from fss.atomic import atomic_write_text, disk_full, remove_stale_temporaries  # noqa: F401  (re-exported: pipeline code imports it from here)
from fss.errors import CheckpointError, ConfigError, StorageError
from fss.models.checkpoints import atomic_torch_save, safe_torch_load

from pipeline.codedeps import REPO, train_code
from pipeline.config import RunConfig, config_differences, config_from_dict

CHECKPOINT_FORMAT = "fss-train-state"
CHECKPOINT_VERSION = 1

CONFIG_FILE = "config.yaml"
CHECKPOINT_FILE = "checkpoint.pt"
CURVES_FILE = "curves.csv"
VAL_FILE = "val.csv"
VAL_REPORT = "validation.json"  # the report of the latest validation check (pipeline.eval_report)
MODEL_LAST = "model_last.pt"
MODEL_BEST = "model_best.pt"
MODEL_SELECTED = "model.pt"
SUMMARY_FILE = "train_summary.json"
LOG_FILE = "train.log"
INPUTS_FILE = "inputs.json"


# ---------------------------------------------------------------- small atomic writers


def write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist.")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{what} {p} is not valid JSON; re-create it.") from None


# ---------------------------------------------------------------- the run directory


WANDB_ID_FILE = "wandb_run_id.txt"


class RunDir:
    """Paths and state of one run directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    def wandb_run_id(self) -> str | None:
        """The W&B run id a previous attempt of this run logged to (resumed into the same W&B run)."""
        p = self.file(WANDB_ID_FILE)
        return p.read_text().strip() or None if p.is_file() else None

    def save_wandb_run_id(self, run_id: str | None) -> None:
        if run_id:
            atomic_write_text(self.file(WANDB_ID_FILE), run_id + "\n")

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def checkpoint_file(self) -> Path:
        return self.path / CHECKPOINT_FILE

    def has_config(self) -> bool:
        return self.config_file.is_file()

    def load_config(self) -> RunConfig:
        if not self.config_file.is_file():
            raise ConfigError(
                f"{self.path} is not a training run directory (no {CONFIG_FILE}); pass the --out of 'fss train'."
            )
        try:
            data = yaml.safe_load(self.config_file.read_text())
        except (yaml.YAMLError, UnicodeDecodeError):
            raise ConfigError(f"{self.config_file} is not valid YAML; the run directory is damaged.") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{self.config_file} does not hold a configuration mapping.")
        return config_from_dict(data)

    def prepare(self, config: RunConfig, *, restart_on_change: bool = False, say=None) -> bool:
        """Create the directory or check that it holds the same run.

        Returns True when a config was already there (a rerun: resume or finish). A
        different configuration raises :class:`ConfigError` naming the first differing key;
        with ``restart_on_change`` (``dvc.yaml``'s train stages, whose run directories are
        ``persist: true``) a different configuration, or different code, backbone weights or
        data index (:func:`input_digests`), instead empties the directory and starts afresh.
        """
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--out {self.path} exists and is not a directory; choose a new run directory.")
        if restart_on_change and self.has_config():
            reason = self._changed(config)
            if reason is None:
                remove_stale_temporaries(self.path)
                return True
            (say or (lambda m: None))(f"{self.path} holds a run of other inputs ({reason}); starting afresh.")
            self._empty()
        if self.has_config():
            saved = self.load_config()
            if (saved.method, saved.dataset, saved.fold, saved.shot) != (
                config.method, config.dataset, config.fold, config.shot
            ):
                raise ConfigError(
                    f"run directory {self.path} holds a {saved.method}/{saved.dataset}/fold {saved.fold}/"
                    f"{saved.shot}-shot run, not {config.method}/{config.dataset}/fold {config.fold}/"
                    f"{config.shot}-shot; choose a new --out directory."
                )
            diffs = config_differences(saved, config)
            if diffs:
                key, old, new = diffs[0]
                more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
                raise ConfigError(
                    f"run directory {self.path} was trained with {key}={old!r}, this command asks "
                    f"{new!r}{more}; choose a new --out directory instead of mixing runs."
                )
            remove_stale_temporaries(self.path)  # what a killed checkpoint write left
            return True
        if self.path.is_dir() and any(p.name != ".gitignore" for p in self.path.iterdir()):
            raise ConfigError(
                f"--out {self.path} exists and is not empty but holds no {CONFIG_FILE}; choose a new run directory."
            )
        self.path.mkdir(parents=True, exist_ok=True)
        if restart_on_change:
            write_json(self.file(INPUTS_FILE), input_digests(config))
        atomic_write_text(self.config_file, config.to_yaml())
        return False

    def _changed(self, config: RunConfig) -> str | None:
        """Why the saved run differs from ``config`` and this checkout's inputs (None: it does not)."""
        try:
            saved = self.load_config()
        except ConfigError:
            return f"a damaged {CONFIG_FILE}"
        diffs = config_differences(saved, config)
        if diffs:
            key, old, new = diffs[0]
            return f"{key}={old!r}, now {new!r}"
        inputs = self.file(INPUTS_FILE)
        try:
            recorded = json.loads(inputs.read_text()) if inputs.is_file() else {}
        except (ValueError, UnicodeDecodeError):
            recorded = {}
        current = input_digests(config)
        changed = [k for k in current if recorded.get(k) != current[k]]
        return f"its {', '.join(changed)} changed" if changed else None

    def _empty(self) -> None:
        for p in self.path.iterdir():
            if p.name == ".gitignore":
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    def log(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path / LOG_FILE, "a") as fh:
            fh.write(f"{stamp} {message}\n")


def input_digests(config: RunConfig) -> dict[str, str]:
    """SHA-256 digests of what a run reads besides its configuration: ``code`` (the files its
    method's train stage runs, :func:`pipeline.codedeps.train_code`: the same files dvc.yaml lists),
    ``backbone weights`` (the file, when the config names one) and ``data`` (the prepared root's
    meta.json, areas.tsv and lists, not the images)."""
    def digest(root: Path, files) -> str:
        h = hashlib.sha256()
        for f in sorted(files):
            h.update(str(f.relative_to(root)).encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()

    out = {"code": digest(REPO, [REPO / f for f in train_code(config.method)])}
    weights = Path(config.backbone_weights) if config.backbone_weights else None
    if weights is not None and weights.is_file():
        out["backbone weights"] = digest(weights.parent, [weights])
    root = Path(config.data.root)
    index = [root / "meta.json", root / "areas.tsv", *sorted((root / "lists").rglob("*.txt"))]
    out["data"] = digest(root, [f for f in index if f.is_file()])
    return out


# ---------------------------------------------------------------- CSV logs (resumable)


class CsvLog:
    """An append-only CSV whose columns may grow; rows after a checkpoint can be dropped.

    The file is rewritten (atomically) when a new column appears; otherwise rows are
    appended and flushed, so a killed run leaves a valid file.
    """

    def __init__(self, path: str | os.PathLike, first_columns: Sequence[str] = ("iteration",)):
        self.path = Path(path)
        self.first_columns = list(first_columns)
        self.columns: list[str] = []
        self.rows: list[dict[str, Any]] = []
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        """Read the existing log; a damaged one (not UTF-8, NUL bytes, no ``iteration``
        column) is refused in one line rather than appended to."""
        key = self.first_columns[0]
        try:
            text = self.path.read_text()
            reader = csv.DictReader(io.StringIO(text, newline=""))
            self.columns, self.rows = list(reader.fieldnames or []), [dict(r) for r in reader]
            damaged = "\0" in text or bool(self.columns and key not in self.columns)
        except (UnicodeDecodeError, csv.Error):
            damaged = True
        if damaged:
            raise ConfigError(f"{self.path} is damaged (not a CSV log with an '{key}' column); "
                              "move it away to start the log afresh from the checkpoint's iteration.")

    def truncate_after(self, iteration: int) -> None:
        """Keep rows with ``iteration <= iteration`` (drop what a killed run wrote later)."""
        kept = [r for r in self.rows if _as_int(r.get("iteration")) <= iteration]
        if len(kept) != len(self.rows) or not self.path.is_file():
            self.rows = kept
            self._rewrite()

    def reset(self) -> None:
        self.rows, self.columns = [], []
        if self.path.exists():
            self.path.unlink()

    def append(self, row: Mapping[str, Any]) -> None:
        row = {k: _fmt(v) for k, v in row.items()}
        new_cols = [k for k in row if k not in self.columns]
        self.rows.append(row)
        if new_cols or not self.path.is_file():
            self.columns = self._order(self.columns + new_cols)
            self._rewrite()
            return
        try:
            with open(self.path, "a", newline="") as fh:
                csv.DictWriter(fh, fieldnames=self.columns, restval="", lineterminator="\n").writerow(row)
                fh.flush()
        except OSError as exc:
            if disk_full(exc) is None:
                raise
            raise StorageError(f"no space left to append to {self.path} ({exc.strerror}); free space, then "
                               "rerun to resume from the last checkpoint.") from None

    def _order(self, cols: list[str]) -> list[str]:
        first = [c for c in self.first_columns if c in cols]
        return first + [c for c in cols if c not in first]

    def _rewrite(self) -> None:
        if not self.columns:  # nothing logged yet: the header of the known first columns
            self.columns = list(self.first_columns)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, restval="", lineterminator="\n")
        writer.writeheader()
        for r in self.rows:
            writer.writerow(r)
        atomic_write_text(self.path, buf.getvalue())


def _as_int(v: Any) -> int:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return -1


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return repr(v)
    return v


# ---------------------------------------------------------------- RNG states


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG as tensors / plain lists (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_meta": [str(np_state[0]), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [int(py_state[0]), [int(x) for x in py_state[1]],
                   None if py_state[2] is None else float(py_state[2])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    meta = state["numpy_meta"]
    np.random.set_state((meta[0], state["numpy_keys"].numpy().astype(np.uint32), int(meta[1]), int(meta[2]), float(meta[3])))
    py = state["python"]
    random.setstate((int(py[0]), tuple(int(x) for x in py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


class rng_preserved:
    """Context manager: the global RNGs are the same after the block as before it."""

    def __enter__(self):
        self.state = capture_rng_state()
        return self

    def __exit__(self, *exc):
        restore_rng_state(self.state)
        return False


# ---------------------------------------------------------------- the checkpoint


def save_checkpoint(path: str | os.PathLike, *, config: RunConfig, iteration: int, total_iterations: int,
                    model, optimizer, scheduler_state: Mapping[str, Any],
                    best: Mapping[str, Any], window: Mapping[str, Any], elapsed_s: float,
                    extra: Mapping[str, Any] | None = None) -> None:
    """Write the resume state atomically (a temporary file renamed over the old one); ``extra``:
    what else the task keeps (JSON; pretraining's losses)."""
    blob = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config_json": config.to_json(),
        "iteration": int(iteration),
        "total_iterations": int(total_iterations),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": _to_cpu(optimizer.state_dict()),
        "scheduler": dict(scheduler_state),
        "rng": capture_rng_state(),
        "best_json": json.dumps(dict(best)),
        "window_json": json.dumps(dict(window)),
        "extra_json": json.dumps(dict(extra or {})),
        "elapsed_s": float(elapsed_s),
        "saved_at": time.time(),
    }
    atomic_torch_save(blob, path)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return [_to_cpu(v) for v in obj]
    return obj


REQUIRED_KEYS = ("format", "version", "config_json", "iteration", "total_iterations", "model", "optimizer",
                 "rng", "best_json", "window_json")


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and fully check a resume checkpoint before anything is loaded from it."""
    blob = safe_torch_load(path)  # corrupt / truncated -> CheckpointError
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a training checkpoint of this project; remove it or choose a new --out.")
    missing = [k for k in REQUIRED_KEYS if k not in blob]
    if missing:
        raise CheckpointError(f"training checkpoint {path} lacks {missing}; it is damaged: remove it to restart the run.")
    if blob["version"] != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"training checkpoint {path} has version {blob['version']}, this code reads {CHECKPOINT_VERSION}; start a new run."
        )
    try:
        blob["config"] = json.loads(blob["config_json"])
        blob["best"] = json.loads(blob["best_json"])
        blob["window"] = json.loads(blob["window_json"])
        blob["extra"] = json.loads(blob.get("extra_json", "{}"))  # absent in checkpoints older than pretraining's
    except (TypeError, json.JSONDecodeError):
        raise CheckpointError(f"training checkpoint {path} has unreadable metadata; remove it to restart the run.") from None
    return blob


def checkpoint_matches_model(blob: Mapping[str, Any], model, path: str | os.PathLike) -> None:
    """Refuse a checkpoint whose tensors do not fit the model (before loading anything)."""
    own = model.state_dict()
    saved = blob["model"]
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shapes = [k for k in own if k in saved and tuple(own[k].shape) != tuple(saved[k].shape)]
    if missing or unexpected or shapes:
        key = (missing or unexpected or shapes)[0]
        raise CheckpointError(
            f"training checkpoint {path} does not fit the model ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(shapes)} misshapen tensors, e.g. {key}); it is damaged or from other code: choose a new --out."
        )
