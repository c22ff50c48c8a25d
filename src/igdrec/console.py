"""Rich console and progress bars shared by all stages (one look, one place to change it)."""

from __future__ import annotations

import os
import re
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
from rich.text import Text

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)

# Characters a terminal acts on instead of showing: C0/C1 controls and DEL (ESC starts colour, screen-clear
# and window-title sequences; a newline would break a table row or a one-line error) and the Unicode
# direction overrides and line separators, which make text look other than it is.
UNSAFE_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


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


def shown(value: object) -> Text:
    """Text from data (a title, a name, a message that quotes them) as rich prints it: unsafe characters
    escaped as `\\x1b` or `\\u202e`, and brackets shown as they are, never read as rich markup."""
    return Text(UNSAFE_CHARS.sub(_escaped, str(value)))


def _escaped(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def print_table(title: str, rows: list[tuple[str, object]] | dict, columns: tuple[str, str] = ("statistic", "value")) -> None:
    if isinstance(rows, dict):
        rows = list(rows.items())
    table = Table(title=shown(title))
    table.add_column(columns[0])
    table.add_column(columns[1], justify="right")
    for key, value in rows:
        table.add_row(shown(key), shown(format_value(value)))
    console.print(table)


def format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 1000 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
