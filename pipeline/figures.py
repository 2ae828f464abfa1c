"""Figures (PNG): sample episodes (PIL), training curves and result charts (matplotlib, Agg backend)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from fss.atomic import atomic_path, create_temporary

#: overlay colours (RGB 0..1): foreground, ignore
FOREGROUND = np.array([1.0, 0.15, 0.15])
IGNORE = np.array([1.0, 1.0, 1.0])


def _plt():
    import matplotlib  # heavy: figures only

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
    fd, tmp = create_temporary(path.parent, prefix=f".{path.name}.", suffix=".png")  # umask mode, as open()
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


#: side in pixels of one panel of the episode figure (images are fitted into it)
PANEL = 192


def _fit_panel(rgb: np.ndarray, side: int = PANEL) -> tuple[np.ndarray, float, tuple[int, int]]:
    """``rgb`` (float 0..1, HxWx3) scaled by nearest neighbour into a white ``side`` square;
    returns the panel (uint8), the scale and the top-left offset of the image in it."""
    h, w = rgb.shape[:2]
    scale = side / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    rows = np.minimum((np.arange(nh) / scale).astype(int), h - 1)
    cols = np.minimum((np.arange(nw) / scale).astype(int), w - 1)
    panel = np.full((side, side, 3), 255, dtype=np.uint8)
    top, left = (side - nh) // 2, (side - nw) // 2
    panel[top:top + nh, left:left + nw] = (rgb[rows][:, cols] * 255 + 0.5).astype(np.uint8)
    return panel, scale, (top, left)


def _outline(panel: np.ndarray, mask: np.ndarray, scale: float, offset: tuple[int, int]) -> None:
    """Draw the border of ``mask == 1`` (nearest-neighbour scaled like the image) in yellow."""
    h, w = mask.shape
    rows = np.minimum((np.arange(round(h * scale)) / scale).astype(int), h - 1)
    cols = np.minimum((np.arange(round(w * scale)) / scale).astype(int), w - 1)
    fg = (mask == 1)[rows][:, cols]
    inner = fg.copy()
    inner[1:] &= fg[:-1]
    inner[:-1] &= fg[1:]
    inner[:, 1:] &= fg[:, :-1]
    inner[:, :-1] &= fg[:, 1:]
    edge = fg & ~inner
    top, left = offset
    view = panel[top:top + fg.shape[0], left:left + fg.shape[1]]
    view[edge] = (255, 230, 0)


def episode_figure(samples: Sequence[Mapping], path: str | os.PathLike, title: str = "",
                   class_names: Mapping[int, str] | None = None) -> None:
    """One row per episode: support (mask overlaid), query, ground truth, prediction.

    Drawn with PIL rather than matplotlib: every ``fss evaluate`` writes one per shot, and
    importing and laying out matplotlib cost about 2 s per evaluation process.
    """
    heads = ("support + mask", "query", "ground truth", "prediction")
    label_w, head_h, title_h, gap = 96, 18, 22 if title else 0, 4
    rows = len(samples)
    width = label_w + 4 * (PANEL + gap)
    height = title_h + head_h + rows * (PANEL + gap)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    for r, s in enumerate(samples):
        panels = (
            (s["support"], s["support_mask"]),
            (s["query"], None),
            (s["query"], s["ground_truth"]),
            (s["query"], s["prediction"]),
        )
        y = title_h + head_h + r * (PANEL + gap)
        for c, (image, mask) in enumerate(panels):
            rgb = image.astype(np.float32) / 255.0 if mask is None else overlay(image, mask)
            panel, scale, offset = _fit_panel(rgb)
            if mask is not None:
                _outline(panel, mask, scale, offset)
            x = label_w + c * (PANEL + gap)
            canvas[y:y + PANEL, x:x + PANEL] = panel
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    if title:
        draw.text((4, 4), title, fill=(0, 0, 0))
    for c, head in enumerate(heads):
        draw.text((label_w + c * (PANEL + gap) + 4, title_h + 3), head, fill=(0, 0, 0))
    for r, s in enumerate(samples):
        name = (class_names or {}).get(s["class_id"], "")
        y = title_h + head_h + r * (PANEL + gap) + 4
        draw.multiline_text((4, y), f"ep {s['episode']}\nclass {s['class_id']}\n{name}", fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")


def curves_figure(curves_csv: str | os.PathLike, path: str | os.PathLike, val_csv: str | os.PathLike | None = None,
                  title: str = "") -> None:
    """Loss terms and learning rate (and validation mIoU) against the iteration."""
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
