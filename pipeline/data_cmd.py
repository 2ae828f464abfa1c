"""`fss data summary`: how many images each class has in every fold's lists."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from fss.data import classes as C
from fss.data.prepared import PreparedDataset, read_meta
from fss.errors import ConfigError, DataError

app = typer.Typer(help="Inspect prepared datasets.", no_args_is_help=True)

SPLITS = ("train", "val")


@app.callback()
def _group() -> None:
    """Inspect prepared datasets."""


def class_counts(root: Path, dataset: str, convention: str | None = None) -> dict[str, dict[str, dict[str, int]]]:
    """``{"fold0": {"train": {"6": 123, ...}, "val": {...}}, ...}``: images indexed under each
    class of the split (1-based class ids as strings, every class of the split listed)."""
    dataset = C.check_dataset(dataset)
    if convention is not None and dataset != "coco":
        raise ConfigError(f"--coco-split applies to coco only, not to {dataset}; drop it.")
    convention = C.check_convention(dataset, convention)
    meta = read_meta(root)
    if meta.get("dataset") != dataset:
        raise DataError(f"{root} holds a prepared {meta.get('dataset')!r} dataset, not {dataset!r}; pass --dataset {meta.get('dataset')}.")
    out: dict[str, dict[str, dict[str, int]]] = {}
    for fold in range(C.NUM_FOLDS):
        out[f"fold{fold}"] = {}
        for split in SPLITS:
            counts = PreparedDataset(root, fold, split, convention).class_counts()
            out[f"fold{fold}"][split] = {str(c): n for c, n in sorted(counts.items())}
    return out


def summary_table(summary: dict, class_names: list[str], split: str, title: str) -> Table:
    """Rows = classes, columns = folds; blank where the class is not a ``split`` class of the fold."""
    table = Table(title=title)
    table.add_column("id", justify="right")
    table.add_column("class", no_wrap=True, min_width=max((len(n) for n in class_names), default=5))
    for fold in summary:
        table.add_column(fold, justify="right")
    for c in range(1, len(class_names) + 1):
        cells = [summary[fold][split].get(str(c)) for fold in summary]
        table.add_row(str(c), class_names[c - 1], *("" if n is None else str(n) for n in cells))
    return table


@app.command("summary")
def summary(
    dataset: str = typer.Option(..., help="Dataset the directory was prepared from: pascal, coco or synthetic."),
    root: Path = typer.Option(..., help="Prepared dataset directory (output of 'fss prepare')."),
    coco_split: Optional[str] = typer.Option(
        None, help="COCO fold convention: interleaved (default; PFENet/HSNet/BAM) or contiguous (PANet). coco only."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON {fold: {split: {class id: images}}} instead of a table."),
) -> None:
    """Images per class in each fold's train (base classes) and val (novel classes) lists."""
    result = class_counts(root, dataset, coco_split)
    if as_json:
        typer.echo(json.dumps(result, sort_keys=False))
        return

    meta = read_meta(root)
    names = list(meta.get("class_names") or [str(c) for c in range(1, C.NUM_CLASSES[dataset] + 1)])
    convention = C.check_convention(dataset, coco_split)
    console = Console()
    console.print(f"{dataset} ({convention}) images per class: {root}", soft_wrap=True, highlight=False, markup=False)
    for split, what in (("train", "train lists (base classes)"), ("val", "val lists (novel classes)")):
        console.print(summary_table(result, names, split, what))
