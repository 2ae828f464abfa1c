"""One evaluation path: score a model on a protocol's episodes and build its report.

Train-time validation (``pipeline.train``), sweep trials (``pipeline.sweep.run``) and
``fss evaluate`` (``pipeline.evaluate``) all call :func:`score`, which runs
``fss.evaluation.evaluate_model`` and hands its result to :func:`build_report`; so the three
reports have the same fields, and a protocol change is made once. :func:`run_settings` turns a
run's config into the :class:`fss.evaluation.EvalSettings` all three use (workers:
``test.num_workers``, else ``data.num_workers``; precision and channels-last of ``train``;
episodes per pass ``test.batch_size``).

The report (``kind`` ``fss-evaluation``)::

    {"kind", "version", "split", "method", "dataset", "backbone", "fold", "shot", "train_shot",
     "train_seed", "ways", "knobs", "miou", "fb_iou", "class_iou", "episodes", "num_runs",
     "runs": [{"seed", "miou", "fb_iou", "episodes", "class_iou", "class_episodes", "missing_classes",
               "episode_counts"}],
     "class_episodes", "protocol", "protocol_options", "checkpoint", "checkpoint_selection",
     "checkpoint_source", "run_dir", "data_root", "convention", "novel_classes", "device",
     "precision", "channels_last", "seconds"}

``episode_counts`` is each run's per-episode table (``fss.uncertainty.EpisodeCounts.to_json``:
class, foreground and background intersection and union per episode, and the episode list's
digest), from which intervals and paired differences are computed. ``miou_interval`` is the
95% percentile-bootstrap interval over episodes (``{"estimate", "low", "high", "std",
"replicates", "seed", ...}``; several runs: of their mean), absent with 0 replicates.

plus, when they apply: ``miou_std``/``fb_iou_std``/``class_iou_std`` (several runs),
``support_control`` (a control other than ``none``), ``feature_cache`` and ``image_cache``
(the caches' counters of this evaluation) and ``figure`` (written by ``fss evaluate``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fss.evaluation import EVAL_KIND, EvalSettings, evaluate_model
from fss.uncertainty import DEFAULT_REPLICATES, DEFAULT_SEED, bootstrap_miou

#: version of the report format (2: ``split`` and the per-episode counts in every report, one
#: builder for every caller, ``miou_interval``)
EVAL_VERSION = 2


@dataclass(frozen=True)
class Interval:
    """The bootstrap of a report's mIoU interval (``test.bootstrap_replicates``, ``test.bootstrap_seed``;
    0 replicates: no interval)."""

    replicates: int = DEFAULT_REPLICATES
    seed: int = DEFAULT_SEED

    @classmethod
    def of(cls, test) -> "Interval":
        return cls(replicates=int(test.bootstrap_replicates), seed=int(test.bootstrap_seed))


@dataclass(frozen=True)
class ScoredModel:
    """What a report says of the model it scores: the model file's metadata and where it came from."""

    method: str
    backbone: str
    train_shot: int | None
    knobs: dict = field(default_factory=dict)
    checkpoint: str = ""
    selection: str = ""
    source: str = ""
    train_seed: int | None = None  # the run's train.seed (None: an imported model)

    @classmethod
    def from_meta(cls, meta: dict, checkpoint, selection: str, train_seed: int | None = None) -> "ScoredModel":
        """From ``fss.models.checkpoints.load_model_file``'s metadata."""
        return cls(method=meta["method"], backbone=meta["backbone"], train_shot=meta.get("shot"),
                   knobs=dict(meta.get("knobs", {})), checkpoint=str(checkpoint), selection=selection,
                   source=meta.get("source", ""), train_seed=train_seed)

    @classmethod
    def from_config(cls, config, checkpoint="", selection: str = "training") -> "ScoredModel":
        """The model a run trains (validation scores it in memory)."""
        return cls(method=config.method, backbone=config.backbone, train_shot=config.shot,
                   knobs=dict(config.knobs), checkpoint=str(checkpoint), selection=selection,
                   train_seed=int(config.train.seed))


def run_settings(config, device, *, shot: int | None = None, ways: int = 1, support_control: str = "none",
                 num_workers: int | None = None, batch_size: int | None = None) -> EvalSettings:
    """The evaluation settings of a run's config (module docstring); arguments override."""
    workers = config.test.num_workers if config.test.num_workers is not None else config.data.num_workers
    return EvalSettings(
        shot=int(shot if shot is not None else config.shot), ways=ways, device=device,
        batch_size=batch_size or config.test.batch_size, num_workers=workers if num_workers is None else num_workers,
        precision=config.train.precision, channels_last=config.train.channels_last, support_control=support_control,
    )


def score(model, info: ScoredModel, data, protocol, settings: EvalSettings, *, run_dir=None,
          sample_episodes: int = 0, track: Callable | None = None, description: str = "evaluate",
          feature_cache=None, image_cache=None, interval: Interval = Interval()) -> tuple[dict, list]:
    """Score ``model`` on ``data`` under ``protocol`` and ``settings``; (report, sample episodes)."""
    cache_before = feature_cache.stats.as_dict() if feature_cache is not None else None
    images_before = image_cache.stats() if image_cache is not None else None
    start = time.monotonic()
    result = evaluate_model(model, data, protocol, settings, sample_episodes=sample_episodes, track=track,
                            description=description, feature_cache=feature_cache, image_cache=image_cache)
    report = build_report(result, info, data, protocol, settings, run_dir=run_dir,
                          seconds=time.monotonic() - start, interval=interval)
    if feature_cache is not None:
        report["feature_cache"] = {k: v - cache_before[k] for k, v in feature_cache.stats.as_dict().items()}
    if image_cache is not None:  # each test image read and resized once: misses = distinct images
        report["image_cache"] = {k: v - images_before[k] if k in ("hits", "misses", "evictions") else v
                                 for k, v in image_cache.stats().items()}
    return report, result["samples"]


def _ids(mapping: dict) -> dict:
    return {str(k): v for k, v in mapping.items()}


def build_report(result: dict, info: ScoredModel, data, protocol, settings: EvalSettings, *, run_dir=None,
                 seconds: float = 0.0, interval: Interval = Interval()) -> dict:
    """The evaluation report (module docstring) of ``evaluate_model``'s ``result``."""
    report: dict[str, Any] = {
        "kind": EVAL_KIND, "version": EVAL_VERSION, "split": data.split,
        "method": info.method, "dataset": data.dataset, "backbone": info.backbone, "fold": int(data.fold),
        "shot": settings.shot, "train_shot": info.train_shot, "train_seed": info.train_seed, "ways": settings.ways, "knobs": dict(info.knobs),
        "miou": result["miou"], "fb_iou": result["fb_iou"], "class_iou": _ids(result.get("class_iou", {})),
        "episodes": result["episodes"], "num_runs": len(result["runs"]),
        "runs": [
            {"seed": r["seed"], "miou": r["miou"], "fb_iou": r["fb_iou"], "episodes": r["episodes"],
             "class_iou": _ids(r["class_iou"]), "class_episodes": _ids(r["class_episodes"]),
             "missing_classes": r.get("missing_classes", []), "episode_counts": r["episode_counts"].to_json()}
            for r in result["runs"]
        ],
        "class_episodes": _ids(result["class_episodes"]),
        "protocol": protocol.name, "protocol_options": protocol.describe(),
        "checkpoint": info.checkpoint, "checkpoint_selection": info.selection, "checkpoint_source": info.source,
        "run_dir": str(run_dir) if run_dir is not None else None,
        "data_root": str(data.root), "convention": data.convention, "novel_classes": list(data.novel_classes),
        "device": str(settings.device), "precision": settings.precision, "channels_last": settings.channels_last,
        "seconds": round(seconds, 3),
    }
    if interval.replicates > 0:
        report["miou_interval"] = bootstrap_miou([r["episode_counts"] for r in result["runs"]],
                                                 replicates=interval.replicates, seed=interval.seed).to_json()
    if "support_control" in result:  # absent for the default "none": those reports are unchanged
        report["support_control"] = result["support_control"]
    if len(result["runs"]) > 1:
        report["miou_std"] = result["miou_std"]
        report["fb_iou_std"] = result["fb_iou_std"]
        if "class_iou_std" in result:
            report["class_iou_std"] = _ids(result["class_iou_std"])
    return report


def small_metrics(report: dict) -> dict:
    """The few numbers of a table row (DVC metrics): mIoU and FB-IoU as fractions, method, fold,
    shot and episode count, the mIoU interval's ends, plus the standard deviations over runs when
    there are several."""
    keys = ("method", "fold", "shot", "episodes", "miou", "fb_iou", "miou_std", "fb_iou_std")
    small = {k: report[k] for k in keys if k in report}
    if "miou_interval" in report:
        small["miou_low"], small["miou_high"] = report["miou_interval"]["low"], report["miou_interval"]["high"]
    if "support_control" in report:
        small["support_control"] = report["support_control"]["name"]
    return small


def metrics_path(out: Path) -> Path:
    """``evals/m/fold0-1shot.json`` -> ``evals/m/fold0-1shot.metrics.json``."""
    stem = out.name[: -len(".json")] if out.name.endswith(".json") else out.name
    return out.with_name(stem + ".metrics.json")
