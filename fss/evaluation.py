"""Scoring a model on a protocol's test episodes: the evaluation loop shared by training
(validation), `fss evaluate` and the sweeps.

The protocol (``fss.data.protocols``) fixes the episodes, seeds and runs, the test input
size and where predictions are scored; mIoU and FB-IoU come from ``fss.metrics.IoUMeter``.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from fss.data.episodes import EpisodeLoader
from fss.data.protocols import protocol_preset
from fss.data.scoring import original_resolution_pairs
from fss.data.transforms import denormalize
from fss.errors import ConfigError
from fss.layout import channels_last_images
from fss.metrics import IoUMeter, summarize_runs
from fss.precision import autocast

#: the ``kind`` of an evaluation report (``fss evaluate``, validation and sweep trials)
EVAL_KIND = "fss-evaluation"

# ---------------------------------------------------------------- protocols


def make_protocol(name: str, dataset: str, *, episodes: int | None = None, size: int | None = None,
                  runs: int | None = None, seed: int | None = None):
    """A protocol preset with the given overrides.

    ``seed`` S replaces the preset's seeds by S, S+1, ... (one per run).
    """
    overrides: dict[str, Any] = {}
    if episodes is not None:
        overrides["episodes"] = int(episodes)
    if size is not None:
        overrides["size"] = int(size)
    if seed is not None:
        base = protocol_preset(name, dataset, **({"runs": runs} if runs else {}))
        overrides["seeds"] = tuple(int(seed) + r for r in range(base.runs))
    elif runs is not None:
        overrides["runs"] = int(runs)
    return protocol_preset(name, dataset, **overrides)


def validation_protocol(config):
    """The run's validation episodes: the test protocol's sampling/size with one run of
    ``validation.episodes`` episodes on seed ``validation.seed``."""
    return make_protocol(config.test.protocol, config.dataset, episodes=config.validation.episodes,
                         size=config.test.size, runs=1, seed=config.validation.seed)


# ---------------------------------------------------------------- the evaluation loop


def _logits_at(logits, size):
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)


#: ``evaluate_model``'s ``support_control``: ``none`` scores every episode with its own support;
#: ``shifted`` with the previous episode's (a control: a method that uses its support loses accuracy,
#: one that ignores it scores the same).
SUPPORT_CONTROLS = ("none", "shifted")


class ShiftedSupports:
    """``support_control='shifted'``: each batch's episodes get the support images and masks of
    the episode before them in run order (across batches; the run's first episode borrows its
    batch's last), labels and query unchanged. ``same_class`` counts the episodes whose
    borrowed support is of their own class (consecutive episodes may share one)."""

    def __init__(self) -> None:
        self.carry = None
        self.same_class = 0

    def __call__(self, batch: dict) -> dict:
        images, masks, classes = batch["support_images"], batch["support_masks"], batch["class_ids"]
        if self.carry is None:
            self.carry = (images[-1:], masks[-1:], classes[-1:])
        before, self.carry = self.carry, (images[-1:], masks[-1:], classes[-1:])
        borrowed = torch.cat([before[2], classes[:-1]])
        same = (borrowed.reshape(len(classes), -1) == classes.reshape(len(classes), -1)).all(dim=1)
        self.same_class += int(same.sum())
        return {**batch, "support_images": torch.cat([before[0], images[:-1]]),
                "support_masks": torch.cat([before[1], masks[:-1]])}


@dataclass(frozen=True)
class EvalSettings:
    """How a model runs on a protocol's episodes (the protocol says which episodes): shots and
    ways at test time, device, episodes per forward pass, loader workers, precision
    (``fss.precision``), channels-last layout and the support control (``SUPPORT_CONTROLS``).
    Validation, sweep trials and ``fss evaluate`` build it from a run's config with
    ``pipeline.eval_report.run_settings``."""

    shot: int = 1
    ways: int = 1
    device: Any = "cpu"
    batch_size: int = 1
    num_workers: int = 0
    precision: str = "fp32"
    channels_last: bool = False
    support_control: str = "none"

    def __post_init__(self) -> None:
        if self.support_control not in SUPPORT_CONTROLS:
            raise ConfigError(f"support_control={self.support_control!r} is unknown; "
                              f"choose one of: {', '.join(SUPPORT_CONTROLS)}.")
        object.__setattr__(self, "device", torch.device(self.device))


def evaluate_model(
    model,
    data,
    protocol,
    settings: EvalSettings,
    *,
    sample_episodes: int = 0,
    track: Callable | None = None,
    description: str = "evaluate",
    feature_cache=None,
    image_cache=None,
) -> dict:
    """Run every run of ``protocol`` on ``data`` (the fold's val list) under ``settings``; the
    IoUMeter results: the one scoring loop of validation, sweep trials and ``fss evaluate``.

    ``settings.support_control`` ``shifted`` scores each episode with the previous episode's
    support (:class:`ShiftedSupports`); the summary then has ``support_control`` =
    {name, same_class_episodes} of run 0.

    ``feature_cache``: a :class:`fss.models.feature_cache.FeatureCache` that serves the frozen
    backbone's outputs of images seen before (identical metrics; None = compute every time).
    ``image_cache``: a :class:`fss.data.episodes.TestImageCache` that reads and resizes each
    test image once for every episode, shot and control (identical samples; None: every time).

    Every run's result has its ``episode_counts`` (:class:`fss.uncertainty.EpisodeCounts`, one
    row per episode, keyed by :func:`episodes_key`) for bootstrap intervals and paired differences.

    Returns the :func:`fss.metrics.summarize_runs` summary plus ``episodes`` (per run),
    ``class_episodes`` (run 0) and ``samples`` (the first ``sample_episodes`` episodes of
    run 0, as uint8 images and label maps for the figure and W&B).
    """
    model.eval()
    device = settings.device
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    if device.type == "cuda":  # cuDNN autotuning unless deterministic algorithms were asked for
        torch.backends.cudnn.benchmark = not torch.are_deterministic_algorithms_enabled()
    results, samples, shifts = [], [], []
    for run in range(protocol.runs):
        shifts.append(ShiftedSupports() if settings.support_control == "shifted" else None)
        episodes = protocol.episode_dataset(data, settings.shot, run=run, ways=settings.ways, image_cache=image_cache)
        loader = EpisodeLoader(episodes, batch_size=settings.batch_size, shuffle=False,
                               num_workers=settings.num_workers, pin=device.type == "cuda",
                               generator=torch.Generator().manual_seed(0))
        batches = loader
        if track is not None:
            label = description if protocol.runs == 1 else f"{description} run {run + 1}/{protocol.runs}"
            batches = track(loader, label, len(loader))
        if shifts[-1] is not None:
            batches = map(shifts[-1], batches)
        cached = feature_cache.attached(model) if feature_cache is not None else contextlib.nullcontext()
        with torch.no_grad(), cached:
            meter = _score_run(model, batches, data, protocol, settings,
                               samples if run == 0 else None, sample_episodes)
        counts = meter.episode_table(episode_key=episodes_key(episodes.specs))
        results.append({**meter.compute(), "seed": protocol.seeds[run], "episode_counts": counts})
    summary = summarize_runs(results)
    summary["episodes"] = results[0]["episodes"]
    summary["class_episodes"] = results[0]["class_episodes"]
    summary["samples"] = samples
    if shifts[0] is not None:
        summary["support_control"] = {"name": settings.support_control, "same_class_episodes": shifts[0].same_class}
    return summary


def episodes_key(specs) -> str:
    """A digest of an episode list (queries, classes, supports): two reports with the same key
    scored the same episodes, so their difference can be paired episode by episode."""
    text = ";".join(f"{s.query}:{','.join(map(str, s.class_ids))}:{'|'.join(','.join(map(str, k)) for k in s.supports)}"
                    for s in specs)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _score_run(model, batches, data, protocol, settings: EvalSettings, samples: list | None, sample_episodes: int):
    """One run's episodes through the model into an IoUMeter (``samples`` collects pictures)."""
    device = settings.device
    layout = channels_last_images if settings.channels_last else (lambda t: t)
    meter = IoUMeter(data.novel_classes, ignore_index=protocol.ignore_index, keep_episodes=True)
    for batch in batches:
        with autocast(settings.precision, device):
            logits = model.predict(layout(batch["support_images"].to(device)), batch["support_masks"].to(device),
                                   layout(batch["query_images"].to(device)))
        logits = logits.float()
        class_ids = batch["class_ids"]
        if protocol.score_at_original:
            pairs = original_resolution_pairs(logits, batch["query_label_original"], batch["original_size"],
                                              protocol.resize)
            for b, (out, target) in enumerate(pairs):
                meter.update_batch(out.argmax(1), target, class_ids[b:b + 1])
        else:
            labels = batch["query_masks"].to(device)
            meter.update_batch(_logits_at(logits, labels.shape[-2:]).argmax(1), labels, class_ids)
        if samples is not None and len(samples) < sample_episodes:
            samples.extend(_samples(batch, logits, sample_episodes - len(samples)))
    return meter


def _samples(batch: dict, logits, count: int) -> list[dict]:
    """uint8 pictures of the first ``count`` episodes of a batch (way 0, support 0)."""
    out = []
    labels = batch["query_masks"]
    pred = _logits_at(logits, labels.shape[-2:]).argmax(1).cpu()
    for b in range(min(count, logits.shape[0])):
        s_img = batch["support_images"][b]
        s_mask = batch["support_masks"][b]
        while s_img.dim() > 3:
            s_img, s_mask = s_img[0], s_mask[0]

        def pic(t):
            return denormalize(t.float()).clamp(0, 255).round().byte().permute(1, 2, 0).numpy()

        cid = batch["class_ids"][b]
        out.append({
            "support": pic(s_img),
            "support_mask": s_mask.numpy().astype(np.uint8),
            "query": pic(batch["query_images"][b]),
            "ground_truth": labels[b].numpy().astype(np.uint8),
            "prediction": pred[b].numpy().astype(np.uint8),
            "class_id": int(cid.reshape(-1)[0]),
            "episode": int(batch["episode_index"][b]) if "episode_index" in batch else b,
        })
    return out
