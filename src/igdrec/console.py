"""Rich console and progress bars shared by all stages (one look, one place to change it)."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


def progress_disabled() -> bool:
    return os.environ.get("IGDREC_NO_PROGRESS") == "1" or not sys.stderr.isatty() and os.environ.get("CI") == "true"


@contextmanager
def progress_bar(*extra_columns) -> Iterator[Progress]:
    """A progress bar with count, elapsed time and ETA; `extra_columns` add e.g. a throughput field."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        *extra_columns,
    ]
    with Progress(*columns, console=err_console, disable=progress_disabled(), transient=False) as progress:
        yield progress


def print_table(title: str, rows: list[tuple[str, object]] | dict, columns: tuple[str, str] = ("statistic", "value")) -> None:
    if isinstance(rows, dict):
        rows = list(rows.items())
    table = Table(title=title)
    table.add_column(columns[0])
    table.add_column(columns[1], justify="right")
    for key, value in rows:
        table.add_row(str(key), format_value(value))
    console.print(table)


def format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 1000 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
