"""Few-shot segmentation metrics: class-wise mIoU and FB-IoU (protocol section 5).

Per episode, with prediction P and target T (T may hold the ignore value 255), pixels
where T == 255 are ignored and, for every label b of the episode,
``I_b = |P == b and T == b|`` and ``U_b = |P == b| + |T == b| - I_b``.

* **mIoU**: for each class c, ``IoU_c = sum I_1 / sum U_1`` over all episodes of class c
  (intersections and unions are summed, never per-episode IoUs averaged: no reference does
  that), and mIoU is the mean of IoU_c over the meter's classes (the fold's novel classes).
* **FB-IoU** (PANet's "binary-IoU"): ``IoU_b = sum I_b / sum U_b`` over all episodes for
  b in {0 (background), 1 (foreground)}; FB-IoU is the mean of the two.
* **N-way** (PANet, query label 0..N): label j >= 1 of an episode counts for class
  ``class_ids[j - 1]``; the FB-IoU foreground sums I and U of all foreground labels, as
  PANet's ``util/metric.py`` (``get_mIoU_binary``) does. 1-way is the case N = 1.
* Several runs (bam, panet): :func:`summarize_runs` gives the mean and the population
  standard deviation (``numpy.std``, ddof=0, as PANet's ``util/metric.py``) over runs.

Options (knobs) and their reference behaviour:

* ``ignore_index`` (default 255): target value ignored. ``None`` = canet's evaluation,
  which treats 255 as background (255 -> 0 in the target).
* ``absent_labels`` (default ``"count"``: pfenet/hsnet/canet, protocol section 5): an
  episode's statistics of every label are always summed. ``"skip"`` = PANet's
  ``Metric.record``: a label's statistics of an episode are recorded only when the target
  contains that label (a false positive for a class absent from the target is not counted).
* ``empty_class`` (default ``"zero"``): what a class of the meter with no recorded episode
  (or a zero summed union) scores. ``"zero"`` = PFENet (``I / (U + 1e-10)``) and HSNet
  (``I / max(U, 1)``): IoU 0, and the class still counts in the mean; ``"exclude"``: the
  mean runs over the classes that have episodes; ``"error"``: :meth:`IoUMeter.compute`
  raises. Whatever the choice, the result lists such classes in ``missing_classes``.
  (PANet's reference gives NaN; we never return NaN.)

All counts are accumulated exactly as int64 on the CPU; the per-episode counting runs in
torch on the inputs' device (numpy inputs are counted on the CPU).

``keep_episodes`` (default False): the meter also keeps one row of counts per episode (its
classes, each label's I and U after ``absent_labels``), returned by
:meth:`IoUMeter.episode_table` as a :class:`fss.uncertainty.EpisodeCounts` for bootstrap
intervals. Keeping them changes no result; state dicts carry the rows and merging
concatenates them.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from fss.errors import ConfigError
from fss.uncertainty import EMPTY_CLASS_MODES, EpisodeCounts

IGNORE_INDEX = 255
ABSENT_LABEL_MODES = ("count", "skip")
STATE_VERSION = 1


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise ConfigError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}.")


def _as_int_labels(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.is_floating_point() or x.is_complex():
        raise ConfigError(
            f"{name} has dtype {x.dtype}; pass integer labels (e.g. logits.argmax(1)), not scores."
        )
    return x.long()


def _class_id_matrix(class_ids: Any, batch: int) -> np.ndarray:
    """Episode class ids as an int64 array ``[B, N]`` (N ways)."""
    if isinstance(class_ids, torch.Tensor):
        class_ids = class_ids.detach().cpu().numpy()
    ids = np.asarray(class_ids)
    if ids.dtype == object or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
        raise ConfigError(f"class ids {class_ids!r} must be integers, one per episode (or per way).")
    ids = ids.astype(np.int64)
    if ids.ndim == 1:
        ids = ids[:, None]
    if ids.ndim != 2 or ids.shape[0] != batch or ids.shape[1] < 1:
        raise ConfigError(
            f"class ids of shape {tuple(np.shape(class_ids))} do not match a batch of {batch} "
            f"episodes; pass [B] (1-way) or [B, N] (N-way) class ids."
        )
    return ids


def episode_counts(
    pred: torch.Tensor,
    target: torch.Tensor,
    ways: int,
    ignore_index: int | None = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-episode, per-label ``I_b``, ``U_b`` and target presence (protocol section 5).

    ``pred`` and ``target`` are integer ``[B, H, W]`` on the same device, labels
    0..``ways``. Returns three int64 tensors ``[B, ways + 1]`` (label 0 = background):
    intersection, union, and the number of target pixels of the label.
    """
    if ignore_index is None:  # canet: 255 is background
        target = torch.where(target == IGNORE_INDEX, torch.zeros_like(target), target)
        valid = torch.ones_like(target, dtype=torch.bool)
    else:
        valid = target != ignore_index
    inters, unions, present = [], [], []
    for label in range(ways + 1):
        pred_b = (pred == label) & valid
        target_b = target == label
        inter = (pred_b & target_b).sum(dim=(1, 2))
        target_count = target_b.sum(dim=(1, 2))
        inters.append(inter)
        unions.append(pred_b.sum(dim=(1, 2)) + target_count - inter)
        present.append(target_count)
    return torch.stack(inters, 1), torch.stack(unions, 1), torch.stack(present, 1)


class IoUMeter:
    """Accumulates class-wise and foreground/background intersections and unions.

    ``class_ids``: the classes the mean runs over (the fold's novel classes); every episode
    must belong to one of them. See the module docstring for ``ignore_index``,
    ``absent_labels``, ``empty_class`` and ``keep_episodes``.
    """

    def __init__(
        self,
        class_ids: Iterable[int],
        ignore_index: int | None = IGNORE_INDEX,
        absent_labels: str = "count",
        empty_class: str = "zero",
        keep_episodes: bool = False,
    ):
        ids = [int(c) for c in class_ids]
        if not ids:
            raise ConfigError("IoUMeter needs at least one class id; pass the fold's novel classes.")
        if len(set(ids)) != len(ids):
            raise ConfigError(f"class ids {ids} contain duplicates; pass each class once.")
        if absent_labels not in ABSENT_LABEL_MODES:
            raise ConfigError(
                f"unknown absent_labels {absent_labels!r}; choose one of: {', '.join(ABSENT_LABEL_MODES)}."
            )
        if empty_class not in EMPTY_CLASS_MODES:
            raise ConfigError(
                f"unknown empty_class {empty_class!r}; choose one of: {', '.join(EMPTY_CLASS_MODES)}."
            )
        if ignore_index is not None and not isinstance(ignore_index, (int, np.integer)):
            raise ConfigError(f"ignore_index must be an integer or None, got {ignore_index!r}.")
        self.class_ids: list[int] = ids
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.absent_labels = absent_labels
        self.empty_class = empty_class
        self.keep_episodes = bool(keep_episodes)
        self._index = {c: i for i, c in enumerate(ids)}
        self.reset()

    # ------------------------------------------------------------------ accumulation

    def reset(self) -> None:
        n = len(self.class_ids)
        self.class_intersection = np.zeros(n, dtype=np.int64)
        self.class_union = np.zeros(n, dtype=np.int64)
        self.class_episode_count = np.zeros(n, dtype=np.int64)
        self.fb_intersection = np.zeros(2, dtype=np.int64)  # [background, foreground]
        self.fb_union = np.zeros(2, dtype=np.int64)
        self.episodes = 0
        self._episode_rows: list[EpisodeCounts] = []

    def update(self, pred: Any, target: Any, class_id: int | Sequence[int]) -> None:
        """Add one episode: ``pred``/``target`` HxW; ``class_id`` an int (1-way) or the
        N episode classes in label order (N-way: label j is ``class_id[j - 1]``)."""
        pred_t = _as_tensor(pred, "pred")
        target_t = _as_tensor(target, "target")
        if pred_t.dim() != 2 or target_t.dim() != 2:
            raise ConfigError(
                f"update expects HxW pred and target, got shapes {tuple(pred_t.shape)} and "
                f"{tuple(target_t.shape)}; use update_batch for [B, H, W]."
            )
        if isinstance(class_id, torch.Tensor):
            class_id = class_id.detach().cpu().numpy()
        ids = np.asarray(class_id).reshape(1, -1)
        self.update_batch(pred_t[None], target_t[None], ids)

    def update_batch(self, pred: Any, target: Any, class_ids: Any) -> None:
        """Add B episodes: ``pred``/``target`` ``[B, H, W]``; ``class_ids`` ``[B]`` (1-way)
        or ``[B, N]`` (N-way). Counting runs on ``pred``'s device."""
        pred_t = _as_int_labels(_as_tensor(pred, "pred"), "pred")
        target_t = _as_int_labels(_as_tensor(target, "target"), "target")
        if pred_t.dim() != 3 or pred_t.shape != target_t.shape:
            raise ConfigError(
                f"prediction shape {tuple(pred_t.shape)} does not match target shape "
                f"{tuple(target_t.shape)} (expected [B, H, W] both); resize the prediction to "
                f"the label's size before scoring."
            )
        target_t = target_t.to(pred_t.device)
        batch = pred_t.shape[0]
        ids = _class_id_matrix(class_ids, batch)
        ways = ids.shape[1]
        self._check_class_ids(ids)
        self._check_values(pred_t, target_t, ways)
        self._check_ways(ways)

        inter, union, present = episode_counts(pred_t, target_t, ways, self.ignore_index)
        inter = inter.cpu().numpy().astype(np.int64)
        union = union.cpu().numpy().astype(np.int64)
        present = present.cpu().numpy() > 0
        if self.absent_labels == "skip":  # PANet: only labels present in the target count
            inter = inter * present
            union = union * present
            recorded = present[:, 1:]
        else:
            recorded = np.ones((batch, ways), dtype=bool)

        rows = np.vectorize(self._index.__getitem__, otypes=[np.int64])(ids)
        np.add.at(self.class_intersection, rows, inter[:, 1:])
        np.add.at(self.class_union, rows, union[:, 1:])
        np.add.at(self.class_episode_count, rows, recorded.astype(np.int64))
        self.fb_intersection += np.array([inter[:, 0].sum(), inter[:, 1:].sum()], dtype=np.int64)
        self.fb_union += np.array([union[:, 0].sum(), union[:, 1:].sum()], dtype=np.int64)
        self.episodes += batch
        if self.keep_episodes:
            self._episode_rows.append(EpisodeCounts(ids, inter, union, recorded, self.class_ids, self.empty_class))

    def _check_ways(self, ways: int) -> None:
        if self.keep_episodes and self._episode_rows and self._episode_rows[0].ways != ways:
            raise ConfigError(
                f"this meter keeps episodes of {self._episode_rows[0].ways} ways and got a {ways}-way batch; "
                f"use one meter per way count (keep_episodes rows have a fixed width)."
            )

    def _check_class_ids(self, ids: np.ndarray) -> None:
        unknown = sorted({int(c) for c in np.unique(ids)} - set(self._index))
        if unknown:
            raise ConfigError(
                f"class id {unknown[0]} is not one of the meter's classes {self.class_ids}; "
                f"evaluate only the fold's classes or build the meter with them."
            )
        if ids.shape[1] > 1:
            for row in ids:
                if len(set(row.tolist())) != len(row):
                    raise ConfigError(f"episode class ids {row.tolist()} repeat a class; N-way classes must be distinct.")

    def _check_values(self, pred: torch.Tensor, target: torch.Tensor, ways: int) -> None:
        if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) > ways):
            raise ConfigError(
                f"prediction holds labels outside 0..{ways} (min {int(pred.min())}, max "
                f"{int(pred.max())}); pass the argmax labels of a {ways}-way episode."
            )
        allowed_extra = IGNORE_INDEX if self.ignore_index is None else self.ignore_index
        bad = ((target < 0) | (target > ways)) & (target != allowed_extra)
        if bool(bad.any()):
            value = int(target[bad][0])
            raise ConfigError(
                f"target holds label {value}, outside 0..{ways} and not the ignore value "
                f"{allowed_extra}; pass the episode's label (0 background, j for the j-th class)."
            )

    # ------------------------------------------------------------------ results

    @property
    def class_episodes(self) -> dict[int, int]:
        """Episodes recorded per class (with ``absent_labels="skip"``: where it was present)."""
        return {c: int(n) for c, n in zip(self.class_ids, self.class_episode_count)}

    def compute(self) -> dict[str, Any]:
        """``{"miou", "fb_iou", "class_iou", "bg_iou", "fg_iou", "class_episodes",
        "episodes", "missing_classes"}``; IoUs are fractions in [0, 1]."""
        missing = [
            c
            for c, n, u in zip(self.class_ids, self.class_episode_count, self.class_union)
            if n == 0 or u == 0
        ]
        if missing and self.empty_class == "error":
            raise ConfigError(
                f"classes {missing} have no episode (or a zero summed union); run more episodes or set "
                f"empty_class to 'zero' (PFENet/HSNet) or 'exclude'."
            )
        class_iou = {
            c: _ratio(i, u) for c, i, u in zip(self.class_ids, self.class_intersection, self.class_union)
        }
        averaged = [c for c in self.class_ids if not (self.empty_class == "exclude" and c in missing)]
        if not averaged:
            raise ConfigError(
                f"no class of {self.class_ids} has a scored episode, so mIoU is undefined; "
                f"run at least one episode."
            )
        bg_iou = _ratio(self.fb_intersection[0], self.fb_union[0])
        fg_iou = _ratio(self.fb_intersection[1], self.fb_union[1])
        return {
            "miou": float(np.mean([class_iou[c] for c in averaged])),
            "fb_iou": (bg_iou + fg_iou) / 2.0,
            "class_iou": class_iou,
            "bg_iou": bg_iou,
            "fg_iou": fg_iou,
            "class_episodes": self.class_episodes,
            "episodes": int(self.episodes),
            "missing_classes": missing,
        }

    def episode_table(self, episode_key: str | None = None) -> EpisodeCounts:
        """The kept per-episode counts (``keep_episodes=True``), in update order; ``episode_key``
        optionally names the episodes' identity (e.g. a digest of the episode list)."""
        if not self.keep_episodes:
            raise ConfigError("this meter was built without keep_episodes; build it with IoUMeter(..., keep_episodes=True).")
        if not self._episode_rows:
            empty = np.zeros((0, 1), dtype=np.int64)
            return EpisodeCounts(empty, np.zeros((0, 2), np.int64), np.zeros((0, 2), np.int64), empty.astype(bool),
                                 self.class_ids, self.empty_class, episode_key)
        table = EpisodeCounts.concat(self._episode_rows)
        self._episode_rows = [table]
        return table if episode_key is None else EpisodeCounts(
            table.classes, table.inter, table.union, table.recorded, table.class_ids, table.empty_class, episode_key)

    # ------------------------------------------------------------------ state / merge

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (JSON-serialisable): settings and the summed counts (and, with
        ``keep_episodes``, the episode rows under ``"episode_table"``)."""
        state = {
            "version": STATE_VERSION,
            "class_ids": list(self.class_ids),
            "ignore_index": self.ignore_index,
            "absent_labels": self.absent_labels,
            "empty_class": self.empty_class,
            "class_intersection": self.class_intersection.tolist(),
            "class_union": self.class_union.tolist(),
            "class_episodes": self.class_episode_count.tolist(),
            "fb_intersection": self.fb_intersection.tolist(),
            "fb_union": self.fb_union.tolist(),
            "episodes": int(self.episodes),
        }
        if self.keep_episodes:
            state["episode_table"] = self.episode_table().to_json()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the counts by ``state``'s (its settings must match this meter's)."""
        self._check_compatible(state, "state")
        rows = self._state_rows(state, "state")
        n = len(self.class_ids)
        arrays = {}
        for key, size in (
            ("class_intersection", n), ("class_union", n), ("class_episodes", n),
            ("fb_intersection", 2), ("fb_union", 2),
        ):
            value = np.asarray(state[key], dtype=np.int64)
            if value.shape != (size,):
                raise ConfigError(f"meter state field {key!r} has shape {value.shape}, expected ({size},); the state is corrupt.")
            arrays[key] = value.copy()
        self.class_intersection = arrays["class_intersection"]
        self.class_union = arrays["class_union"]
        self.class_episode_count = arrays["class_episodes"]
        self.fb_intersection = arrays["fb_intersection"]
        self.fb_union = arrays["fb_union"]
        self.episodes = int(state["episodes"])
        self._episode_rows = rows

    def merge(self, other: "IoUMeter | Mapping[str, Any]") -> "IoUMeter":
        """Add another meter's (or state dict's) counts, e.g. from other ranks; returns self."""
        state = other.state_dict() if isinstance(other, IoUMeter) else other
        self._check_compatible(state, "merged meter")
        rows = self._state_rows(state, "merged meter")
        if rows:
            self._check_ways(rows[0].ways)
        self.class_intersection += np.asarray(state["class_intersection"], dtype=np.int64)
        self.class_union += np.asarray(state["class_union"], dtype=np.int64)
        self.class_episode_count += np.asarray(state["class_episodes"], dtype=np.int64)
        self.fb_intersection += np.asarray(state["fb_intersection"], dtype=np.int64)
        self.fb_union += np.asarray(state["fb_union"], dtype=np.int64)
        self.episodes += int(state["episodes"])
        self._episode_rows.extend(rows)
        return self

    def _state_rows(self, state: Mapping[str, Any], what: str) -> list[EpisodeCounts]:
        """The episode rows of ``state`` this meter keeps ([] when it keeps none)."""
        if not self.keep_episodes:
            return []
        if "episode_table" not in state:
            if int(state["episodes"]) == 0:
                return []
            raise ConfigError(f"{what} has no episode rows but this meter keeps episodes; build both with keep_episodes=True.")
        table = EpisodeCounts.from_json(state["episode_table"], what)
        if table.episodes != int(state["episodes"]):
            raise ConfigError(f"{what} has {table.episodes} episode rows for {int(state['episodes'])} episodes; the state is corrupt.")
        if list(table.class_ids) != self.class_ids:
            raise ConfigError(f"{what}'s episode rows have class_ids {list(table.class_ids)} but this meter has {self.class_ids}.")
        table = EpisodeCounts(table.classes, table.inter, table.union, table.recorded, self.class_ids, self.empty_class)
        return [table] if table.episodes else []

    def _check_compatible(self, state: Mapping[str, Any], what: str) -> None:
        required = ("class_ids", "ignore_index", "absent_labels", "class_intersection", "class_union",
                    "class_episodes", "fb_intersection", "fb_union", "episodes")
        lacking = [k for k in required if k not in state]
        if lacking:
            raise ConfigError(f"{what} lacks the fields {lacking}; pass an IoUMeter.state_dict().")
        for key in ("class_ids", "ignore_index", "absent_labels"):
            mine = getattr(self, key)
            theirs = list(state[key]) if key == "class_ids" else state[key]
            if theirs != mine:
                raise ConfigError(f"{what} has {key}={theirs!r} but this meter has {mine!r}; combine only meters built alike.")


def _ratio(inter: int, union: int) -> float:
    """``I / U`` with 0 for an empty union (PFENet's ``I / (U + 1e-10)``, HSNet's ``max(U, 1)``)."""
    return float(inter) / float(union) if union > 0 else 0.0


def summarize_runs(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and population std (ddof=0, PANet's ``numpy.std``) over runs of :meth:`IoUMeter.compute`.

    Returns ``{"miou", "miou_std", "fb_iou", "fb_iou_std", "class_iou", "class_iou_std",
    "runs"}``; the class-wise entries are present when every run scored the same classes.
    """
    runs = list(results)
    if not runs:
        raise ConfigError("summarize_runs got no run results; evaluate at least one run.")
    for i, run in enumerate(runs):
        for key in ("miou", "fb_iou"):
            if key not in run or not math.isfinite(float(run[key])):
                raise ConfigError(f"run {i} has no finite {key!r}; pass IoUMeter.compute() results.")
    miou = np.array([float(r["miou"]) for r in runs], dtype=np.float64)
    fb = np.array([float(r["fb_iou"]) for r in runs], dtype=np.float64)
    summary: dict[str, Any] = {
        "miou": float(miou.mean()),
        "miou_std": float(miou.std(ddof=0)),
        "fb_iou": float(fb.mean()),
        "fb_iou_std": float(fb.std(ddof=0)),
    }
    class_sets = [tuple(r.get("class_iou", {}).keys()) for r in runs]
    if class_sets[0] and all(s == class_sets[0] for s in class_sets):
        table = np.array([[float(r["class_iou"][c]) for c in class_sets[0]] for r in runs])
        summary["class_iou"] = {c: float(v) for c, v in zip(class_sets[0], table.mean(axis=0))}
        summary["class_iou_std"] = {c: float(v) for c, v in zip(class_sets[0], table.std(axis=0, ddof=0))}
    summary["runs"] = runs
    return summary
