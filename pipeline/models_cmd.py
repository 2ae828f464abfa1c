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
from pipeline.console import console

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
    shot: int = typer.Option(1, help="Shots the imported model will be evaluated with by default."),
    dataset: Optional[str] = typer.Option(None, help="pascal or coco: chooses PFENet's pyramid bins (absolute [60,30,15,8] or COCO's fractions) for pfenet/celp files."),
) -> None:
    """Load a released PFENet, CELP or PANet checkpoint into this project's model and save it."""
    options: dict = {"shot": shot}
    if dataset is not None:
        if format is ImportFormat.panet:
            raise ConfigError("--dataset only applies to pfenet and celp files (it sets PFENet's pyramid bins).")
        if dataset not in ("pascal", "coco"):
            raise ConfigError(f"unknown dataset {dataset!r} for --dataset; choose one of: pascal, coco.")
        options["pyramid_bins"] = dataset  # the importers' named presets
    model, report = import_checkpoint(format.value, file, **options)
    save_model_file(
        out, model, method=report["method"], backbone=report["backbone"], shot=shot,
        knobs=report.get("knobs", {}), source=f"{format.value}:{file}",
    )
    console.print(f"[green]imported[/green] {file} -> {out}")
    typer.echo(json.dumps({k: v for k, v in report.items() if k != "knobs"}, default=str))
