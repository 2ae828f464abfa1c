"""The `fss` command line."""

from __future__ import annotations

import sys

import typer
from rich.markup import escape

from fss.errors import FSSError
from pipeline import aggregate, bench, data_cmd, evaluate, graph, models_cmd, prepare, pretrain, train_cmd
from pipeline.console import console, prefix_output_lines
from pipeline.sweep import cli as sweep_cli

app = typer.Typer(
    help="Few-shot segmentation pipeline: prepare data, train, evaluate, aggregate, sweep, bench.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # fss --install-completion (bash, zsh, fish, PowerShell)
)
app.add_typer(prepare.app, name="prepare")
app.add_typer(data_cmd.app, name="data")
app.command("methods")(models_cmd.methods)
app.add_typer(models_cmd.checkpoint_app, name="checkpoint")
app.command("pretrain")(pretrain.pretrain_command)
app.command("train")(train_cmd.train_command)
app.command("evaluate")(evaluate.evaluate_command)
app.command("aggregate")(aggregate.aggregate_command)
app.command("bench")(bench.bench_command)
app.command("graph")(graph.graph_command)
app.add_typer(sweep_cli.app, name="sweep")


def main() -> None:
    """Console-script entry: user errors become one red line and exit code 2."""
    prefix_output_lines()  # started by pipeline.parallel: one of several folds writing to one terminal
    try:
        app()
    except FSSError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        sys.exit(130)


if __name__ == "__main__":  # `python -m pipeline.cli` (e.g. under torchrun -m)
    main()
