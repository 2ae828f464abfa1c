"""Weights & Biases tracking that never holds a run up.

One W&B run per ``fss train``, per evaluation of ``fss evaluate`` and per ``fss aggregate``
(turned on by ``--wandb`` or ``tracking.wandb: true``): ``group`` =
method-dataset-backbone-shot, ``job_type`` = train / evaluate / aggregate, ``name`` =
method-dataset-fold (``pfenet-synthetic-fold0``; evaluations add the shot:
``pfenet-synthetic-fold0-1shot``). Logged: the config, loss curves and validation checks
(``define_metric``: the summary's ``val/miou`` is the best check, not the last), the final
metrics, per-class IoU as a ``wandb.Table`` with class names, sample predictions (images
with masks), and the paper tables of ``fss aggregate`` as tables. Training logs its selected
weights as a ``model`` artifact holding a reference to ``model.pt`` (its path and checksum;
nothing is uploaded); an online evaluation run marks that artifact as its input
(``use_artifact``); W&B refuses ``use_artifact`` offline, so an offline evaluation records
the artifact's name in its config instead. The project's own files (curves.csv, eval JSON)
stay the source of truth; tracking is a mirror.

Mode: ``WANDB_MODE`` (online / offline / disabled) is respected when set; otherwise the
run is online when credentials exist (``WANDB_API_KEY`` or a netrc entry for the W&B
host) and offline when not (``wandb sync <dir>`` uploads it later). Every wandb call is
wrapped: the first failure prints one warning and turns tracking off for the run.
``wandb.init`` gets ``init_timeout`` seconds.
"""

from __future__ import annotations

import netrc
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlparse

import pandas as pd


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode() -> str:
    """online, offline or disabled (see the module docstring)."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "disabled", "dryrun", "run"):
        return {"dryrun": "offline", "run": "online"}.get(env, env)
    if os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes"):
        return "disabled"
    return "online" if _has_credentials() else "offline"


def run_name(method: str, dataset: str, fold: int | None, shot: int | None = None) -> str:
    """``pfenet-synthetic-fold0`` (training), ``pfenet-synthetic-fold0-1shot`` (an evaluation)."""
    name = f"{method}-{dataset}" + (f"-fold{fold}" if fold is not None else "")
    return name + (f"-{shot}shot" if shot is not None else "")


def model_artifact_name(method: str, dataset: str, backbone: str, shot: Any, fold: int) -> str:
    """The W&B artifact of a run's selected weights (the same name for training and evaluation)."""
    raw = f"model-{method}-{dataset}-{backbone}-{shot}shot-fold{fold}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", raw)[:128]


class Tracker:
    """A W&B run, or a no-op when disabled or broken. Safe to call in any state."""

    def __init__(
        self,
        *,
        enabled: bool,
        project: str = "fss",
        entity: str | None = None,
        group: str = "",
        job_type: str = "",
        name: str = "",
        config: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        init_timeout: float = 30.0,
        tags: list[str] | None = None,
        warn: Callable[[str], None] | None = None,
    ):
        self.run = None
        self.mode = "disabled"
        self._warn = warn or (lambda m: print(m, file=sys.stderr))
        if not enabled:
            return
        self.mode = wandb_mode()
        if self.mode == "disabled":
            return
        try:
            import wandb  # optional: W&B only when tracking is on

            self._wandb = wandb
            settings = wandb.Settings(init_timeout=float(init_timeout), silent=True, console="off")
            self.run = wandb.init(
                project=project, entity=entity, group=group, job_type=job_type, name=name,
                config=dict(config or {}), mode=self.mode, id=run_id,
                resume="allow" if run_id else None, tags=tags, settings=settings, reinit="finish_previous",
            )
        except Exception as exc:  # noqa: BLE001 - tracking must never stop a run
            self._fail("init", exc)

    @property
    def active(self) -> bool:
        return self.run is not None

    @property
    def run_id(self) -> str | None:
        return getattr(self.run, "id", None) if self.run is not None else None

    @property
    def run_dir(self) -> str | None:
        return getattr(self.run, "dir", None) if self.run is not None else None

    def _fail(self, what: str, exc: BaseException) -> None:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        self._warn(f"warning: W&B {what} failed ({type(exc).__name__}: {first}); tracking is off for this run.")
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001
                pass

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if self.run is None:
            return
        try:
            self.run.log(dict(metrics), step=step)
        except Exception as exc:  # noqa: BLE001
            self._fail("log", exc)

    def summary(self, metrics: Mapping[str, Any]) -> None:
        if self.run is None:
            return
        try:
            for k, v in metrics.items():
                self.run.summary[k] = v
        except Exception as exc:  # noqa: BLE001
            self._fail("summary", exc)

    def images(self, key: str, samples: list[dict], class_labels: Mapping[int, str] | None = None,
               step: int | None = None) -> None:
        """``samples``: dicts with ``image`` (uint8 HxWx3), ``prediction`` and
        ``ground_truth`` (int HxW; 255 = ignore) and an optional ``caption``."""
        if self.run is None or not samples:
            return
        try:
            labels = dict(class_labels or {0: "background", 1: "foreground", 255: "ignore"})
            images = []
            for s in samples:
                masks = {
                    "prediction": {"mask_data": s["prediction"], "class_labels": labels},
                    "ground_truth": {"mask_data": s["ground_truth"], "class_labels": labels},
                }
                images.append(self._wandb.Image(s["image"], masks=masks, caption=s.get("caption", "")))
            self.run.log({key: images}, step=step)
        except Exception as exc:  # noqa: BLE001
            self._fail("image logging", exc)

    def define_metric(self, name: str, **options: Any) -> None:
        """``wandb.define_metric`` (e.g. ``summary="max"``: the summary holds the best value)."""
        if self.run is None:
            return
        try:
            self.run.define_metric(name, **options)
        except Exception as exc:  # noqa: BLE001
            self._fail("define_metric", exc)

    def table(self, key: str, columns: Sequence[str] | None = None, rows: Sequence[Sequence[Any]] | None = None, *,
              frame: Any = None) -> None:
        """Log a ``wandb.Table`` from ``columns`` and ``rows``, or from a pandas ``frame``."""
        if self.run is None:
            return
        try:
            if frame is not None:
                table = self._wandb.Table(dataframe=frame)
            else:
                table = self._wandb.Table(columns=list(columns or []), data=[list(r) for r in rows or []])
            self.run.log({key: table})
        except Exception as exc:  # noqa: BLE001
            self._fail("table logging", exc)

    def _reference(self, path: Path, name: str, metadata: Mapping[str, Any] | None):
        artifact = self._wandb.Artifact(name, type="model", metadata=dict(metadata or {}))
        artifact.add_reference(Path(path).resolve().as_uri(), name=Path(path).name)
        return artifact

    def log_model(self, path: str | os.PathLike, name: str, metadata: Mapping[str, Any] | None = None) -> None:
        """Log the weights file ``path`` as the ``model`` artifact ``name`` (a reference: path and checksum)."""
        if self.run is None or not Path(path).is_file():
            return
        try:
            self.run.log_artifact(self._reference(Path(path), name, metadata))
        except Exception as exc:  # noqa: BLE001
            self._fail("artifact logging", exc)

    def use_model(self, path: str | os.PathLike, name: str) -> None:
        """Mark the ``model`` artifact ``name`` of the weights file ``path`` as this run's input
        (online; offline, where W&B refuses it, the name goes into the run's config)."""
        if self.run is None or not Path(path).is_file():
            return
        try:
            if self.mode == "offline":
                self.run.config.update({"model_artifact": name}, allow_val_change=True)
            else:
                self.run.use_artifact(self._reference(Path(path), name, None))
        except Exception as exc:  # noqa: BLE001
            self._fail("artifact use", exc)

    def finish(self, exit_code: int = 0) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.finish(exit_code=exit_code)
        except Exception as exc:  # noqa: BLE001
            self._warn(f"warning: W&B finish failed ({type(exc).__name__}); the run's own files are complete.")


def start_training(config, *, enabled: bool, run_id: str | None, warn: Callable[[str], None]) -> Tracker:
    """The W&B run of ``fss train`` (a RunConfig); its summary keeps the best validation check."""
    tracker = Tracker(
        enabled=enabled, project=config.tracking.project, entity=config.tracking.entity, group=config.group,
        job_type="train", name=run_name(config.method, config.dataset, config.fold), config=config.to_dict(),
        run_id=run_id, init_timeout=config.tracking.init_timeout, warn=warn,
    )
    tracker.define_metric("val/miou", summary="max")
    tracker.define_metric("val/fb_iou", summary="max")
    return tracker


def log_evaluation(tracker: Tracker, report: Mapping[str, Any], class_names: Mapping[int, str]) -> None:
    """An evaluation report: mIoU / FB-IoU (summary and history), the per-class IoU as a
    table with class names and the per-run (seed) results as a table."""
    tracker.summary({"miou": report["miou"], "fb_iou": report["fb_iou"], "episodes": report["episodes"],
                     **({"miou_std": report["miou_std"]} if "miou_std" in report else {})})
    tracker.log({"miou": report["miou"], "fb_iou": report["fb_iou"]})
    episodes = report.get("class_episodes", {})
    tracker.table("class_iou", ["class_id", "class", "fold", "shot", "iou", "episodes"], [
        [int(k), class_names.get(int(k), str(k)), report["fold"], report["shot"], v, episodes.get(k)]
        for k, v in sorted(report["class_iou"].items(), key=lambda kv: int(kv[0]))])
    tracker.table("runs", ["seed", "fold", "shot", "miou", "fb_iou", "episodes"], [
        [r["seed"], report["fold"], report["shot"], r["miou"], r["fb_iou"], r["episodes"]] for r in report["runs"]])


def log_aggregate(tracking, out: str | os.PathLike, warn: Callable[[str], None]) -> None:
    """One ``aggregate`` W&B run with the tables ``fss aggregate`` wrote to ``out``: the
    paper's mIoU and FB-IoU tables (with the intervals' half-widths), ``results`` (one row per
    fold evaluation), ``intervals`` (every cell's and mean's 95% interval) and
    ``table_differences`` (the paired differences)."""
    tracker = Tracker(enabled=tracking.wandb, project=tracking.project, entity=tracking.entity,
                      job_type="aggregate", name="aggregate", init_timeout=tracking.init_timeout, warn=warn,
                      config={"out": str(out)})
    if not tracker.active:
        return
    for name in ("table_miou", "table_fbiou", "results", "intervals", "table_differences"):
        path = Path(out) / f"{name}.csv"
        if path.is_file():
            tracker.table(name, frame=pd.read_csv(path))
    tracker.finish()
