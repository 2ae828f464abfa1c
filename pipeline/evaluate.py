"""`fss evaluate`: score a trained run (or an imported released model) under a test protocol.

The protocol (``fss.data.protocols``) fixes the episodes, seeds and runs, the test input
size and where predictions are scored (protocol sections 3-5). mIoU and FB-IoU come from
``fss.metrics.IoUMeter`` (intersections and unions summed per class over the episodes);
with several runs the JSON gives the mean, the population standard deviation and every
run. A model trained with K shots can be evaluated with any number of shots (and a PANet
with any number of ways): ``fss.models.checkpoints.load_model_file`` rebuilds the model with
the evaluation's shot and ways and loads the trained weights strictly. A ``--model`` file
imported for another dataset (PFENet/CELP pyramid bins) is refused unless
``--allow-dataset-mismatch``.

Output JSON (``--out``, default ``RUN_DIR/eval-<protocol>-<K>shot.json``)::

    {"kind": "fss-evaluation", "miou", "fb_iou", "class_iou", "miou_std", "fb_iou_std",
     "runs": [{"seed", "miou", "fb_iou", "class_iou", "class_episodes", "episodes"}],
     "episodes", "protocol", "protocol_options", "checkpoint", "checkpoint_selection",
     "method", "dataset", "backbone", "fold", "shot", "train_shot", ...}

plus ``"support_control": {"name", "same_class_episodes"}`` when ``--support-control shifted``
scored each episode with the previous episode's support (``fss.evaluation.ShiftedSupports``;
the output name, default or ``--out``, gets ``-shifted-support`` before ``.json``; repeat
``--support-control`` to score each shot with and without the control in one process), and a PNG of sample episodes next
to it (support, query, ground truth, prediction; the support the model was given), and the
small metrics file ``<out>.metrics.json`` (:func:`small_metrics`: what a table row needs,
declared as DVC ``metrics`` by dvc.yaml while the full report is a cached output).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, Optional

import typer

from fss.data.access import open_prepared
from fss.data.episodes import TestImageCache
from fss.errors import CheckpointError, ConfigError
from fss.evaluation import EVAL_KIND, SUPPORT_CONTROLS, evaluate_model, make_protocol
from pipeline import parallel as P
from pipeline.config import bf16_cpu_warning, resolve_device
from pipeline.console import console, track
from pipeline.runs import RunDir, write_json

EVAL_VERSION = 1


def _control_suffix(control: str) -> str:
    return "" if control == "none" else f"-{control}-support"


def _default_out(run_dir: Path | None, model: Path | None, protocol: str, shot: int, control: str = "none") -> Path:
    base = run_dir if run_dir is not None else model.parent
    stem = "eval" if run_dir is not None else f"eval-{model.stem}"
    return base / f"{stem}-{protocol}-{shot}shot{_control_suffix(control)}.json"


def _output_paths(out: Path | None, figure: Path | None, run: Path | None, model: Path | None, protocol: str,
                  shot: int, control: str) -> tuple[Path, Path]:
    """The JSON and PNG of one (shot, support control) evaluation. ``--out``/``--figure`` templates get
    ``{shot}``/``{protocol}`` filled in and, for a control other than ``none``, the same
    ``-<control>-support`` before the extension as the default name."""
    if out is None:
        out_k = _default_out(run, model, protocol, shot, control)
    else:
        out_k = Path(str(out).format(shot=shot, protocol=protocol))
        out_k = out_k.with_name(out_k.stem + _control_suffix(control) + out_k.suffix)
    if figure is None:
        return out_k, out_k.with_suffix(".png")
    fig_k = Path(str(figure).format(shot=shot, protocol=protocol))
    return out_k, fig_k.with_name(fig_k.stem + _control_suffix(control) + fig_k.suffix)


def evaluate_one(
    *,
    model_path: Path,
    selection: str,
    method_meta: dict | None,
    data,
    dataset: str,
    fold: int,
    shot: int,
    protocol,
    device,
    batch_size: int,
    num_workers: int,
    precision: str,
    ways: int,
    out: Path,
    figure: Path | None,
    figure_episodes: int,
    tracking,
    run_dir: Path | None,
    group_shot: int,
    track: Callable | None = None,
    say: Callable[[str], None] | None = None,
    channels_last: bool = False,
    feature_cache=None,
    image_cache=None,
    allow_dataset_mismatch: bool = False,
    support_control: str = "none",
) -> dict:
    """Evaluate one model file at ``shot`` shots and ``ways`` ways and write the JSON (and the figure).

    ``feature_cache`` (a ``FeatureCache`` or None) is shared by the calls of one command;
    the report gets its counters for this evaluation under ``feature_cache``. A model file
    imported for another dataset is refused unless ``allow_dataset_mismatch``. ``support_control``:
    ``fss.evaluation.SUPPORT_CONTROLS`` (the report records any but ``none``).
    """
    from fss.models.checkpoints import load_model_file
    from pipeline.runs import write_json
    from pipeline.tracking import Tracker, log_evaluation, model_artifact_name, run_name

    say = say or (lambda m: None)
    model, meta = load_model_file(model_path, shot=shot, ways=ways, dataset=dataset,
                                  allow_dataset_mismatch=allow_dataset_mismatch)
    if meta.get("dataset") not in (None, dataset):
        say(f"warning: {model_path} was imported for {meta['dataset']}, evaluated on {dataset} "
            f"(--allow-dataset-mismatch).")
    model = model.to(device)
    tracker = Tracker(
        enabled=tracking.wandb, project=tracking.project, entity=tracking.entity,
        group=f"{meta['method']}-{dataset}-{meta['backbone']}-{group_shot}shot", job_type="evaluate",
        name=run_name(meta["method"], dataset, fold, shot), init_timeout=tracking.init_timeout, warn=say,
        config={"method": meta["method"], "dataset": dataset, "backbone": meta["backbone"], "fold": fold,
                "shot": shot, "train_shot": meta.get("shot"), "knobs": meta.get("knobs", {}),
                "protocol": protocol.describe(), "checkpoint": str(model_path), "selection": selection},
    )
    tracker.use_model(model_path, model_artifact_name(meta["method"], dataset, meta["backbone"], meta.get("shot"), fold))
    cache_before = feature_cache.stats.as_dict() if feature_cache is not None else None
    images_before = image_cache.stats() if image_cache is not None else None
    start = time.monotonic()
    n_samples = max(figure_episodes if figure is not None else 0, tracking.images if tracker.active else 0)
    result = evaluate_model(
        model, data, protocol, shot=shot, device=device, batch_size=batch_size, num_workers=num_workers,
        precision=precision, ways=ways, sample_episodes=n_samples, track=track,
        description=f"evaluate {meta['method']} fold {fold} {shot}-shot", channels_last=channels_last,
        feature_cache=feature_cache, support_control=support_control, image_cache=image_cache,
    )
    seconds = time.monotonic() - start
    cache_counts = None if feature_cache is None else {
        k: v - cache_before[k] for k, v in feature_cache.stats.as_dict().items()}
    samples = result.pop("samples")
    report = _report(result, meta=meta, dataset=dataset, fold=fold, shot=shot, ways=ways, protocol=protocol,
                     model_path=model_path, selection=selection, run_dir=run_dir, data=data, device=device,
                     precision=precision, channels_last=channels_last, seconds=seconds, cache_counts=cache_counts)
    if figure is not None and figure_episodes > 0 and samples:
        from pipeline.figures import episode_figure

        title = (f"{meta['method']} {dataset} fold {fold} {shot}-shot ({protocol.name}): "
                 f"mIoU {100 * report['miou']:.1f}, FB-IoU {100 * report['fb_iou']:.1f}")
        episode_figure(samples[:figure_episodes], figure, title=title, class_names=_class_names(data))
        report["figure"] = str(figure)
    if image_cache is not None:  # each test image read and resized once: misses = distinct images
        report["image_cache"] = {k: v - images_before[k] if k in ("hits", "misses", "evictions") else v
                                 for k, v in image_cache.stats().items()}
    write_json(out, report)
    log_evaluation(tracker, report, _class_names(data))
    if samples and tracker.active:
        tracker.images("predictions", [
            {"image": s["query"], "prediction": s["prediction"], "ground_truth": s["ground_truth"],
             "caption": f"episode {s['episode']} class {s['class_id']}"}
            for s in samples[: tracking.images]
        ])
    tracker.finish()
    return report


def _report(result: dict, *, meta: dict, dataset: str, fold: int, shot: int, ways: int, protocol, model_path: Path,
            selection: str, run_dir: Path | None, data, device, precision: str, channels_last: bool,
            seconds: float, cache_counts: dict | None) -> dict:
    """The evaluation JSON of one model at one shot count (format in the module docstring)."""
    report = {
        "kind": EVAL_KIND,
        "version": EVAL_VERSION,
        "method": meta["method"],
        "dataset": dataset,
        "backbone": meta["backbone"],
        "fold": int(fold),
        "shot": int(shot),
        "train_shot": meta.get("shot"),
        "ways": ways,
        "knobs": meta.get("knobs", {}),
        "miou": result["miou"],
        "fb_iou": result["fb_iou"],
        "class_iou": {str(k): v for k, v in result.get("class_iou", {}).items()},
        "episodes": result["episodes"],
        "num_runs": len(result["runs"]),
        "runs": [
            {"seed": r["seed"], "miou": r["miou"], "fb_iou": r["fb_iou"], "episodes": r["episodes"],
             "class_iou": {str(k): v for k, v in r["class_iou"].items()},
             "class_episodes": {str(k): v for k, v in r["class_episodes"].items()},
             "missing_classes": r.get("missing_classes", [])}
            for r in result["runs"]
        ],
        "class_episodes": {str(k): v for k, v in result["class_episodes"].items()},
        "protocol": protocol.name,
        "protocol_options": protocol.describe(),
        "checkpoint": str(model_path),
        "checkpoint_selection": selection,
        "checkpoint_source": meta.get("source", ""),
        "run_dir": str(run_dir) if run_dir is not None else None,
        "data_root": str(data.root),
        "convention": data.convention,
        "novel_classes": list(data.novel_classes),
        "device": str(device),
        "precision": precision,
        "channels_last": channels_last,
        "seconds": round(seconds, 3),
    }
    if cache_counts is not None:
        report["feature_cache"] = cache_counts
    if "support_control" in result:  # absent for the default "none": those reports are unchanged
        report["support_control"] = result["support_control"]
    if len(result["runs"]) > 1:
        report["miou_std"] = result["miou_std"]
        report["fb_iou_std"] = result["fb_iou_std"]
        if "class_iou_std" in result:
            report["class_iou_std"] = {str(k): v for k, v in result["class_iou_std"].items()}
    return report


def small_metrics(report: dict) -> dict:
    """The few numbers of a table row (DVC metrics): mIoU and FB-IoU as fractions, method, fold,
    shot and episode count, plus the standard deviations over runs when there are several."""
    keys = ("method", "fold", "shot", "episodes", "miou", "fb_iou", "miou_std", "fb_iou_std")
    small = {k: report[k] for k in keys if k in report}
    if "support_control" in report:
        small["support_control"] = report["support_control"]["name"]
    return small


def metrics_path(out: Path) -> Path:
    """``evals/m/fold0-1shot.json`` -> ``evals/m/fold0-1shot.metrics.json``."""
    stem = out.name[: -len(".json")] if out.name.endswith(".json") else out.name
    return out.with_name(stem + ".metrics.json")


def _class_names(data) -> dict[int, str]:
    names = data.meta.get("class_names") or []
    return {i + 1: n for i, n in enumerate(names)}


# ---------------------------------------------------------------- the command


def _make_feature_cache(test_cfg, enabled: bool | None, directory: Path | None, megabytes: int | None):
    """The evaluation feature cache of one ``fss evaluate`` (CLI options over ``test.*``), or None."""
    from fss.models.feature_cache import FeatureCache

    if not (test_cfg.feature_cache if enabled is None else enabled):
        return None
    mb = test_cfg.feature_cache_mb if megabytes is None else megabytes
    if mb < 1:
        raise ConfigError(f"--feature-cache-mb {mb} must be at least 1 (MiB); use --no-feature-cache to turn it off.")
    directory = directory if directory is not None else test_cfg.feature_cache_dir
    if directory is not None:
        try:
            Path(directory).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot use feature cache directory {directory} ({exc.strerror or exc}); "
                              f"give a writable directory or leave --feature-cache-dir out.") from None
    return FeatureCache(max_bytes=int(mb) << 20, directory=directory)


def _run_source(run: Path, checkpoint: str, device: str | None, num_workers: int | None) -> dict:
    """What `fss evaluate --run` scores: the run's weights, data and settings."""
    from pipeline import runs as R

    rd = R.RunDir(run)
    config = rd.load_config()
    names = {"selected": R.MODEL_SELECTED, "last": R.MODEL_LAST, "best": R.MODEL_BEST}
    model_path = rd.file(names[checkpoint])
    if not model_path.is_file():
        raise CheckpointError(
            f"{model_path} does not exist; the run is not finished (rerun its 'fss train' command)"
            + (" or it had no validation (validation.select: best)." if checkpoint == "best" else ".")
        )
    selection = checkpoint
    if checkpoint == "selected":
        summary_file = rd.file(R.SUMMARY_FILE)
        selection = R.read_json(summary_file, "run summary").get("selected", "last") if summary_file.is_file() else "last"
    ds_name, fold_, root_, conv = config.dataset, config.fold, Path(config.data.root), config.data.convention
    test_cfg, tracking = config.test, config.tracking
    if device is None:
        device = config.train.device
    workers = config.test.num_workers if config.test.num_workers is not None else config.data.num_workers
    workers = workers if num_workers is None else num_workers
    precision = config.train.precision
    channels_last = config.train.channels_last
    group_shot = config.shot
    cache = config.data.cache_images
    return dict(model_path=model_path, selection=selection, ds_name=ds_name, fold_=fold_, root_=root_, conv=conv,
                test_cfg=test_cfg, tracking=tracking, device=device, workers=workers, precision=precision,
                channels_last=channels_last, group_shot=group_shot, cache=cache)


def _model_source(model: Path, dataset: str | None, root: Path | None, fold: int | None, convention: str | None,
                  num_workers: int | None, params: Path | None, device: str | None) -> dict:
    """What `fss evaluate --model` scores: an imported model file on the given prepared data."""
    from fss.data.classes import check_dataset, check_fold
    from pipeline.config import build_section, eval_defaults, layered_values, load_params, tracking_defaults

    if dataset is None or root is None or fold is None:
        raise ConfigError("--model needs --dataset, --root and --fold.")
    check_dataset(dataset)
    check_fold(fold)
    model_path, selection = model, "imported"
    p, _ = load_params(params)
    ds_name, fold_, root_, conv = dataset, fold, root, convention
    test_cfg, tracking = eval_defaults(p, dataset), tracking_defaults(p, dataset)
    workers = num_workers if num_workers is not None else (test_cfg.num_workers or 0)
    precision = "fp32"
    channels_last = False
    group_shot = None
    cache = build_section("data", layered_values(p, None, dataset).get("data")).cache_images
    return dict(model_path=model_path, selection=selection, ds_name=ds_name, fold_=fold_, root_=root_, conv=conv,
                test_cfg=test_cfg, tracking=tracking, device=device, workers=workers, precision=precision,
                channels_last=channels_last, group_shot=group_shot, cache=cache)


def _check_model_file(model: Path, dataset: str, ways: int, allow_dataset_mismatch: bool) -> None:
    """Refuse a --model file recorded for another dataset, or one that cannot do ``ways`` ways,
    before the data is opened (the loader checks the same again)."""
    from fss.models.checkpoints import check_model_dataset, read_model_file, with_eval_ways

    blob = read_model_file(model)
    check_model_dataset(blob, model, dataset, allow_dataset_mismatch)
    with_eval_ways(blob["method"], blob["knobs"], ways, model)


def _check_arguments(run, model, shot, checkpoint: str, out, model_only: tuple, support_control: list[str]) -> None:
    """Refuse, in one line, argument combinations ``fss evaluate`` cannot run."""
    if (run is None) == (model is None):
        raise ConfigError("give either --run RUN_DIR or --model FILE (with --dataset, --root and --fold).")
    for k in shot:
        if k < 1:
            raise ConfigError(f"--shot {k} must be a positive integer.")
    if checkpoint not in ("selected", "last", "best"):
        raise ConfigError(f"--checkpoint {checkpoint!r}; choose one of: selected, last, best.")
    if run is not None and any(v is not None for v in model_only):
        raise ConfigError("--dataset/--root/--fold/--convention go with --model; a run directory knows its data.")
    if len(shot) > 1 and out is not None and "{shot}" not in str(out):
        raise ConfigError(f"--out {out} must contain {{shot}} when several --shot values are given.")
    for control in support_control:
        if control not in SUPPORT_CONTROLS:
            raise ConfigError(f"--support-control {control!r}; choose one of: {', '.join(SUPPORT_CONTROLS)}.")
    if len(set(support_control)) < len(support_control) or len(set(shot)) < len(shot):
        raise ConfigError(f"--shot {list(shot)} and --support-control {list(support_control)} must not repeat a value.")


def _make_image_cache(test_cfg, workers: int) -> TestImageCache | None:
    """The test-image cache of one ``fss evaluate`` (loading in the main process), or None."""
    return TestImageCache(test_cfg.image_cache_mb) if test_cfg.image_cache_mb > 0 and workers == 0 else None


def _announce(report: dict, control: str, protocol: str, out: Path) -> dict:
    """Print one evaluation's line; returns its entry of the command's JSON output."""
    console.print(
        f"[green]{report['method']}[/green] fold {report['fold']} {report['shot']}-shot"
        f"{'' if control == 'none' else f', {control} support'} ({protocol}, {report['episodes']} episodes"
        f"{', %d runs' % report['num_runs'] if report['num_runs'] > 1 else ''}): "
        f"mIoU {100 * report['miou']:.2f}  FB-IoU {100 * report['fb_iou']:.2f} -> {out}",
        highlight=False, soft_wrap=True,
    )
    return ({k: v for k, v in small_metrics(report).items() if k != "fb_iou_std"}
            | {"dataset": report["dataset"], "protocol": protocol, "checkpoint": report["checkpoint"]})


#: the options a run's evaluation passes on to each run's own command (flag: option name)
FOLD_OPTIONS = {"shot": "--shot", "protocol": "--protocol", "episodes": "--episodes", "seed": "--seed", "runs": "--runs",
                "size": "--size", "out": "--out", "figure": "--figure", "checkpoint": "--checkpoint", "ways": "--ways",
                "support_control": "--support-control", "device": "--device", "batch_size": "--batch-size",
                "num_workers": "--num-workers", "params": "--params", "feature_cache_dir": "--feature-cache-dir",
                "feature_cache_mb": "--feature-cache-mb", "wandb": "--wandb", "feature_cache": "--feature-cache"}


def fold_evaluate_args(runs: list[Path], options: dict) -> list[str]:
    """The `fss evaluate` arguments that evaluate ``runs`` one after another in one process (--slots 1)."""
    args = ["evaluate", *(a for r in runs for a in ("--run", str(r))), "--slots", "1", "--engine", "local"]
    for name, flag in FOLD_OPTIONS.items():
        value = options[name]
        if value is None:
            continue
        if isinstance(value, bool):
            args.append(flag if value else flag.replace("--", "--no-", 1))
        elif isinstance(value, list):
            args += [a for v in value for a in (flag, str(v))]
        else:
            args += [flag, str(value)]
    return args


def evaluate_folds(runs: list[Path], options: dict, *, slots: str | None, engine: str | None,
                   say: Callable[[str], None]) -> None:
    """Evaluate ``runs``: at once on this machine's slots, as submitit jobs, or one after another (pipeline.parallel)."""
    if options["out"] is not None and "{fold}" not in str(options["out"]) or len(set(runs)) < len(runs):
        raise ConfigError("several --run need distinct run directories and {fold} in --out, e.g. --out evals/M/fold{fold}-{shot}shot.json.")
    configs = {r: RunDir(r).load_config() for r in runs}
    folds = {r: c.fold for r, c in configs.items()}

    def one(run: Path) -> None:
        filled = {k: (str(v).replace("{fold}", str(folds[run])) if k in ("out", "figure") and v is not None else v)
                  for k, v in options.items()}
        evaluate_command(run=[run], model=None, dataset=None, root=None, fold=None, convention=None,
                         allow_dataset_mismatch=False, slots="1", engine="local",
                         **{k: (Path(v) if k in ("out", "figure") and v is not None else v) for k, v in filled.items()})

    device = options["device"] or configs[runs[0]].train.device
    P.run_folds(runs, name=lambda r: f"fold {folds[r]}", command=lambda share: fold_evaluate_args(share, options),
                run_one=one, what="evaluate", device=device, threads=0, params=options["params"], slots=slots,
                engine=engine, say=say)


def evaluate_command(
    run: Optional[list[Path]] = typer.Option(None, "--run", help="Run directory of 'fss train'; repeat for several, "
                                             "evaluated at once (--out then contains {fold}; see --slots)."),
    shot: list[int] = typer.Option([1], "--shot", help="Shots at test time; repeat for several (--shot 1 --shot 5)."),
    protocol: Optional[str] = typer.Option(None, help="pfenet, bam, hsnet, panet or canet (default: the run's test.protocol)."),
    episodes: Optional[int] = typer.Option(None, help="Episodes per run (default: the protocol's, or test.episodes)."),
    seed: Optional[int] = typer.Option(None, help="Episode seed S (runs use S, S+1, ...; default: the protocol's)."),
    runs: Optional[int] = typer.Option(None, help="Number of runs (default: the protocol's)."),
    size: Optional[int] = typer.Option(None, help="Test input side (default: the protocol's, or test.size)."),
    out: Optional[Path] = typer.Option(None, help="JSON file to write; may contain {shot} and {protocol} (default: RUN_DIR/eval-<protocol>-<K>shot.json)."),
    figure: Optional[Path] = typer.Option(None, help="PNG of sample episodes (default: the JSON path with .png)."),
    checkpoint: str = typer.Option("selected", help="Which weights of the run: selected (model.pt), last or best."),
    model: Optional[Path] = typer.Option(None, "--model", help="An imported model file ('fss checkpoint import') instead of --run."),
    dataset: Optional[str] = typer.Option(None, help="With --model: pascal, coco or synthetic."),
    root: Optional[Path] = typer.Option(None, help="With --model: prepared dataset directory."),
    fold: Optional[int] = typer.Option(None, help="With --model: fold 0..3."),
    convention: Optional[str] = typer.Option(None, help="With --model on COCO: interleaved or contiguous."),
    ways: int = typer.Option(1, help="Ways per episode (N-way needs the panet protocol; PANet Table 3)."),
    support_control: list[str] = typer.Option(
        ["none"], "--support-control",
        help="none, or shifted: score each episode with the previous episode's support, a control for whether "
             "the method uses its support; repeat for several (every shot with each). The JSON of a control "
             "other than none gets '-<control>-support' before .json, with or without --out."),
    allow_dataset_mismatch: bool = typer.Option(
        False, "--allow-dataset-mismatch",
        help="With --model: evaluate a file imported for another dataset (e.g. COCO pyramid bins on PASCAL)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda (default: the run's train.device)."),
    batch_size: Optional[int] = typer.Option(None, help="Episodes per forward pass (default: test.batch_size)."),
    num_workers: Optional[int] = typer.Option(None, help="DataLoader workers (default: data.num_workers)."),
    wandb: Optional[bool] = typer.Option(None, "--wandb/--no-wandb", help="Log to W&B (default: tracking.wandb)."),
    params: Optional[Path] = typer.Option(None, help="Params file for --model defaults (default ./params.yaml)."),
    feature_cache: Optional[bool] = typer.Option(
        None, "--feature-cache/--no-feature-cache",
        help="Reuse the frozen backbone's features of an image across episodes and shots of this command "
             "(identical metrics; default: test.feature_cache, on)."),
    feature_cache_dir: Optional[Path] = typer.Option(
        None, "--feature-cache-dir",
        help="Also keep the features on disk in DIR for later evaluations of the same weights, e.g. sweep "
             "trials (default: test.feature_cache_dir, none; not size-bounded)."),
    feature_cache_mb: Optional[int] = typer.Option(
        None, "--feature-cache-mb", help="Memory bound of the feature cache in MiB (default: test.feature_cache_mb, 2048)."),
    slots: Optional[str] = typer.Option(None, help="With several --run: runs at once on this machine: auto (one per GPU, "
                                        "or one per CPU core) or N (default: params benchmark.slots, auto)."),
    engine: Optional[str] = typer.Option(None, help="With several --run: local (processes on this machine's slots) or "
                                         "submitit (a job per run, resources from params 'cluster'; default: params "
                                         "benchmark.engine, local)."),
) -> None:
    """Evaluate a trained run (or several at once) or an imported model under a test protocol; writes JSON + PNG."""
    say = lambda m: console.print(m, highlight=False, markup=False, soft_wrap=True)  # noqa: E731
    if run and (len(run) > 1 or "{fold}" in str(out)):
        options = {k: v for k, v in locals().items() if k in FOLD_OPTIONS}
        return evaluate_folds(run, options, slots=slots, engine=engine, say=say)
    run = run[0] if run else None
    _check_arguments(run, model, shot, checkpoint, out, (dataset, root, fold, convention), support_control)
    if run is not None:
        src = _run_source(run, checkpoint, device, num_workers)
    else:
        src = _model_source(model, dataset, root, fold, convention, num_workers, params, device)
        _check_model_file(model, dataset, ways, allow_dataset_mismatch)
    model_path, selection, ds_name, fold_, root_, conv = (src[k] for k in (
        "model_path", "selection", "ds_name", "fold_", "root_", "conv"))
    test_cfg, tracking, device, workers, precision, channels_last, group_shot, cache = (src[k] for k in (
        "test_cfg", "tracking", "device", "workers", "precision", "channels_last", "group_shot", "cache"))
    if wandb is not None:
        tracking = dataclasses.replace(tracking, wandb=wandb)
    dev = resolve_device(device or "auto")
    warning = bf16_cpu_warning(precision, dev)
    if warning:
        say(warning)
    name = protocol or test_cfg.protocol
    proto = make_protocol(
        name, ds_name, episodes=episodes if episodes is not None else test_cfg.episodes,
        size=size if size is not None else test_cfg.size, runs=runs if runs is not None else test_cfg.runs, seed=seed,
    )
    data = open_prepared(root_, fold_, "val", conv, dataset=ds_name, cache=cache)
    if cache and workers > 0:
        data.preload()
    bs = batch_size or test_cfg.batch_size
    fcache = _make_feature_cache(test_cfg, feature_cache, feature_cache_dir, feature_cache_mb)
    icache = _make_image_cache(test_cfg, workers)
    reports = []
    for control, k in ((c, k) for c in support_control for k in shot):
        out_k, fig_k = _output_paths(out, figure, run, model, name, k, control)
        report = evaluate_one(
            model_path=model_path, selection=selection, method_meta=None, data=data, dataset=ds_name, fold=fold_,
            shot=k, protocol=proto, device=dev, batch_size=bs, num_workers=workers, precision=precision,
            ways=ways, out=out_k, figure=fig_k, figure_episodes=test_cfg.figure_episodes, tracking=tracking,
            run_dir=run, group_shot=group_shot or k, track=track, say=say, channels_last=channels_last,
            feature_cache=fcache, allow_dataset_mismatch=allow_dataset_mismatch, support_control=control,
            image_cache=icache,
        )
        write_json(metrics_path(out_k), small_metrics(report))
        reports.append(_announce(report, control, name, out_k))
    typer.echo(json.dumps(reports if len(reports) > 1 else reports[0], sort_keys=True))
