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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from fss.data.access import open_prepared
from fss.data.classes import check_dataset, check_fold
from fss.data.episodes import TestImageCache
from fss.errors import CheckpointError, ConfigError
from fss.evaluation import SUPPORT_CONTROLS, EvalSettings, make_protocol
from fss.models.checkpoints import check_model_dataset, load_model_file, read_model_file, with_eval_ways
from fss.models.feature_cache import FeatureCache
from pipeline import parallel as P
from pipeline import runs as R
from pipeline.config import (
    bf16_cpu_warning,
    build_section,
    eval_defaults,
    layered_values,
    load_params,
    resolve_device,
    tracking_defaults,
)
from pipeline.console import console, track
from pipeline.eval_report import Interval, ScoredModel, metrics_path, run_settings, score, small_metrics
from pipeline.figures import episode_figure
from pipeline.runs import RunDir, write_json
from pipeline.tracking import Tracker, log_evaluation, model_artifact_name, run_name


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


@dataclass
class Evaluation:
    """What the evaluations of one ``fss evaluate`` share: the fold's data, the protocol, the
    caches, tracking and output settings (the model file and settings vary per evaluation)."""

    data: Any
    protocol: Any
    tracking: Any
    run_dir: Path | None = None
    group_shot: int | None = None  # the W&B group's shot: the run's training shot
    train_seed: int | None = None  # the run's train.seed (None for --model)
    figure_episodes: int = 0
    allow_dataset_mismatch: bool = False
    feature_cache: Any = None
    image_cache: Any = None
    interval: Interval = Interval()
    track: Callable | None = None
    say: Callable[[str], None] = lambda m: None


def evaluate_one(ev: Evaluation, model_path: Path, selection: str, settings: EvalSettings, out: Path,
                 figure: Path | None = None) -> dict:
    """Evaluate one model file under ``settings`` (shots, ways, support control) and write the
    report JSON (``pipeline.eval_report``) and the figure; returns the report.

    A model file imported for another dataset is refused unless ``ev.allow_dataset_mismatch``.
    """
    dataset, fold = ev.data.dataset, ev.data.fold
    model, meta = load_model_file(model_path, shot=settings.shot, ways=settings.ways, dataset=dataset,
                                  allow_dataset_mismatch=ev.allow_dataset_mismatch)
    if meta.get("dataset") not in (None, dataset):
        ev.say(f"warning: {model_path} was imported for {meta['dataset']}, evaluated on {dataset} "
               f"(--allow-dataset-mismatch).")
    info = ScoredModel.from_meta(meta, model_path, selection, ev.train_seed)
    tracker = _tracker(ev, info, settings.shot)
    tracker.use_model(model_path, model_artifact_name(info.method, dataset, info.backbone, info.train_shot, fold))
    n_samples = max(ev.figure_episodes if figure is not None else 0, ev.tracking.images if tracker.active else 0)
    report, samples = score(
        model.to(settings.device), info, ev.data, ev.protocol, settings, run_dir=ev.run_dir,
        sample_episodes=n_samples, track=ev.track, description=f"evaluate {info.method} fold {fold} {settings.shot}-shot",
        feature_cache=ev.feature_cache, image_cache=ev.image_cache, interval=ev.interval,
    )
    if figure is not None and ev.figure_episodes > 0 and samples:
        title = (f"{info.method} {dataset} fold {fold} {settings.shot}-shot ({ev.protocol.name}): "
                 f"mIoU {100 * report['miou']:.1f}, FB-IoU {100 * report['fb_iou']:.1f}")
        episode_figure(samples[:ev.figure_episodes], figure, title=title, class_names=_class_names(ev.data))
        report["figure"] = str(figure)
    write_json(out, report)
    log_evaluation(tracker, report, _class_names(ev.data))
    if samples and tracker.active:
        tracker.images("predictions", [
            {"image": s["query"], "prediction": s["prediction"], "ground_truth": s["ground_truth"],
             "caption": f"episode {s['episode']} class {s['class_id']}"}
            for s in samples[: ev.tracking.images]
        ])
    tracker.finish()
    return report


def _tracker(ev: Evaluation, info: ScoredModel, shot: int) -> Tracker:
    """The W&B run of one evaluation (grouped with its training run: method-dataset-backbone-shot)."""
    t, data = ev.tracking, ev.data
    return Tracker(
        enabled=t.wandb, project=t.project, entity=t.entity,
        group=f"{info.method}-{data.dataset}-{info.backbone}-{ev.group_shot or shot}shot", job_type="evaluate",
        name=run_name(info.method, data.dataset, data.fold, shot), init_timeout=t.init_timeout, warn=ev.say,
        config={"method": info.method, "dataset": data.dataset, "backbone": info.backbone, "fold": data.fold,
                "shot": shot, "train_shot": info.train_shot, "knobs": info.knobs,
                "protocol": ev.protocol.describe(), "checkpoint": info.checkpoint, "selection": info.selection},
    )


def _class_names(data) -> dict[int, str]:
    names = data.meta.get("class_names") or []
    return {i + 1: n for i, n in enumerate(names)}


# ---------------------------------------------------------------- the command


def _make_feature_cache(test_cfg, enabled: bool | None, directory: Path | None, megabytes: int | None):
    """The evaluation feature cache of one ``fss evaluate`` (CLI options over ``test.*``), or None."""
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


@dataclass(frozen=True)
class Source:
    """What ``fss evaluate`` scores: a model file, the data it is scored on and the settings
    that come with it (a run's config for ``--run``, params defaults for ``--model``)."""

    model_path: Path
    selection: str
    dataset: str
    fold: int
    root: Path
    convention: str | None
    test: Any  # the TestConfig section
    tracking: Any
    device: str
    precision: str = "fp32"
    channels_last: bool = False
    workers: int = 0
    group_shot: int | None = None
    cache_images: bool = False
    run_dir: Path | None = None
    train_seed: int | None = None


def _run_source(run: Path, checkpoint: str, device: str | None, num_workers: int | None) -> Source:
    """What `fss evaluate --run` scores: the run's weights, data and settings."""
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
    settings = run_settings(config, "cpu", num_workers=num_workers)
    return Source(model_path=model_path, selection=selection, dataset=config.dataset, fold=config.fold,
                  root=Path(config.data.root), convention=config.data.convention, test=config.test,
                  tracking=config.tracking, device=device or config.train.device, precision=settings.precision,
                  channels_last=settings.channels_last, workers=settings.num_workers, group_shot=config.shot,
                  cache_images=config.data.cache_images, run_dir=run, train_seed=int(config.train.seed))


def _model_source(model: Path, dataset: str | None, root: Path | None, fold: int | None, convention: str | None,
                  num_workers: int | None, params: Path | None, device: str | None) -> Source:
    """What `fss evaluate --model` scores: an imported model file on the given prepared data."""
    if dataset is None or root is None or fold is None:
        raise ConfigError("--model needs --dataset, --root and --fold.")
    check_dataset(dataset)
    check_fold(fold)
    p, _ = load_params(params)
    test_cfg = eval_defaults(p, dataset)
    return Source(model_path=model, selection="imported", dataset=dataset, fold=fold, root=root, convention=convention,
                  test=test_cfg, tracking=tracking_defaults(p, dataset), device=device or "auto",
                  workers=num_workers if num_workers is not None else (test_cfg.num_workers or 0),
                  cache_images=build_section("data", layered_values(p, None, dataset).get("data")).cache_images)


def _check_model_file(model: Path, dataset: str, ways: int, allow_dataset_mismatch: bool) -> None:
    """Refuse a --model file recorded for another dataset, or one that cannot do ``ways`` ways,
    before the data is opened (the loader checks the same again)."""
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


def _spread(report: dict) -> str:
    """`` [low, high]`` of the 95% interval and, with several runs, `` (std over runs s)``."""
    text = ""
    if "miou_interval" in report:
        iv = report["miou_interval"]
        text += f" [95% {100 * iv['low']:.2f}, {100 * iv['high']:.2f}]"
    if report["num_runs"] > 1:
        text += f" (std over runs {100 * report['miou_std']:.2f})"
    return text


def _announce(report: dict, control: str, protocol: str, out: Path) -> dict:
    """Print one evaluation's line; returns its entry of the command's JSON output."""
    console.print(
        f"[green]{report['method']}[/green] fold {report['fold']} {report['shot']}-shot"
        f"{'' if control == 'none' else f', {control} support'} ({protocol}, {report['episodes']} episodes"
        f"{', %d runs' % report['num_runs'] if report['num_runs'] > 1 else ''}): "
        f"mIoU {100 * report['miou']:.2f}{_spread(report)}  FB-IoU {100 * report['fb_iou']:.2f} -> {out}",
        highlight=False, soft_wrap=True,
    )
    return ({k: v for k, v in small_metrics(report).items() if k != "fb_iou_std"}
            | {"dataset": report["dataset"], "protocol": protocol, "checkpoint": report["checkpoint"]})


#: the options a run's evaluation passes on to each run's own command (flag: option name)
FOLD_OPTIONS = {"shot": "--shot", "protocol": "--protocol", "episodes": "--episodes", "seed": "--seed", "runs": "--runs",
                "size": "--size", "out": "--out", "figure": "--figure", "checkpoint": "--checkpoint", "ways": "--ways",
                "support_control": "--support-control", "device": "--device", "batch_size": "--batch-size",
                "num_workers": "--num-workers", "params": "--params", "feature_cache_dir": "--feature-cache-dir",
                "feature_cache_mb": "--feature-cache-mb", "wandb": "--wandb", "feature_cache": "--feature-cache",
                "bootstrap_replicates": "--bootstrap-replicates", "bootstrap_seed": "--bootstrap-seed"}


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
    bootstrap_replicates: Optional[int] = typer.Option(
        None, "--bootstrap-replicates", min=0, help="Bootstrap replicates of the 95% mIoU interval (resampled episodes; 0 = none; "
                                             "default: test.bootstrap_replicates, 2000)."),
    bootstrap_seed: Optional[int] = typer.Option(None, "--bootstrap-seed", min=0, help="Seed of the bootstrap (default: "
                                                 "test.bootstrap_seed, 0)."),
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
    dev = resolve_device(src.device)
    warning = bf16_cpu_warning(src.precision, dev)
    if warning:
        say(warning)
    name = protocol or src.test.protocol
    proto = make_protocol(
        name, src.dataset, episodes=episodes if episodes is not None else src.test.episodes,
        size=size if size is not None else src.test.size, runs=runs if runs is not None else src.test.runs, seed=seed,
    )
    data = open_prepared(src.root, src.fold, "val", src.convention, dataset=src.dataset, cache=src.cache_images)
    if src.cache_images and src.workers > 0:
        data.preload()
    tracking = src.tracking if wandb is None else dataclasses.replace(src.tracking, wandb=wandb)
    ev = Evaluation(data=data, protocol=proto, tracking=tracking, run_dir=run, group_shot=src.group_shot,
                    train_seed=src.train_seed,
                    figure_episodes=src.test.figure_episodes, allow_dataset_mismatch=allow_dataset_mismatch,
                    feature_cache=_make_feature_cache(src.test, feature_cache, feature_cache_dir, feature_cache_mb),
                    image_cache=_make_image_cache(src.test, src.workers), track=track, say=say,
                    interval=Interval(replicates=src.test.bootstrap_replicates if bootstrap_replicates is None
                                      else bootstrap_replicates,
                                      seed=src.test.bootstrap_seed if bootstrap_seed is None else bootstrap_seed))
    reports = []
    for control, k in ((c, k) for c in support_control for k in shot):
        out_k, fig_k = _output_paths(out, figure, run, model, name, k, control)
        settings = EvalSettings(shot=k, ways=ways, device=dev, batch_size=batch_size or src.test.batch_size,
                                num_workers=src.workers, precision=src.precision, channels_last=src.channels_last,
                                support_control=control)
        report = evaluate_one(ev, src.model_path, src.selection, settings, out_k, fig_k)
        write_json(metrics_path(out_k), small_metrics(report))
        reports.append(_announce(report, control, name, out_k))
    typer.echo(json.dumps(reports if len(reports) > 1 else reports[0], sort_keys=True))
