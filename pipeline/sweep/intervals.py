"""The uncertainty of `fss sweep report`'s table: each grid point's validation mIoU with its 95%
bootstrap interval over the validation episodes, and its paired difference, on the same
episodes, against the study's baseline point (``--baseline``, default the first grid point,
e.g. lambda 0). A trial keeps the paths of its validation reports (``fss_reports``), whose
per-episode counts are resampled (``fss.uncertainty``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fss.errors import ConfigError
from fss.uncertainty import EpisodeCounts, bootstrap_mean, paired_difference
from pipeline.intervals import Bootstrap


def trial_counts(trials: list, shot: str, folds: list[str]) -> list[list[EpisodeCounts]] | None:
    """The folds' episode counts of a point's first trial that kept its validation reports."""
    for t in trials:
        paths = (t.user_attrs.get("fss_reports") or {}).get(shot, {})
        if all(f in paths and Path(paths[f]).is_file() for f in folds):
            return [[EpisodeCounts.from_json(r["episode_counts"], source=paths[f])
                     for r in json.loads(Path(paths[f]).read_text())["runs"]] for f in folds]
    return None


def _mean_column(shot: str, multi: bool) -> str:
    return f"{shot}-shot mean" if multi else "mean"


def add_intervals(rows: list[dict], counts: list[dict], shots: list[str], multi: bool, baseline: str | None,
                  labels: list[str], boot: Bootstrap = Bootstrap()) -> None:
    """Add to each row, per shot, ``<mean> ±`` (half the interval's width), ``<mean> low``/``high``
    and the paired difference against the baseline row (``vs <label>``, its ``low``/``high`` and
    ``contains 0``), in mIoU points. ``counts[i][shot]``: row i's fold counts or None."""
    if baseline is not None and baseline not in labels:
        raise ConfigError(f"--baseline {baseline!r} is not a row of the table; choose one of: {', '.join(labels)}.")
    ref = labels.index(baseline) if baseline is not None else 0
    for row, per_shot in zip(rows, counts):
        for s in shots:
            col = _mean_column(s, multi)
            folds = per_shot.get(s)
            if folds is None:
                continue
            iv = bootstrap_mean(folds, boot.replicates, boot.seed)
            row[f"{col} ±"] = 100 * (iv.high - iv.low) / 2
            row[f"{col} low"], row[f"{col} high"] = 100 * iv.low, 100 * iv.high
            base = counts[ref].get(s)
            if base is None:
                continue
            diff = paired_difference(folds, base, boot.replicates, boot.seed)
            key = f"{col} vs {labels[ref]}"
            row[key], row[f"{key} low"], row[f"{key} high"] = 100 * diff.estimate, 100 * diff.low, 100 * diff.high
            row[f"{key} contains 0"] = bool(diff.contains_zero)


def difference_text(row: dict[str, Any], key: str) -> str:
    """``+0.3 [-1.0, +1.6] °`` (° = the interval contains 0) of a row's paired difference."""
    if row.get(key) is None:
        return "-"
    mark = " °" if row.get(f"{key} contains 0") else ""
    return f"{row[key]:+.1f} [{row[f'{key} low']:+.1f}, {row[f'{key} high']:+.1f}]{mark}"
