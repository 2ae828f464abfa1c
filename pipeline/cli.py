"""The `fss` command line."""

from __future__ import annotations

import sys

import typer

from pipeline import prepare

app = typer.Typer(
    help="Few-shot segmentation pipeline: prepare data, train, evaluate, aggregate, sweep, bench.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(prepare.app, name="prepare")


def main() -> None:
    """Console-script entry: user errors become one red line and exit code 2."""
    from fss.errors import FSSError
    from pipeline.console import console

    try:
        app()
    except FSSError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        sys.exit(130)
