"""The one reporting layer: messages, progress bars and tables, built on rich.

Engine code never calls `print`. Messages and progress go to stderr so that stdout stays clean for
machine-readable output (`--json`); tables and summaries meant as results go to stdout. In a
multi-process run only the main process reports (see `set_main_process`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from cogtune.quiet import StderrProxy

# Without a terminal (CI logs, pipes) rich assumes 80 columns, which squeezes the progress fields.
_WIDTH = None if sys.stderr.isatty() else int(os.environ.get("COLUMNS", 120))
stdout = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else _WIDTH)
stderr = Console(file=StderrProxy(), highlight=False, soft_wrap=True, width=_WIDTH)

_is_main_process = True


def set_main_process(is_main: bool) -> None:
    """Silence messages and progress on all but the main process of a distributed run."""
    global _is_main_process
    _is_main_process = is_main


def _enabled() -> bool:
    return _is_main_process and os.environ.get("COGTUNE_QUIET") != "1"


def info(message: str) -> None:
    if _enabled():
        stderr.print(escape(message))


def step(title: str) -> None:
    """A heading for a stage of longer work."""
    if _enabled():
        stderr.rule(f"[bold]{escape(title)}", align="left")


def success(message: str) -> None:
    if _enabled():
        stderr.print(f"[green]✓[/] {escape(message)}")


def warn(message: str) -> None:
    """Warnings are shown on every process: a problem on rank 3 matters too."""
    stderr.print(f"[yellow]warning:[/] {escape(message)}")


def error(message: str, hint: str | None = None) -> None:
    """One line on stderr: the reason, then what to do about it."""
    suffix = f" [dim](hint: {escape(hint)})[/]" if hint else ""
    stderr.print(f"[red]error:[/] {escape(message)}{suffix}")


class RateColumn(ProgressColumn):
    """Items per second, or seconds per item when slower than one per second."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text(f"-- {self.unit}/s", style="progress.data.speed")
        if speed >= 1:
            return Text(f"{speed:.2f} {self.unit}/s", style="progress.data.speed")
        return Text(f"{1 / speed:.2f} s/{self.unit}", style="progress.data.speed")


class ProgressBar:
    """A handle on one rich progress task: `advance()` and `update(**fields)`."""

    def __init__(self, progress: Progress | None, task_id: Any):
        self._progress = progress
        self._task_id = task_id

    def advance(self, amount: float = 1, **fields: Any) -> None:
        if self._progress is not None:
            self._progress.update(self._task_id, advance=amount, fields=_format_fields(fields))

    def update(self, completed: float | None = None, **fields: Any) -> None:
        if self._progress is not None:
            kwargs: dict[str, Any] = {"fields": _format_fields(fields)}
            if completed is not None:
                kwargs["completed"] = completed
            self._progress.update(self._task_id, **kwargs)


def _format_fields(fields: dict[str, Any]) -> str:
    parts = []
    for key, value in fields.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        parts.append(f"{key} {value}")
    return "  ".join(parts)


@contextlib.contextmanager
def _bar(description: str, total: int | None, completed: int, counters: list[ProgressColumn]) -> Iterator[ProgressBar]:
    """A rich progress bar: spinner, description, bar, `counters`, elapsed time, ETA, extra fields."""
    if not _enabled():
        yield ProgressBar(None, None)
        return
    columns: list[ProgressColumn] = [
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        *counters,
        TimeElapsedColumn(),
        TextColumn("<"),
        TimeRemainingColumn(compact=True),
        TextColumn("{task.fields[fields]}"),
    ]
    with Progress(*columns, console=stderr, transient=False, refresh_per_second=4) as bar:
        task_id = bar.add_task(description, total=total, completed=completed, fields="")
        yield ProgressBar(bar, task_id)


def progress(description: str, total: int | None, unit: str = "it", completed: int = 0):
    """A progress bar with count, rate and ETA; extra fields (loss, lr, ...) via `update`."""
    return _bar(description, total, completed, [MofNCompleteColumn(), RateColumn(unit)])


def byte_progress(description: str, total: int | None, completed: int = 0):
    """A transfer bar: bytes done of total, rate and ETA in human units (kB, MB, GB)."""
    from rich.progress import DownloadColumn, TransferSpeedColumn

    return _bar(description, total, completed, [DownloadColumn(), TransferSpeedColumn()])


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]], to_stderr: bool = False,
          numeric: bool = True) -> Table:
    """Print a table of results (stdout by default) and return it.

    With `numeric`, columns after the first are right-aligned (figures); otherwise all are left-aligned.
    """
    result = Table(title=title, title_justify="left")
    for index, column in enumerate(columns):
        result.add_column(column, justify="right" if numeric and index > 0 else "left")
    for row in rows:
        result.add_row(*(_cell(value) for value in row))
    if _enabled():
        (stderr if to_stderr else stdout).print(result)
    return result


def key_values(title: str | None, rows: Sequence[tuple[str, Any]], to_stderr: bool = False) -> Table:
    """A two-column summary (setting, value), left-aligned."""
    return table(title, ["", ""], rows, to_stderr=to_stderr, numeric=False)


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner for work of unknown length (loading a model)."""
    if not _enabled():
        yield
        return
    with stderr.status(message):
        yield


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


