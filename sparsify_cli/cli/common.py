"""What every verb shares: the console and the translation of UserError into a one-line error + exit code."""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from sparsify_cli.errors import UserError

console = Console()
err_console = Console(stderr=True)
if not console.is_terminal:  # logs and CI: wide enough that tables keep their columns (rich assumes 80)
    console.width = 132

F = TypeVar("F", bound=Callable)


def user_errors_exit(fn: F) -> F:
    """Run a verb; a UserError becomes `error: <message>` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def print_table(table: Table) -> None:
    """Print a table whole: on a terminal too narrow for its numbers, lines run long rather than lose digits."""
    need = Measurement.get(console, console.options.update(max_width=10_000), table).maximum
    if need <= console.width:
        console.print(table)
        return
    wide = Console(width=need, file=console.file, force_terminal=console.is_terminal,
                   color_system=console.color_system or None)
    wide.print(table, crop=False)
