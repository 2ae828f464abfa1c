"""`fss methods` (the registry) and `fss checkpoint import` (released checkpoints)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from fss.errors import ConfigError
from fss.models.checkpoints import import_checkpoint, save_model_file
from fss.models.registry import get_method, list_methods

checkpoint_app = typer.Typer(help="Released reference checkpoints.", no_args_is_help=True)


def methods(json_out: bool = typer.Option(False, "--json", help="Print the registry as JSON.")) -> None:
    """List the registered methods, their base method and their knobs (defaults, allowed values)."""
    described = [get_method(n).describe() for n in list_methods()]
    if json_out:
        typer.echo(json.dumps(described, indent=2))
        return
    for d in described:
        table = Table(title=f"{d['name']}  (base: {d['base'] or '-'})  {d['help']}", title_justify="left")
        for col in ("knob", "default", "allowed", "table", "help"):
            table.add_column(col, overflow="fold")
        for k, v in d["knobs"].items():
            allowed = v.get("choices") or (f"[{v['range'][0]}, {v['range'][1]}]" if "range" in v else v["type"])
            table.add_row(k, repr(v["default"]), str(allowed), v.get("table", ""), v.get("help", ""))
        Console().print(table)


class ImportFormat(str, Enum):
    pfenet = "pfenet"
    celp = "celp"
    panet = "panet"


@checkpoint_app.command("import")
def import_(
    file: Path = typer.Argument(..., help="The released checkpoint file (.pth)."),
    format: ImportFormat = typer.Option(..., "--format", help="Which reference implementation saved FILE."),
    out: Path = typer.Option(..., help="Where to write the model file of this project (.pt)."),
    dataset: Optional[str] = typer.Option(
        None, help="pascal or coco: the dataset FILE was trained on. Required for pfenet and celp (it sets "
                   "PFENet's pyramid bins, which the keys cannot tell); recorded, and 'fss evaluate' refuses "
                   "another dataset."),
    train_shot: Optional[int] = typer.Option(
        None, "--train-shot", help="Shots FILE was trained with (recorded as train_shot; 'fss evaluate --shot' "
                                   "chooses the test shots)."),
    json_out: bool = typer.Option(False, "--json", help="Print the import report as JSON only."),
) -> None:
    """Load a released PFENet, CELP or PANet checkpoint into this project's model and save it."""
    if train_shot is not None and train_shot < 1:
        raise ConfigError(f"--train-shot {train_shot} must be a positive integer.")
    model, report = import_checkpoint(format.value, file, dataset=dataset)
    save_model_file(
        out, model, method=report["method"], backbone=report["backbone"], shot=train_shot,
        knobs=report["knobs"], source=f"{format.value}:{file}", dataset=report["dataset"],
    )
    report = {**report, "train_shot": train_shot, "out": str(out)}
    if json_out:
        typer.echo(json.dumps(report))
        return
    typer.echo(import_summary(report))


def import_summary(report: dict) -> str:
    """The import report for a person: what was read, and every setting recorded with the weights."""
    epoch = "" if report["epoch"] is None else f", epoch {report['epoch']}"
    knobs = ", ".join(f"{k}={v}" for k, v in report["knobs"].items()) or "defaults"
    return "\n".join([
        f"imported {report['source']} -> {report['out']}",
        f"  {report['format']} file: {report['method']} with backbone {report['backbone']}, "
        f"{report['file_keys']} tensors in the file, all {report['matched']} model keys loaded{epoch}",
        f"  dataset: {report['dataset'] or 'not recorded'}; knobs: {knobs}",
        f"  train shot: {report['train_shot'] or 'not recorded'} (evaluate chooses --shot and --ways)",
    ])
