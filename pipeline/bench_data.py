"""`fss bench --data`: the training augmentation's time per image, ours against the
references' own operations, and the DataLoader workers a training step rate needs.

For every row (preset and dataset: pfenet PASCAL 473 and COCO 641, panet 417, hsnet 400,
canet 321; :data:`DATA_ROWS`) the benchmark calls the preset's transform
(``fss.data.transforms.build_train_transform``) and a re-implementation of the reference
codebase's pipeline on one synthetic 500x375 image with its masks (PASCAL's typical size;
:func:`synthetic_pair`), as a query (target and base-class mask) and as a support (one
mask). Call ``i`` of both uses ``numpy.random.default_rng(i)``, so both take the same random
decisions (scale, rotate or not, blur or not, flip, crops) and the two are timed
alternately, call by call, on one thread (``torch`` and ``cv2``, as in a DataLoader worker).

The references, written from their documented formulas (protocol section 4):

* pfenet: PFENet ``util/transform.py``: ``np.float32`` image; RandScale ``cv2.resize(fx,
  fy)`` INTER_LINEAR / INTER_NEAREST; RandRotate ``cv2.getRotationMatrix2D((w/2, h/2))`` +
  ``cv2.warpAffine`` (mean pixel / 255 borders); RandomGaussianBlur ``cv2.GaussianBlur((5,
  5), 0)``; ``cv2.flip``; Crop with ``cv2.copyMakeBorder`` and the 85% retry; ToTensor
  (``torch.from_numpy(image.transpose(2, 0, 1))``) and Normalize (``sub_(mean).div_(std)``
  per channel, 0..255 scale).
* panet / hsnet / canet: PIL images, ``Image.resize`` BILINEAR (image) / NEAREST (labels;
  HSNet: ``torch.nn.functional.interpolate(mode="nearest")`` of the mask tensor),
  ``Image.transpose`` for the flip, ``Image.crop``, then torchvision's ``to_tensor`` and
  ``normalize``.

Per pfenet row it also times each operation alone with fixed parameters (:func:`op_times`).
Reported per row: the median and mean milliseconds per query and per support call, images
per second per worker for a step's mix of one query and ``shot`` supports (from the MEAN
times: throughput), and, with ``--step-rate``, the workers needed to feed that many steps
per second of ``batch`` episodes (``batch * (shot + 1)`` images per step).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as nnf
import torchvision.transforms.functional as TF1
import typer
from PIL import Image
from rich.console import Console
from rich.table import Table

from fss.data import transforms as T
from fss.data.synthetic import render_image
from fss.errors import ConfigError
from pipeline.console import console
from pipeline.machine import machine_description
from pipeline.runs import write_json

DATA_BENCH_KIND = "fss-bench-data"
DATA_BENCH_VERSION = 1
#: (preset, dataset) rows: each preset at its default training size for that dataset
DATA_ROWS = (("pfenet", "pascal"), ("pfenet", "coco"), ("panet", "pascal"), ("hsnet", "pascal"),
             ("canet", "pascal"))
DATA_PRESETS = tuple(dict.fromkeys(p for p, _ in DATA_ROWS))
#: the synthetic image: PASCAL VOC's most common size
PAIR_HEIGHT, PAIR_WIDTH = 375, 500
#: fixed parameters of the per-operation timings (a draw inside each range)
OP_FACTOR, OP_ANGLE = 1.05, 6.5


# ---------------------------------------------------------------- the images


def synthetic_pair(height: int = PAIR_HEIGHT, width: int = PAIR_WIDTH, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A rendered synthetic-benchmark image resized to ``height x width`` (uint8 RGB) and its
    masks ``uint8 [2, H, W]``: the largest object's class as target (0/1, 255 on the object
    boundaries) and the other objects as the base-class mask."""
    image, classes, _ = render_image(seed, 0, size=max(height, width))
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    classes = cv2.resize(classes, (width, height), interpolation=cv2.INTER_NEAREST)
    ids, counts = np.unique(classes[(classes > 0) & (classes != 255)], return_counts=True)
    if len(ids) == 0:
        raise ConfigError(f"synthetic image for seed {seed} has no object; use another --seed.")
    target_id = ids[np.argmax(counts)]
    target = np.where(classes == 255, 255, classes == target_id).astype(np.uint8)
    base = ((classes > 0) & (classes != 255) & (classes != target_id)).astype(np.uint8)
    return image, np.stack([target, base])


# ---------------------------------------------------------------- the references


class ReferencePFENet:
    """PFENet ``util/transform.py``'s training pipeline (see the module docstring), its
    labels being each of our masks in turn; random draws from ``rng`` in the reference's
    order (``random.random()`` / ``random.randint(a, b)`` there)."""

    def __init__(self, size: int, scale_range: tuple[float, float]):
        self.size = size
        self.scale_range = scale_range

    def __call__(self, image, masks, rng, role="query"):
        image, labels = np.float32(image), list(masks)
        factor = self.scale_range[0] + (self.scale_range[1] - self.scale_range[0]) * rng.random()
        image = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR)
        labels = [cv2.resize(x, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST) for x in labels]
        if rng.random() < 0.5:
            angle = -10.0 + 20.0 * rng.random()
            h, w = labels[0].shape
            matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1)
            image = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_CONSTANT, borderValue=T.MEAN_PIXEL_255)
            labels = [cv2.warpAffine(x, matrix, (w, h), flags=cv2.INTER_NEAREST,
                                     borderMode=cv2.BORDER_CONSTANT, borderValue=255) for x in labels]
        if rng.random() < 0.5:
            image = cv2.GaussianBlur(image, (5, 5), 0)
        if rng.random() < 0.5:
            image, labels = cv2.flip(image, 1), [cv2.flip(x, 1) for x in labels]
        image, labels = self.crop(image, labels, rng)
        tensor = torch.from_numpy(image.transpose((2, 0, 1)))
        for channel, m, s in zip(tensor, T.MEAN_PIXEL_255, [s * 255 for s in T.IMAGENET_STD]):
            channel.sub_(m).div_(s)
        return tensor, torch.from_numpy(np.stack(labels)).long()

    def crop(self, image, labels, rng):
        """Crop(crop_type='rand', padding=mean, ignore_label=255)."""
        h, w = labels[0].shape
        pad_h, pad_w = max(self.size - h, 0), max(self.size - w, 0)
        pad_h_half, pad_w_half = int(pad_h / 2), int(pad_w / 2)
        if pad_h > 0 or pad_w > 0:
            sides = (pad_h_half, pad_h - pad_h_half, pad_w_half, pad_w - pad_w_half)
            image = cv2.copyMakeBorder(image, *sides, cv2.BORDER_CONSTANT, value=T.MEAN_PIXEL_255)
            labels = [cv2.copyMakeBorder(x, *sides, cv2.BORDER_CONSTANT, value=255) for x in labels]
        h, w = labels[0].shape
        raw_pos = np.sum(labels[0] == 1)

        def cut():
            top, left = rng.integers(0, h - self.size + 1), rng.integers(0, w - self.size + 1)
            box = (slice(top, top + self.size), slice(left, left + self.size))
            return image[box], [x[box] for x in labels]

        crop_image, crop_labels = cut()
        count = 0
        while np.sum(crop_labels[0] == 1) < 0.85 * raw_pos and count <= 30:
            crop_image, crop_labels = cut()
            count += 1
        return crop_image, crop_labels


class ReferencePIL:
    """The PIL pipelines of PANet (resize, flip p=0.5), HSNet (resize) and CANet (query:
    resize; support: resize to a random square ``int(U(1, 1.5) * size)``, random crop, flip),
    then torchvision's ``to_tensor`` and ``normalize``; draws in our order."""

    def __init__(self, preset: str, size: int):
        self.preset = preset
        self.size = size

    def resize(self, image, labels, side):
        image = image.resize((side, side), Image.Resampling.BILINEAR)
        if self.preset == "hsnet":  # HSNet: F.interpolate(mask, size, mode="nearest") on tensors
            masks = torch.from_numpy(np.stack([np.asarray(x) for x in labels])).float()[None]
            masks = nnf.interpolate(masks, size=(side, side), mode="nearest")[0].to(torch.uint8).numpy()
            return image, [Image.fromarray(x) for x in masks]
        return image, [x.resize((side, side), Image.Resampling.NEAREST) for x in labels]

    def __call__(self, image, masks, rng, role="query"):
        image, labels = Image.fromarray(image), [Image.fromarray(x) for x in masks]
        flip_p = 0.0 if self.preset == "hsnet" or (self.preset == "canet" and role == "query") else 0.5
        if self.preset == "canet" and role == "support":
            side = max(self.size, int((1.0 + 0.5 * rng.random()) * self.size))
            image, labels = self.resize(image, labels, side)
            top, left = int(rng.integers(0, side - self.size + 1)), int(rng.integers(0, side - self.size + 1))
            box = (left, top, left + self.size, top + self.size)
            image, labels = image.crop(box), [x.crop(box) for x in labels]
        else:
            image, labels = self.resize(image, labels, self.size)
        if flip_p > 0 and rng.random() < flip_p:
            flip = Image.Transpose.FLIP_LEFT_RIGHT
            image, labels = image.transpose(flip), [x.transpose(flip) for x in labels]
        tensor = TF1.normalize(TF1.to_tensor(image), list(T.IMAGENET_MEAN), list(T.IMAGENET_STD))
        return tensor, torch.from_numpy(np.stack([np.asarray(x) for x in labels])).long()


def reference_transform(preset: str, dataset: str):
    """The reference pipeline of a :data:`DATA_ROWS` row, at the preset's default size."""
    size = T.DEFAULT_TRAIN_SIZE[preset][dataset]
    if preset == "pfenet":
        return ReferencePFENet(size, T.PFENET_SCALE[dataset])
    return ReferencePIL(preset, size)


# ---------------------------------------------------------------- timing


def _ms(times: list[float]) -> dict:
    return {"median_ms": 1e3 * statistics.median(times), "mean_ms": 1e3 * statistics.fmean(times)}


def time_alternately(fns: dict, image, masks, role: str, warmup: int, calls: int) -> dict:
    """Seconds of each of ``calls`` calls ``fn(image, masks, default_rng(i), role)`` per
    function, the functions called in turn for each ``i`` (after ``warmup`` untimed rounds)."""
    times = {name: [] for name in fns}
    for i in range(-warmup, calls):
        for name, fn in fns.items():
            rng = np.random.default_rng(max(i, 0))
            start = time.perf_counter()
            fn(image, masks, rng, role)
            if i >= 0:
                times[name].append(time.perf_counter() - start)
    return times


def images_per_second(query_s: float, support_s: float, shot: int) -> float:
    """Images per second of one worker for a step's mix: one query and ``shot`` supports."""
    return (shot + 1) / (query_s + shot * support_s)


def workers_needed(step_rate: float, batch: int, shot: int, query_s: float, support_s: float) -> int:
    """Workers (one thread each) that keep up with ``step_rate`` steps per second of
    ``batch`` episodes: ``ceil(step_rate * batch * (query_s + shot * support_s))``."""
    return math.ceil(step_rate * batch * (query_s + shot * support_s) - 1e-9)


def op_times(dataset: str, image, masks, warmup: int, calls: int) -> dict:
    """Milliseconds (median, mean) of each pfenet operation alone on ``image``, ours (fss) and
    the reference's calls, with fixed parameters: scale by :data:`OP_FACTOR`, rotate the
    scaled image by :data:`OP_ANGLE` degrees, blur, flip, pad + crop, normalise."""
    size = T.DEFAULT_TRAIN_SIZE["pfenet"][dataset]
    ref = ReferencePFENet(size, T.PFENET_SCALE[dataset])
    fimg = np.float32(image)
    simg, smasks = T.scale_arrays(fimg, masks, OP_FACTOR)
    h, w = smasks.shape[-2:]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), OP_ANGLE, 1)
    crop_i, _, _ = T.random_crop_keeping_foreground(simg, smasks, size, np.random.default_rng(0))
    work = crop_i.copy()  # the reference normalises in place: its values drift, its time does not

    def ref_normalize():
        tensor = torch.from_numpy(work.transpose((2, 0, 1)))
        for channel, m, s in zip(tensor, T.MEAN_PIXEL_255, [s * 255 for s in T.IMAGENET_STD]):
            channel.sub_(m).div_(s)

    ops = {
        "scale": (lambda: T.scale_arrays(fimg, masks, OP_FACTOR),
                  lambda: (cv2.resize(fimg, None, fx=OP_FACTOR, fy=OP_FACTOR, interpolation=cv2.INTER_LINEAR),
                           [cv2.resize(x, None, fx=OP_FACTOR, fy=OP_FACTOR, interpolation=cv2.INTER_NEAREST)
                            for x in masks])),
        "rotate": (lambda: T.rotate_arrays(simg, smasks, OP_ANGLE),
                   lambda: (cv2.warpAffine(simg, matrix, (w, h), flags=cv2.INTER_LINEAR,
                                           borderMode=cv2.BORDER_CONSTANT, borderValue=T.MEAN_PIXEL_255),
                            [cv2.warpAffine(x, matrix, (w, h), flags=cv2.INTER_NEAREST,
                                            borderMode=cv2.BORDER_CONSTANT, borderValue=255) for x in smasks])),
        "blur": (lambda: T.gaussian_blur(simg, 5), lambda: cv2.GaussianBlur(simg, (5, 5), 0)),
        "flip": (lambda: T.hflip_arrays(simg, smasks), lambda: (cv2.flip(simg, 1), [cv2.flip(x, 1) for x in smasks])),
        "pad_crop": (lambda: T.random_crop_keeping_foreground(simg, smasks, size, np.random.default_rng(0)),
                     lambda: ref.crop(simg, list(smasks), np.random.default_rng(0))),
        "normalize": (lambda: T.normalize_array(crop_i), ref_normalize),
    }
    out = {}
    for name, (ours, theirs) in ops.items():
        fns = {"ours": lambda *_, f=ours: f(), "reference": lambda *_, f=theirs: f()}
        times = time_alternately(fns, None, None, "query", warmup, calls)
        out[name] = {who: _ms(t) for who, t in times.items()}
    return out


def bench_row(preset: str, dataset: str, image, masks, *, batch: int, shot: int, warmup: int, calls: int,
              step_rate: float | None) -> dict:
    """One :data:`DATA_ROWS` row: query and support timings of ours and the reference."""
    ours = T.build_train_transform(preset, dataset)
    fns = {"ours": ours, "reference": reference_transform(preset, dataset)}
    row = {"preset": preset, "dataset": dataset, "size": ours.size, "methods": {}}
    timed = {role: time_alternately(fns, image, masks if role == "query" else masks[:1], role, warmup, calls)
             for role in ("query", "support")}
    for who in fns:
        q, s = timed["query"][who], timed["support"][who]
        entry = {"query": _ms(q), "support": _ms(s),
                 "images_per_s": images_per_second(statistics.fmean(q), statistics.fmean(s), shot)}
        if step_rate is not None:
            entry["workers"] = workers_needed(step_rate, batch, shot, statistics.fmean(q), statistics.fmean(s))
        row["methods"][who] = entry
    # time per image of a step's mix, ours over the reference's
    row["ours_over_reference"] = row["methods"]["reference"]["images_per_s"] / row["methods"]["ours"]["images_per_s"]
    return row


def run_data_benchmark(presets: list[str] | None = None, *, batch: int = 2, shot: int = 1, warmup: int = 1,
                       calls: int = 200, step_rate: float | None = None, threads: int = 1, seed: int = 0,
                       say=None) -> dict:
    """Every :data:`DATA_ROWS` row of ``presets`` (default all); returns the JSON report."""
    say = say or (lambda m: None)
    for name, value, low in (("--batch", batch, 1), ("--shot", shot, 1), ("--warmup", warmup, 0),
                             ("--repeats", calls, 1), ("--threads", threads, 1)):
        if value < low:
            raise ConfigError(f"{name} {value} must be at least {low}.")
    if step_rate is not None and step_rate <= 0:
        raise ConfigError(f"--step-rate {step_rate} must be positive (training steps per second).")
    unknown = [p for p in presets or [] if p not in DATA_PRESETS]
    if unknown:
        raise ConfigError(f"unknown --preset {unknown[0]!r} for --data; choose from: {', '.join(DATA_PRESETS)}.")
    torch.set_num_threads(threads)
    cv2.setNumThreads(T.CV2_THREADS if threads == 1 else threads)
    image, masks = synthetic_pair(seed=seed)
    rows, ops = [], {}
    for preset, dataset in DATA_ROWS:
        if presets and preset not in presets:
            continue
        say(f"{preset} {dataset}: {calls} calls per role")
        rows.append(bench_row(preset, dataset, image, masks, batch=batch, shot=shot, warmup=warmup,
                              calls=calls, step_rate=step_rate))
        if preset == "pfenet":
            ops[dataset] = op_times(dataset, image, masks, warmup, calls)
    machine = machine_description(torch.device("cpu"))
    machine["cv2_threads"] = cv2.getNumThreads()
    machine["cv2_version"] = cv2.__version__
    return {
        "kind": DATA_BENCH_KIND, "version": DATA_BENCH_VERSION, "machine": machine,
        "settings": {"image": [PAIR_HEIGHT, PAIR_WIDTH], "batch": batch, "shot": shot, "warmup": warmup,
                     "calls": calls, "step_rate": step_rate, "threads": threads, "seed": seed,
                     "images_per_step": batch * (shot + 1)},
        "rows": rows, "ops": ops,
    }


# ---------------------------------------------------------------- output

ROW_COLUMNS = ("preset", "dataset", "size", "ours query ms", "ours support ms", "ours img/s", "ref query ms",
               "ref support ms", "ref img/s", "ours/ref")


def _row_cells(row: dict, step_rate) -> list[str]:
    ours, ref = row["methods"]["ours"], row["methods"]["reference"]
    cells = [row["preset"], row["dataset"], str(row["size"])]
    for m in (ours, ref):
        cells += [f"{m['query']['median_ms']:.2f}", f"{m['support']['median_ms']:.2f}", f"{m['images_per_s']:.0f}"]
    cells.append(f"{row['ours_over_reference']:.2f}")
    if step_rate is not None:
        cells += [str(ours["workers"]), str(ref["workers"])]
    return cells


def _columns(report: dict) -> list[str]:
    extra = ["workers ours", "workers ref"] if report["settings"]["step_rate"] is not None else []
    return list(ROW_COLUMNS) + extra


def _title(report: dict) -> str:
    s, m = report["settings"], report["machine"]
    rate = f", {s['step_rate']:g} steps/s of {s['images_per_step']} images" if s["step_rate"] is not None else ""
    return (f"fss bench --data: {s['image'][1]}x{s['image'][0]} image, {s['shot']}-shot mix, batch {s['batch']}{rate}; "
            f"{m['cpu_model']}, {s['threads']} thread(s) (cv2 {m['cv2_version']}, {m['cv2_threads']} threads); "
            f"ms = median of {s['calls']} calls, img/s from the mean")


def data_results_table(report: dict):
    """Rich tables: one row per preset and dataset, then pfenet's operations one by one."""
    table = Table(title=_title(report), title_justify="left")
    for col in _columns(report):
        table.add_column(col, justify="left" if col in ("preset", "dataset") else "right", no_wrap=True)
    for row in report["rows"]:
        table.add_row(*_row_cells(row, report["settings"]["step_rate"]))
    tables = [table]
    for dataset, ops in report["ops"].items():
        op_table = Table(title=f"pfenet {dataset}: one operation (ms, median / mean)", title_justify="left")
        for col in ("operation", "ours", "reference"):
            op_table.add_column(col, justify="left" if col == "operation" else "right")
        for name, v in ops.items():
            op_table.add_row(name, *(f"{v[w]['median_ms']:.3f} / {v[w]['mean_ms']:.3f}" for w in ("ours", "reference")))
        tables.append(op_table)
    return tables


def data_markdown(report: dict) -> str:
    """The report as Markdown tables (for docs/benchmarks.md)."""
    cols = _columns(report)
    lines = [_title(report), "", "| " + " | ".join(cols) + " |",
             "|" + "|".join("---" if c in ("preset", "dataset") else "---:" for c in cols) + "|"]
    lines += ["| " + " | ".join(_row_cells(r, report["settings"]["step_rate"])) + " |" for r in report["rows"]]
    for dataset, ops in report["ops"].items():
        lines += ["", f"pfenet {dataset}, one operation, ms (median / mean):", "",
                  "| operation | ours | reference |", "|---|---:|---:|"]
        lines += [f"| {name} | {v['ours']['median_ms']:.3f} / {v['ours']['mean_ms']:.3f} "
                  f"| {v['reference']['median_ms']:.3f} / {v['reference']['mean_ms']:.3f} |" for name, v in ops.items()]
    return "\n".join(lines) + "\n"


def report_data_benchmark(presets, *, out: Path, as_json: bool, markdown: bool, **settings) -> None:
    """``fss bench --data``: run :func:`run_data_benchmark`, write ``out`` and print the report."""
    report = run_data_benchmark(
        presets or None, say=lambda m: console.print(m, highlight=False, markup=False, soft_wrap=True), **settings)
    write_json(out, report)
    if as_json:
        typer.echo(json.dumps(report, indent=2, sort_keys=True))
    elif markdown:
        typer.echo(data_markdown(report), nl=False)
    else:
        stdout = Console() if Console().is_terminal else Console(width=200)
        for table in data_results_table(report):
            stdout.print(table)
        console.print(f"report -> {out}", highlight=False, markup=False)
