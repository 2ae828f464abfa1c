"""Console helpers shared by the CLI stages: progress bars and one-line errors."""

from __future__ import annotations

import io
import os
import sys
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

console = Console(stderr=True)
#: a child of pipeline.parallel gets this variable: every line it prints starts with its value
LOG_PREFIX_ENV = "FSS_LOG_PREFIX"


class PrefixLines(io.TextIOBase):
    """A text stream that writes ``prefix`` before every line (a fold's output in a parallel stage)."""

    def __init__(self, stream, prefix: str):
        self.stream, self.prefix, self.at_line_start = stream, prefix, True

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", None) or "utf-8"

    def write(self, text) -> int:
        if isinstance(text, (bytes, bytearray)):  # click.echo may hand over encoded text
            text = bytes(text).decode(self.encoding, errors="replace")
        out = []
        for piece in text.splitlines(keepends=True):
            out.append((self.prefix if self.at_line_start else "") + piece)
            self.at_line_start = piece.endswith("\n")
        self.stream.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


def prefix_output_lines() -> None:
    """Started by pipeline.parallel (LOG_PREFIX_ENV set): prefix stdout's and stderr's lines."""
    prefix = os.environ.get(LOG_PREFIX_ENV)
    if prefix and not isinstance(sys.stderr, PrefixLines):
        sys.stdout, sys.stderr = PrefixLines(sys.stdout, prefix), PrefixLines(sys.stderr, prefix)


def set_line_prefix(prefix: str | None) -> None:
    """The prefix of the lines from now on (one fold after another in one process), where lines
    are prefixed; None: back to the process's own (LOG_PREFIX_ENV)."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, PrefixLines):
            stream.prefix = prefix or os.environ.get(LOG_PREFIX_ENV, "")


def track(iterable: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """A rich progress bar over ``iterable`` (on stderr, so JSON on stdout stays clean)."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task(description, total=total)
        for item in iterable:
            yield item
            progress.advance(task)
