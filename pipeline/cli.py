"""The `fss` command line."""

from __future__ import annotations

import sys

import typer

from pipeline import data_cmd, models_cmd, prepare

app = typer.Typer(
    help="Few-shot segmentation pipeline: prepare data, train, evaluate, aggregate, sweep, bench.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(prepare.app, name="prepare")
app.add_typer(data_cmd.app, name="data")
app.command("methods")(models_cmd.methods)
app.add_typer(models_cmd.checkpoint_app, name="checkpoint")


def main() -> None:
    """Console-script entry: user errors become one red line and exit code 2."""
    from rich.markup import escape

    from fss.errors import FSSError
    from pipeline.console import console

    try:
        app()
    except FSSError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        sys.exit(130)
