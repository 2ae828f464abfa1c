"""The uncertainty of `fss aggregate`'s tables, from the reports' per-episode counts.

Every evaluation report keeps each run's per-episode intersections and unions
(``pipeline.eval_report``); :mod:`fss.uncertainty` resamples them. Here:

* :func:`cell_intervals`: a 95% percentile-bootstrap interval for every table cell (one fold,
  one setting) and for every mean over folds (each fold's episodes resampled independently).
  With several training seeds of a row (reports of runs with different ``train.seed`` under
  the aggregated folder), a cell is the mean over the seeds and ``seed_std`` the population
  standard deviation over seeds of the mean over folds: the training variance the episode
  bootstrap does not see.
* :func:`differences`: paired differences on the same episodes, with their intervals:
  each method against its base (the registry's ``base``: APANet, CELP and DPNet-PFENet against
  PFENet; SimPropNet and DPNet-CANet against CANet), each trained method against the floor
  (the training-free methods), and each method's own support against the support control
  (``shifted``: the same queries with the previous episode's support). ``contains_zero``
  marks a difference whose interval contains 0: not resolved by these episodes.

Rows are table labels (``pipeline.aggregate``); values are in mIoU points (%).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fss.errors import ConfigError
from fss.models.registry import get_method, list_methods, training_free_methods
from fss.uncertainty import DEFAULT_REPLICATES, DEFAULT_SEED, EpisodeCounts, bootstrap_mean, paired_difference

INTERVAL_COLUMNS = ["dataset", "backbone", "protocol", "row", "setting", "fold", "miou", "low", "high", "seeds",
                    "seed_std"]
DIFFERENCE_COLUMNS = ["dataset", "backbone", "protocol", "setting", "row", "versus", "comparison", "folds",
                      "difference", "low", "high", "contains_zero"]
MEAN = "Mean"


@dataclass(frozen=True)
class Bootstrap:
    """Replicates and seed of the aggregate's intervals (``fss aggregate --bootstrap-*``)."""

    replicates: int = DEFAULT_REPLICATES
    seed: int = DEFAULT_SEED


def load_counts(sources) -> dict[str, list[EpisodeCounts] | None]:
    """Each report's per-run episode counts (None for a report written without them)."""
    counts = {}
    for source in sources:
        runs = json.loads(Path(source).read_text()).get("runs", [])
        tables = [r.get("episode_counts") for r in runs]
        counts[source] = None if not tables or any(t is None for t in tables) else [
            EpisodeCounts.from_json(t, source=str(source)) for t in tables]
    return counts


def _folds(cell: pd.DataFrame, counts: dict) -> list[list[EpisodeCounts]] | None:
    """The fold groups of a (row, setting): per fold, every run of every seed's report."""
    groups = []
    for _, g in cell.groupby("fold", sort=True):
        runs = [t for s in g["source"] for t in (counts.get(s) or [])]
        if any(counts.get(s) is None for s in g["source"]):
            return None
        groups.append(runs)
    return groups


def _seed_std(cell: pd.DataFrame) -> tuple[int, float]:
    seeds = cell["train_seed"].dropna().unique()
    if len(seeds) < 2:
        return max(len(seeds), 1), math.nan
    means = cell.groupby("train_seed")["miou"].mean()
    return len(seeds), float(100 * means.std(ddof=0))


def cell_intervals(df: pd.DataFrame, counts: dict, boot: Bootstrap = Bootstrap()) -> pd.DataFrame:
    """One row per (table, row, setting, fold or ``Mean``): mIoU, the interval's ends, seeds (%)."""
    out = []
    for (dataset, backbone, protocol, row, setting), cell in df.groupby(
            ["dataset", "backbone", "protocol", "row", "setting"], sort=True):
        where = dict(dataset=dataset, backbone=backbone, protocol=protocol, row=row, setting=setting)
        seeds, seed_std = _seed_std(cell)
        for fold, g in cell.groupby("fold", sort=True):
            groups = _folds(g, counts)
            iv = bootstrap_mean(groups, boot.replicates, boot.seed) if groups else None
            out.append(where | _interval(fold, 100 * g["miou"].mean(), iv, seeds, math.nan))
        groups = _folds(cell, counts)
        iv = bootstrap_mean(groups, boot.replicates, boot.seed) if groups else None
        mean = 100 * cell.groupby("fold")["miou"].mean().mean()
        out.append(where | _interval(MEAN, mean, iv, seeds, seed_std))
    return pd.DataFrame(out, columns=INTERVAL_COLUMNS)


def _interval(fold, miou: float, iv, seeds: int, seed_std: float) -> dict:
    low, high = (100 * iv.low, 100 * iv.high) if iv is not None else (math.nan, math.nan)
    return {"fold": fold, "miou": miou, "low": low, "high": high, "seeds": seeds, "seed_std": seed_std}


def half_widths(intervals: pd.DataFrame, group: tuple) -> dict:
    """``{(row, setting, "Fold-k" | "Mean"): (half the interval's width, seed std)}`` of one table."""
    dataset, backbone, protocol = group
    sel = intervals[(intervals["dataset"] == dataset) & (intervals["backbone"] == backbone)
                    & (intervals["protocol"] == protocol)]
    return {(r.row, r.setting, r.fold if r.fold == MEAN else f"Fold-{r.fold}"): ((r.high - r.low) / 2, r.seed_std)
            for r in sel.itertuples()}


def comparisons(rows: set[str]) -> list[tuple[str, str, str]]:
    """(row, versus, comparison) pairs of the trained rows present: base, floor."""
    floors = [m for m in training_free_methods() if m in rows]
    pairs = []
    for method in list_methods():
        if method not in rows or method in floors:
            continue
        base = get_method(method).base
        if base is not None and base in rows:
            pairs.append((method, base, "base"))
        pairs += [(method, floor, "floor") for floor in floors]
    return pairs


def _pair(a: pd.DataFrame, b: pd.DataFrame, counts: dict, boot: Bootstrap):
    """Paired difference of two (row, setting) cells over their common folds, or None."""
    folds = sorted(set(a["fold"]) & set(b["fold"]))
    if not folds:
        return None, folds
    ga, gb = _folds(a[a["fold"].isin(folds)], counts), _folds(b[b["fold"].isin(folds)], counts)
    if ga is None or gb is None:
        return None, folds
    try:
        return paired_difference(ga, gb, boot.replicates, boot.seed), folds
    except ConfigError:  # not the same episodes (another protocol setting): no paired difference
        return None, folds


def differences(df: pd.DataFrame, counts: dict, boot: Bootstrap = Bootstrap()) -> pd.DataFrame:
    """Paired differences (module docstring), in mIoU points."""
    out = []
    for (dataset, backbone, protocol), g in df[df["variant"] == "trained"].groupby(
            ["dataset", "backbone", "protocol"], sort=True):
        where = dict(dataset=dataset, backbone=backbone, protocol=protocol)
        cells = {key: c for key, c in g.groupby(["row", "setting"])}
        own = [(r, s) for (r, s) in cells if " support" not in s]
        for setting in sorted({s for _, s in own}):
            for row, versus, kind in comparisons({r for r, s in own if s == setting}):
                out.append(_difference(where, setting, row, versus, kind, cells[(row, setting)],
                                       cells[(versus, setting)], counts, boot))
        for (row, setting), cell in sorted(cells.items()):
            if " support" in setting:  # own support against the control of the same shot
                base_setting = setting.split(" ", 1)[0]
                if (row, base_setting) in cells:
                    out.append(_difference(where, base_setting, row, row, f"own - {setting.split(' ', 1)[1]}",
                                           cells[(row, base_setting)], cell, counts, boot))
    return pd.DataFrame([r for r in out if r is not None], columns=DIFFERENCE_COLUMNS)


def _difference(where, setting, row, versus, kind, a, b, counts, boot) -> dict | None:
    iv, folds = _pair(a, b, counts, boot)
    if iv is None:
        return None
    return where | {"setting": setting, "row": row, "versus": versus, "comparison": kind, "folds": len(folds),
                    "difference": 100 * iv.estimate, "low": 100 * iv.low, "high": 100 * iv.high,
                    "contains_zero": bool(iv.contains_zero)}


def differences_markdown(diffs: pd.DataFrame) -> str:
    """One Markdown table per (dataset, backbone, protocol): the paired differences."""
    parts = []
    for (dataset, backbone, protocol), g in diffs.groupby(["dataset", "backbone", "protocol"], sort=True):
        lines = [f"**Paired differences of mIoU (points, 95% interval over episodes) — {dataset}, backbone "
                 f"{backbone}, protocol {protocol}; ° = the interval contains 0**", "",
                 "| Setting | Method | against | comparison | folds | difference | 95% interval |",
                 "|---|---|---|---|---:|---:|---:|"]
        for r in g.itertuples():
            mark = " °" if r.contains_zero else ""
            lines.append(f"| {r.setting} | {r.row} | {r.versus} | {r.comparison} | {r.folds} | "
                         f"{r.difference:+.1f}{mark} | [{r.low:+.1f}, {r.high:+.1f}] |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)
