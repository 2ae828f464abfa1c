"""Figures (matplotlib, Agg backend, PNG): sample episodes, training curves, result charts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

#: overlay colours (RGB 0..1): foreground, ignore
FOREGROUND = np.array([1.0, 0.15, 0.15])
IGNORE = np.array([1.0, 1.0, 1.0])


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``image`` uint8 HxWx3 with ``mask == 1`` tinted red and ``mask == 255`` whitened."""
    out = image.astype(np.float32) / 255.0
    fg = mask == 1
    ig = mask == 255
    out[fg] = (1 - alpha) * out[fg] + alpha * FOREGROUND
    out[ig] = (1 - 0.3) * out[ig] + 0.3 * IGNORE
    return np.clip(out, 0, 1)


def _save(fig, path: str | os.PathLike, dpi: int = 110) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def episode_figure(samples: Sequence[Mapping], path: str | os.PathLike, title: str = "",
                   class_names: Mapping[int, str] | None = None) -> None:
    """One row per episode: support (mask overlaid), query, ground truth, prediction."""
    plt = _plt()
    rows = len(samples)
    fig, axes = plt.subplots(rows, 4, figsize=(8, 2.1 * rows + 0.4), squeeze=False)
    heads = ("support + mask", "query", "ground truth", "prediction")
    for r, s in enumerate(samples):
        panels = (
            (s["support"], s["support_mask"]),
            (s["query"], None),
            (s["query"], s["ground_truth"]),
            (s["query"], s["prediction"]),
        )
        for c, (image, mask) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(image if mask is None else overlay(image, mask))
            if mask is not None and (mask == 1).any():
                ax.contour((mask == 1).astype(float), levels=[0.5], colors=["yellow"], linewidths=0.9)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(heads[c], fontsize=9)
        name = (class_names or {}).get(s["class_id"], "")
        axes[r, 0].set_ylabel(f"ep {s['episode']}\nclass {s['class_id']}\n{name}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    _save(fig, path)
    plt.close(fig)


def curves_figure(curves_csv: str | os.PathLike, path: str | os.PathLike, val_csv: str | os.PathLike | None = None,
                  title: str = "") -> None:
    """Loss terms and learning rate (and validation mIoU) against the iteration."""
    import pandas as pd

    plt = _plt()
    df = pd.read_csv(curves_csv)
    losses = [c for c in df.columns if c not in ("iteration", "epoch", "lr", "seconds")]
    fig, axes = plt.subplots(1, 3 if val_csv else 2, figsize=(11 if val_csv else 8, 3))
    for c in losses:
        axes[0].plot(df["iteration"], df[c], label=c)
    axes[0].set_xlabel("iteration")
    axes[0].set_title("loss terms", fontsize=9)
    axes[0].legend(fontsize=7)
    axes[1].plot(df["iteration"], df["lr"])
    axes[1].set_xlabel("iteration")
    axes[1].set_title("learning rate", fontsize=9)
    if val_csv and Path(val_csv).is_file():
        v = pd.read_csv(val_csv)
        axes[2].plot(v["iteration"], v["val_miou"], marker="o")
        axes[2].set_xlabel("iteration")
        axes[2].set_title("validation mIoU", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    _save(fig, path)
    plt.close(fig)


def results_chart(table, path: str | os.PathLike, title: str = "") -> None:
    """Grouped bars: mean mIoU (%) per method, one bar per shot setting.

    ``table`` is a DataFrame indexed by method with one column per setting (e.g.
    ``1-shot``, ``5-shot``).
    """
    plt = _plt()
    methods = list(table.index)
    settings = list(table.columns)
    width = 0.8 / max(1, len(settings))
    x = np.arange(len(methods))
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(methods) + 1), 3.2))
    for i, s in enumerate(settings):
        values = table[s].to_numpy(dtype=float)
        bars = ax.bar(x + (i - (len(settings) - 1) / 2) * width, values, width, label=str(s))
        for b, v in zip(bars, values):
            if np.isfinite(v):
                ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels(methods, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("mean mIoU over folds (%)")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    _save(fig, path)
    plt.close(fig)
