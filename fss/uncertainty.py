"""Per-episode counts and bootstrap intervals of mIoU and FB-IoU.

An evaluation's metric is a function of per-episode integers: for each episode, its classes
and, for each label (0 = background, j = the j-th way), the intersection and union after the
meter's ``absent_labels`` rule (see :mod:`fss.metrics`). :class:`EpisodeCounts` holds them
(``IoUMeter(..., keep_episodes=True).episode_table()``) and recomputes mIoU and FB-IoU
exactly as :meth:`fss.metrics.IoUMeter.compute` does (bit-identical floats).

Method
------
A **percentile bootstrap over episodes**. Each replicate draws E episode indices uniformly
with replacement from a run's E episodes, sums the drawn episodes' intersections and unions
per class, and recomputes the class-summed mIoU exactly as the metric (``sum I / sum U`` per
class, mean over the meter's classes, ``empty_class`` applied to a class the resample misses:
``"zero"`` scores it 0, ``"exclude"`` drops it from the mean, ``"error"`` raises). The
interval is the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the replicates
(``numpy.quantile``, linear). The point estimate is the metric of the data itself.

* Several runs (multi-run protocols): each run's episodes are resampled independently and
  the statistic is the mean over runs, as the reported number is.
* The mean over folds (:func:`bootstrap_mean`): each fold is resampled independently.
* Paired differences (:func:`paired_difference`): two reports on the same episodes are
  resampled with the same indices, so the episode-to-episode variation both share cancels.
* Seeds: replicate draws of fold f, run r come from ``SeedSequence([seed, f, r])`` (default
  seed 0), so a result does not depend on call order, and a fold's draws in
  :func:`bootstrap_mean` and :func:`paired_difference` are the same.

Why episodes: the episode is the unit the evaluation samples independently (classes, support
and query drawn afresh from the episode sampler's seed), and the metric pools pixels within an
episode and then within a class, so pixels of an episode are strongly correlated while
episodes are exchangeable draws. Resampling pixels would understate the variance; resampling
classes would ignore that the class counts of an evaluation are themselves random.

What it does not cover: the variance over **training runs** (seeds of training, data order,
augmentation), which is often the larger part; that needs several trained models and is not in
a single report. Nor does it cover the finite validation image set: episodes reuse its images,
so the interval is that of the episode sampler on this image list (and is somewhat narrow for
a new image population).

Cost (measured with 2000 replicates on a shared, loaded 2-core machine, best of 7, so
ranges): one run of 1000 1-way episodes, 5 classes 20-35 ms, 20 classes ~ 50 ms (index
draws, the per-replicate counts by ``bincount`` and the class sums as one float64 matrix
product take about a third each); a 4-fold mean of 1000 episodes per fold 0.15-0.25 s; a
4-fold paired difference 0.2-0.3 s; 4 folds of 5 runs (PANet's protocol) 0.9-1.3 s. So a
table's intervals add a few seconds, not minutes. Memory: about 64 MB per block of
replicates (indices and counts, blocks of 4M indices). Class sums go through float64 BLAS,
which is exact here: every partial sum is an integer below 2**53 (checked; int64 otherwise).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from fss.errors import ConfigError

EMPTY_CLASS_MODES = ("zero", "exclude", "error")  # fss.metrics (which imports this module) uses these
METRICS = ("miou", "fb_iou")
TABLE_FORMAT = "fss-episode-counts"
TABLE_VERSION = 1
DEFAULT_REPLICATES = 2000
DEFAULT_SEED = 0
DEFAULT_LEVEL = 0.95
_EXACT_FLOAT = 2**53
_DRAW_BLOCK = 4_000_000  # indices per block of replicates (32 MB of int64)


def _ratio(inter: int, union: int) -> float:
    """As :func:`fss.metrics._ratio`: ``I / U``, 0 for an empty union."""
    return float(inter) / float(union) if union > 0 else 0.0


def _frozen_array(value: Any, dtype: Any, name: str, ndim: int) -> np.ndarray:
    array = np.array(value, dtype=dtype, copy=True)
    if array.ndim != ndim:
        raise ConfigError(f"episode counts field {name!r} has {array.ndim} dimensions, expected {ndim}.")
    array.flags.writeable = False
    return array


@dataclass(frozen=True, eq=False)
class EpisodeCounts:
    """Counts of E episodes of N ways (label 0 = background, after ``absent_labels``).

    ``classes`` int64 [E, N] (way j of episode e is class ``classes[e, j - 1]``),
    ``inter``/``union`` int64 [E, N + 1], ``recorded`` bool [E, N] (the way's counts were
    recorded: always with ``absent_labels="count"``, only when present with ``"skip"``),
    ``class_ids`` the meter's classes, ``empty_class`` its rule, ``episode_key`` an optional
    digest of the episodes' identity (checked by :func:`paired_difference`).
    """

    classes: np.ndarray
    inter: np.ndarray
    union: np.ndarray
    recorded: np.ndarray
    class_ids: tuple[int, ...]
    empty_class: str = "zero"
    episode_key: str | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "classes", _frozen_array(self.classes, np.int64, "classes", 2))
        set_(self, "inter", _frozen_array(self.inter, np.int64, "inter", 2))
        set_(self, "union", _frozen_array(self.union, np.int64, "union", 2))
        set_(self, "recorded", _frozen_array(self.recorded, bool, "recorded", 2))
        set_(self, "class_ids", tuple(int(c) for c in self.class_ids))
        self._validate()

    def _validate(self) -> None:
        e, n = self.classes.shape
        if n < 1:
            raise ConfigError("episode counts need at least one way per episode (classes of shape [E, N >= 1]).")
        for name, shape in (("inter", (e, n + 1)), ("union", (e, n + 1)), ("recorded", (e, n))):
            if getattr(self, name).shape != shape:
                raise ConfigError(f"episode counts field {name!r} has shape {getattr(self, name).shape}, expected {shape}.")
        if not self.class_ids or len(set(self.class_ids)) != len(self.class_ids):
            raise ConfigError(f"episode counts class_ids {list(self.class_ids)} must be distinct and non-empty.")
        if self.empty_class not in EMPTY_CLASS_MODES:
            raise ConfigError(f"unknown empty_class {self.empty_class!r}; choose one of: {', '.join(EMPTY_CLASS_MODES)}.")
        unknown = sorted(set(np.unique(self.classes).tolist()) - set(self.class_ids))
        if unknown:
            raise ConfigError(f"episode class {unknown[0]} is not one of the class_ids {list(self.class_ids)}.")
        if (self.inter < 0).any() or (self.inter > self.union).any():
            raise ConfigError("episode counts hold a negative intersection or one above its union; the table is corrupt.")
        if self.episode_key is not None and not isinstance(self.episode_key, str):
            raise ConfigError(f"episode_key must be a string or None, got {type(self.episode_key).__name__}.")

    @property
    def episodes(self) -> int:
        return int(self.classes.shape[0])

    @property
    def ways(self) -> int:
        return int(self.classes.shape[1])

    # ------------------------------------------------------------------ metrics

    def class_columns(self) -> np.ndarray:
        """[E, N] column of each way's class in ``class_ids``."""
        order = np.argsort(self.class_ids)
        sorted_ids = np.asarray(self.class_ids, dtype=np.int64)[order]
        return order[np.searchsorted(sorted_ids, self.classes)]

    def class_sums(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Summed intersection, union and recorded episodes per class (int64 [C] each)."""
        c = len(self.class_ids)
        cols = self.class_columns()
        sums = [np.zeros(c, dtype=np.int64) for _ in range(3)]
        for total, values in zip(sums, (self.inter[:, 1:], self.union[:, 1:], self.recorded.astype(np.int64))):
            np.add.at(total, cols, values)
        return sums[0], sums[1], sums[2]

    def class_iou(self) -> dict[int, float]:
        inter, union, _ = self.class_sums()
        return {c: _ratio(i, u) for c, i, u in zip(self.class_ids, inter, union)}

    def miou(self) -> float:
        """mIoU, as :meth:`fss.metrics.IoUMeter.compute` gives it (identical float)."""
        inter, union, count = self.class_sums()
        missing = [c for c, n, u in zip(self.class_ids, count, union) if n == 0 or u == 0]
        if missing and self.empty_class == "error":
            raise ConfigError(
                f"classes {missing} have no episode (or a zero summed union); run more episodes or set "
                f"empty_class to 'zero' (PFENet/HSNet) or 'exclude'."
            )
        class_iou = {c: _ratio(i, u) for c, i, u in zip(self.class_ids, inter, union)}
        averaged = [c for c in self.class_ids if not (self.empty_class == "exclude" and c in missing)]
        if not averaged:
            raise ConfigError(
                f"no class of {list(self.class_ids)} has a scored episode, so mIoU is undefined; run at least one episode."
            )
        return float(np.mean([class_iou[c] for c in averaged]))

    def fb_iou(self) -> float:
        """FB-IoU, as :meth:`fss.metrics.IoUMeter.compute` gives it (identical float)."""
        bg = _ratio(self.inter[:, 0].sum(), self.union[:, 0].sum())
        fg = _ratio(self.inter[:, 1:].sum(), self.union[:, 1:].sum())
        return (bg + fg) / 2.0

    def metric(self, name: str) -> float:
        _check_metric(name)
        return self.miou() if name == "miou" else self.fb_iou()

    def take(self, indices: Any) -> "EpisodeCounts":
        """The episodes at ``indices`` (repeats allowed), e.g. one bootstrap resample; other
        episodes, so without ``episode_key``."""
        idx = np.asarray(indices, dtype=np.int64)
        return EpisodeCounts(self.classes[idx], self.inter[idx], self.union[idx], self.recorded[idx],
                             self.class_ids, self.empty_class)

    @classmethod
    def concat(cls, tables: Sequence["EpisodeCounts"]) -> "EpisodeCounts":
        """Rows of several tables of the same classes, ways and rule, in order."""
        if not tables:
            raise ConfigError("EpisodeCounts.concat got no tables; pass at least one.")
        first = tables[0]
        for t in tables[1:]:
            if (t.class_ids, t.ways, t.empty_class) != (first.class_ids, first.ways, first.empty_class):
                raise ConfigError(
                    f"cannot concatenate episode counts of classes {list(t.class_ids)}, {t.ways} ways, empty_class "
                    f"{t.empty_class!r} to {list(first.class_ids)}, {first.ways} ways, {first.empty_class!r}."
                )
        return cls(*(np.concatenate([getattr(t, k) for t in tables]) for k in ("classes", "inter", "union", "recorded")),
                   first.class_ids, first.empty_class, first.episode_key)

    # ------------------------------------------------------------------ JSON

    def columns(self) -> list[str]:
        """Column names of :meth:`to_json`'s rows (1-way: class, fg_i, fg_u, bg_i, bg_u, recorded)."""
        return _columns(self.ways)

    def to_json(self) -> dict[str, Any]:
        """A compact JSON-able dict: settings and one row of ints per episode."""
        fg = np.stack([self.inter[:, 1:], self.union[:, 1:]], axis=2).reshape(self.episodes, 2 * self.ways)
        rows = np.concatenate([self.classes, fg, self.inter[:, :1], self.union[:, :1],
                               self.recorded.astype(np.int64)], axis=1)
        return {"format": TABLE_FORMAT, "version": TABLE_VERSION, "ways": self.ways,
                "class_ids": list(self.class_ids), "empty_class": self.empty_class,
                "episode_key": self.episode_key, "columns": self.columns(), "rows": rows.tolist()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = "episode counts") -> "EpisodeCounts":
        """Inverse of :meth:`to_json`; ``source`` names the file in error messages."""
        if not isinstance(data, Mapping) or data.get("format") != TABLE_FORMAT:
            raise ConfigError(f"{source} is not an episode-count table (format {TABLE_FORMAT!r}); write it with to_json().")
        if data.get("version") != TABLE_VERSION:
            raise ConfigError(f"{source} has table version {data.get('version')!r}; this code reads version {TABLE_VERSION}.")
        try:
            ways = int(data["ways"])
            columns = list(data["columns"])
            rows = np.asarray(data["rows"], dtype=np.int64).reshape(-1, len(columns))
            class_ids, empty_class = list(data["class_ids"]), data["empty_class"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{source} is not a readable episode-count table ({exc}); rewrite it with to_json().") from None
        if ways < 1 or columns != _columns(ways):
            raise ConfigError(f"{source} has columns {columns}, expected {_columns(max(ways, 1))}; rewrite it with to_json().")
        n = ways
        fg = rows[:, n:3 * n].reshape(-1, n, 2)
        inter = np.concatenate([rows[:, 3 * n:3 * n + 1], fg[:, :, 0]], axis=1)
        union = np.concatenate([rows[:, 3 * n + 1:3 * n + 2], fg[:, :, 1]], axis=1)
        recorded = rows[:, 3 * n + 2:]
        if ((recorded != 0) & (recorded != 1)).any():
            raise ConfigError(f"{source} has a recorded flag other than 0 or 1; the table is corrupt.")
        return cls(rows[:, :n], inter, union, recorded.astype(bool), class_ids, empty_class, data.get("episode_key"))


def _columns(ways: int) -> list[str]:
    if ways == 1:
        return ["class", "fg_i", "fg_u", "bg_i", "bg_u", "recorded"]
    fg = [f"fg{j}_{k}" for j in range(1, ways + 1) for k in ("i", "u")]
    return [f"class{j}" for j in range(1, ways + 1)] + fg + ["bg_i", "bg_u"] + [f"recorded{j}" for j in range(1, ways + 1)]


# ---------------------------------------------------------------------- vectorised statistic


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; choose one of: {', '.join(METRICS)}.")


def _contributions(table: EpisodeCounts, metric: str) -> np.ndarray:
    """Per-episode addends [E, K] of the sums the statistic needs (exact in float64 when possible).

    mIoU: K = 3C (intersection, union, recorded flag per class); FB-IoU: K = 4 (bg I, bg U,
    fg I, fg U).
    """
    e = table.episodes
    if metric == "fb_iou":
        parts = np.stack([table.inter[:, 0], table.union[:, 0],
                          table.inter[:, 1:].sum(1), table.union[:, 1:].sum(1)], axis=1)
    else:
        c = len(table.class_ids)
        parts = np.zeros((e, 3 * c), dtype=np.int64)
        rows = np.repeat(np.arange(e), table.ways).reshape(e, table.ways)
        cols = table.class_columns()
        np.add.at(parts, (rows, cols), table.inter[:, 1:])
        np.add.at(parts, (rows, cols + c), table.union[:, 1:])
        np.add.at(parts, (rows, cols + 2 * c), table.recorded.astype(np.int64))
    exact = e * int(parts.max(initial=0)) < _EXACT_FLOAT
    return parts.astype(np.float64) if exact else parts


def _mean_rows(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Mean of each row of ``values`` over its ``keep`` columns, as ``np.mean`` of that list.

    Rows are grouped by their pattern of kept columns, so each mean sums exactly the numbers
    the metric sums, in the same (pairwise) order: identical floats.
    """
    if keep.all():
        return values.mean(axis=1)
    out = np.empty(values.shape[0], dtype=np.float64)
    patterns, inverse = np.unique(keep, axis=0, return_inverse=True)
    for p, pattern in enumerate(patterns):
        rows = np.flatnonzero(inverse.reshape(-1) == p)
        out[rows] = values[np.ix_(rows, np.flatnonzero(pattern))].mean(axis=1)
    return out


def _statistic(sums: np.ndarray, table: EpisodeCounts, metric: str) -> np.ndarray:
    """The metric of each replicate [B] from its summed contributions [B, K]."""
    sums = np.asarray(sums, dtype=np.float64)  # integers, exactly
    if metric == "fb_iou":
        ious = np.zeros((sums.shape[0], 2))
        for k in range(2):
            np.divide(sums[:, 2 * k], sums[:, 2 * k + 1], out=ious[:, k], where=sums[:, 2 * k + 1] > 0)
        return (ious[:, 0] + ious[:, 1]) / 2.0
    c = len(table.class_ids)
    inter, union, count = sums[:, :c], sums[:, c:2 * c], sums[:, 2 * c:]
    ious = np.zeros_like(inter)
    np.divide(inter, union, out=ious, where=union > 0)
    missing = (count == 0) | (union == 0)
    if table.empty_class == "zero" or not missing.any():
        return ious.mean(axis=1)
    if table.empty_class == "error":
        raise ConfigError(
            f"{int(missing.any(axis=1).sum())} of {sums.shape[0]} bootstrap resamples miss a class (empty_class "
            f"'error'); evaluate more episodes or set empty_class to 'zero' or 'exclude'."
        )
    if not (~missing).any(axis=1).all():
        raise ConfigError("a bootstrap resample has no scored class (empty_class 'exclude'); evaluate more episodes.")
    return _mean_rows(ious, ~missing)


def _weights(indices: np.ndarray, episodes: int) -> np.ndarray:
    """How often each episode is drawn in each replicate: [B, E] from indices [B, E']."""
    b = indices.shape[0]
    flat = (indices + episodes * np.arange(b, dtype=np.int64)[:, None]).reshape(-1)
    return np.bincount(flat, minlength=b * episodes).reshape(b, episodes)


def _replicates_from_weights(table: EpisodeCounts, weights: np.ndarray, metric: str,
                             parts: np.ndarray | None = None) -> np.ndarray:
    parts = _contributions(table, metric) if parts is None else parts
    return _statistic(weights.astype(parts.dtype) @ parts, table, metric)


def replicate_statistics(table: EpisodeCounts, indices: Any, metric: str = "miou") -> np.ndarray:
    """The metric of each resample ``table.take(indices[b])`` ([B] floats) for episode indices
    ``indices`` [B, E'], computed by counts and one matrix product (identical floats)."""
    _check_metric(metric)
    idx = np.asarray(indices, dtype=np.int64)
    if idx.ndim != 2 or (idx.size and (idx.min() < 0 or idx.max() >= table.episodes)):
        raise ConfigError(f"indices must be a [B, E] array of episode indices in 0..{table.episodes - 1}.")
    return _replicates_from_weights(table, _weights(idx, table.episodes), metric)


# ---------------------------------------------------------------------- bootstrap


@dataclass(frozen=True)
class BootstrapResult:
    """A bootstrap interval: ``estimate`` (the data's value), ``[low, high]`` at ``level``,
    ``std`` (of the replicates), ``contains_zero`` (``low <= 0 <= high``)."""

    estimate: float
    low: float
    high: float
    std: float
    contains_zero: bool
    replicates: int
    seed: int
    level: float
    metric: str = "miou"
    method: str = "percentile"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _check_options(replicates: int, seed: int, level: float, metric: str) -> None:
    if isinstance(replicates, bool) or not isinstance(replicates, (int, np.integer)) or replicates < 2:
        raise ConfigError(f"replicates={replicates!r}: pass an integer of at least 2 (default {DEFAULT_REPLICATES}).")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed={seed!r}: pass a non-negative integer (default {DEFAULT_SEED}).")
    if isinstance(level, bool) or not isinstance(level, (int, float, np.floating)) or not 0.0 < float(level) < 1.0:
        raise ConfigError(f"level={level!r}: pass a coverage level between 0 and 1 (default {DEFAULT_LEVEL}).")
    _check_metric(metric)


def _check_groups(groups: Any, name: str) -> list[list[EpisodeCounts]]:
    """``groups`` as folds of runs of non-empty tables."""
    if isinstance(groups, EpisodeCounts) or not isinstance(groups, Sequence) or not groups:
        raise ConfigError(f"{name} must be a non-empty list of folds, each a list of runs' EpisodeCounts.")
    folds = []
    for f, runs in enumerate(groups):
        if isinstance(runs, EpisodeCounts) or not isinstance(runs, Sequence) or not runs:
            raise ConfigError(f"{name}[{f}] must be a non-empty list of runs' EpisodeCounts (one fold).")
        for r, table in enumerate(runs):
            if not isinstance(table, EpisodeCounts):
                raise ConfigError(f"{name}[{f}][{r}] is a {type(table).__name__}, not EpisodeCounts; "
                                  f"keep episodes with IoUMeter(keep_episodes=True).")
            if table.episodes == 0:
                raise ConfigError(f"{name}[{f}][{r}] has no episode; a bootstrap needs at least one.")
        folds.append(list(runs))
    return folds


def _draws(seed: int, fold: int, run: int, episodes: int, replicates: int):
    """Blocks of replicate indices [b, E] of fold ``fold``, run ``run`` (own stream per pair)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), fold, run]))
    block = max(1, _DRAW_BLOCK // episodes)
    for start in range(0, replicates, block):
        size = min(block, replicates - start)
        yield start, rng.integers(0, episodes, size=(size, episodes), dtype=np.int64)


def _replicates(methods: list[list[list[EpisodeCounts]]], replicates: int, seed: int, metric: str) -> np.ndarray:
    """Replicates [M, B] of mean-over-folds(mean-over-runs(metric)) of M reports on the same
    episodes (fold/run layout shared; each run's indices drawn once for all M)."""
    out = np.zeros((len(methods), replicates))
    folds = len(methods[0])
    for f in range(folds):
        runs = len(methods[0][f])
        fold_sum = np.zeros_like(out)
        for r in range(runs):
            tables = [m[f][r] for m in methods]
            parts = [_contributions(t, metric) for t in tables]
            for start, idx in _draws(seed, f, r, tables[0].episodes, replicates):
                weights = _weights(idx, tables[0].episodes)
                for k, (t, p) in enumerate(zip(tables, parts)):
                    fold_sum[k, start:start + len(idx)] += _replicates_from_weights(t, weights, metric, p)
        out += fold_sum / runs
    return out / folds


def _estimate(folds: list[list[EpisodeCounts]], metric: str) -> float:
    """Mean over folds of the mean over runs (as :func:`fss.metrics.summarize_runs`)."""
    return float(np.mean([np.array([t.metric(metric) for t in runs]).mean() for runs in folds]))


def _result(estimate: float, values: np.ndarray, replicates: int, seed: int, level: float, metric: str) -> BootstrapResult:
    low, high = np.quantile(values, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return BootstrapResult(estimate=float(estimate), low=float(low), high=float(high),
                           std=float(values.std(ddof=1)), contains_zero=bool(low <= 0.0 <= high),
                           replicates=int(replicates), seed=int(seed), level=float(level), metric=metric)


def bootstrap_mean(groups: Sequence[Sequence[EpisodeCounts]], replicates: int = DEFAULT_REPLICATES,
                   seed: int = DEFAULT_SEED, level: float = DEFAULT_LEVEL, metric: str = "miou") -> BootstrapResult:
    """Interval of the mean over folds (``groups``: folds, each a list of runs' counts) of the
    mean over runs of ``metric`` ("miou" or "fb_iou"); folds and runs resampled independently."""
    _check_options(replicates, seed, level, metric)
    folds = _check_groups(groups, "groups")
    estimate = _estimate(folds, metric)  # first: the data's own errors (empty_class "error") come before the resamples'
    values = _replicates([folds], int(replicates), int(seed), metric)[0]
    return _result(estimate, values, replicates, seed, level, metric)


def bootstrap_miou(runs: Sequence[EpisodeCounts], replicates: int = DEFAULT_REPLICATES, seed: int = DEFAULT_SEED,
                   level: float = DEFAULT_LEVEL, metric: str = "miou") -> BootstrapResult:
    """Interval of one evaluation's ``metric`` (mean over its runs): :func:`bootstrap_mean` of one fold."""
    if isinstance(runs, EpisodeCounts):
        runs = [runs]
    return bootstrap_mean([runs], replicates=replicates, seed=seed, level=level, metric=metric)


def _check_paired(a: list[list[EpisodeCounts]], b: list[list[EpisodeCounts]]) -> None:
    if len(a) != len(b):
        raise ConfigError(f"paired_difference: a has {len(a)} folds and b {len(b)}; compare reports of the same folds.")
    for f, (runs_a, runs_b) in enumerate(zip(a, b)):
        if len(runs_a) != len(runs_b):
            raise ConfigError(f"paired_difference: fold {f} has {len(runs_a)} runs in a and {len(runs_b)} in b; "
                              f"compare reports of the same protocol.")
        for r, (ta, tb) in enumerate(zip(runs_a, runs_b)):
            where = f"paired_difference: fold {f} run {r}"
            if ta.class_ids != tb.class_ids:
                raise ConfigError(f"{where}: a scores classes {list(ta.class_ids)} and b {list(tb.class_ids)}; "
                                  f"compare reports of the same fold.")
            if ta.classes.shape != tb.classes.shape:
                raise ConfigError(f"{where}: a has {ta.episodes} episodes of {ta.ways} ways and b {tb.episodes} of "
                                  f"{tb.ways}; compare reports evaluated on the same episodes.")
            differ = np.flatnonzero((ta.classes != tb.classes).any(axis=1))
            if differ.size:
                e = int(differ[0])
                raise ConfigError(f"{where}: episode {e} has classes {ta.classes[e].tolist()} in a and "
                                  f"{tb.classes[e].tolist()} in b; compare reports evaluated on the same episodes.")
            if ta.episode_key is not None and tb.episode_key is not None and ta.episode_key != tb.episode_key:
                raise ConfigError(f"{where}: episode keys differ ({ta.episode_key!r} vs {tb.episode_key!r}); "
                                  f"compare reports evaluated on the same episodes.")


def paired_difference(a: Sequence[Sequence[EpisodeCounts]], b: Sequence[Sequence[EpisodeCounts]],
                      replicates: int = DEFAULT_REPLICATES, seed: int = DEFAULT_SEED, level: float = DEFAULT_LEVEL,
                      metric: str = "miou") -> BootstrapResult:
    """Interval of ``mean_folds(metric(a)) - mean_folds(metric(b))`` for two reports on the SAME
    episodes (folds of runs each), resampling episode indices jointly for a and b."""
    _check_options(replicates, seed, level, metric)
    folds_a, folds_b = _check_groups(a, "a"), _check_groups(b, "b")
    _check_paired(folds_a, folds_b)
    estimate = _estimate(folds_a, metric) - _estimate(folds_b, metric)
    values = _replicates([folds_a, folds_b], int(replicates), int(seed), metric)
    return _result(estimate, values[0] - values[1], replicates, seed, level, metric)
