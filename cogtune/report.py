"""The one reporting layer: messages, progress bars and tables, built on rich.

Engine code never calls `print`. Messages and progress go to stderr so that stdout stays clean for
machine-readable output (`--json`); tables and summaries meant as results go to stdout. In a
multi-process run only the main process reports (see `set_main_process`); warnings and errors show
on every process, except those every process has in common (`shared`), which the main one shows once.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
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
from rich.table import Column, Table
from rich.text import Text

from cogtune import startup
from cogtune.launch import is_main_launch_process
from cogtune.quiet import StderrProxy

# Without a terminal (CI logs, pipes) rich assumes 80 columns, which squeezes the progress fields.
_WIDTH = None if sys.stderr.isatty() else int(os.environ.get("COLUMNS", 120))
stdout = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else _WIDTH)
stderr = Console(file=StderrProxy(), highlight=False, soft_wrap=True, width=_WIDTH)

# Until the recipe says (`set_main_process`), the launcher's variables tell: rank 0 is the main process.
_is_main_process = is_main_launch_process()
# The command line this process was started with (set by the CLI), for messages that tell the
# user what to run next (e.g. how to resume an interrupted run).
invocation: list[str] | None = None


def set_main_process(is_main: bool) -> None:
    """Silence messages and progress on all but the main process of a distributed run."""
    global _is_main_process
    _is_main_process = is_main


def is_main_process() -> bool:
    """Whether this process shows the messages a launch's processes share (`set_main_process`)."""
    return _is_main_process


def _enabled() -> bool:
    return _is_main_process and os.environ.get("COGTUNE_QUIET") != "1"


def binary_size(count: float) -> str:
    """Bytes as people read them in binary units: `512.0 B`, `3.4 MiB`, `18.2 GiB`."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


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


def warn(message: str, shared: bool = False) -> None:
    """Warnings are shown on every process: a problem on rank 3 matters too.

    `shared`: every process of a launch says the same (the launch's settings, a checkpoint they all
    read, the Ctrl-C the launcher forwards to each): only the main process shows it.
    """
    if shared and not _is_main_process:
        return
    stderr.print(f"[yellow]warning:[/] {escape(message)}")


def error(message: str, hint: str | None = None, shared: bool = False) -> None:
    """One line on stderr: the reason, then what to do about it (`shared`: as for `warn`)."""
    if shared and not _is_main_process:
        return
    suffix = f" [dim](hint: {escape(hint)})[/]" if hint else ""
    stderr.print(f"[red]error:[/] {escape(message)}{suffix}")


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """`1 video`, `3 videos`: a count with its noun in the right number."""
    return f"{count} {noun if count == 1 else plural_form or noun + 's'}"


def _singular(unit: str) -> str:
    """`clips` -> `clip`: units are nouns of one item; a plural given by a caller is taken back."""
    return unit[:-1] if unit.endswith("s") and not unit.endswith("ss") else unit


class RateColumn(ProgressColumn):
    """`2.10 clips/s`, or `1.32 s/step` when slower than one per second; blank until one is done.

    With `average`, the rate over the whole task (what its summary line reports), else rich's
    estimate over the last seconds.
    """

    def __init__(self, unit: str, average: bool = False):
        super().__init__(table_column=Column(no_wrap=True))
        self.unit = _singular(unit)
        self.average = average

    def render(self, task: Task) -> Text:
        if self.average:
            speed = task.completed / task.elapsed if task.completed and task.elapsed else None
        else:
            speed = task.finished_speed or task.speed
        if not speed:
            return Text("")
        if speed >= 1:
            return Text(f"{speed:.2f} {self.unit}s/s", style="progress.data.speed")
        return Text(f"{1 / speed:.2f} s/{self.unit}", style="progress.data.speed")


class _FieldsColumn(ProgressColumn):
    """Extra fields (loss, lr, ...): cut with an ellipsis rather than wrapped when the line is full."""

    def __init__(self):
        super().__init__(table_column=Column(overflow="ellipsis"))

    def render(self, task: Task) -> Text:
        return Text(task.fields.get("fields", ""), no_wrap=True, overflow="ellipsis")


class _FittingProgress(Progress):
    """A progress display whose lines fit the console: the bar shrinks first (down to 10 cells),
    then the extra fields are cut. Rich's own table would squeeze every column, counts included."""

    def make_tasks_table(self, tasks: Iterator[Task]) -> Table:
        tasks = list(tasks)
        if tasks:
            fixed = [c for c in self.columns if isinstance(c, ProgressColumn) and not isinstance(c, BarColumn)]
            options = self.console.options
            widest = max(sum(Measurement.get(self.console, options, column(task)).maximum for column in fixed)
                         for task in tasks)
            for column in self.columns:
                if isinstance(column, BarColumn):
                    column.bar_width = max(10, min(40, self.console.width - widest - len(self.columns)))
        return super().make_tasks_table(tasks)


def _no_wrap() -> Column:
    return Column(no_wrap=True)


class ProgressBar:
    """A handle on one rich progress task: `advance()` and `update(**fields)`."""

    def __init__(self, progress: Progress | None, task_id: Any):
        self._progress = progress
        self._task_id = task_id

    def advance(self, amount: float = 1, **fields: Any) -> None:
        if self._progress is not None:
            self._progress.update(self._task_id, advance=amount, fields=_format_fields(fields))

    def update(self, completed: float | None = None, total: float | None = None, **fields: Any) -> None:
        if self._progress is not None:
            kwargs: dict[str, Any] = {"fields": _format_fields(fields)}
            if completed is not None:
                kwargs["completed"] = completed
            if total is not None:
                kwargs["total"] = total
            self._progress.update(self._task_id, **kwargs)


def _format_fields(fields: dict[str, Any]) -> str:
    parts = []
    for key, value in fields.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        parts.append(f"{key} {value}")
    return "  ".join(parts)


def _columns(counters: list[ProgressColumn], elapsed: bool = True) -> list[ProgressColumn]:
    """Spinner, description, bar, `counters`, elapsed time < ETA (or the ETA alone), extra fields."""
    times: list[ProgressColumn] = [TimeRemainingColumn(compact=True, table_column=_no_wrap())]
    if elapsed:
        times = [TimeElapsedColumn(table_column=_no_wrap()), TextColumn("<", table_column=_no_wrap()), *times]
    return [
        SpinnerColumn(table_column=_no_wrap()),
        TextColumn("[bold]{task.description}", table_column=_no_wrap()),
        BarColumn(table_column=_no_wrap()),
        *counters,
        *times,
        _FieldsColumn(),
    ]


@contextlib.contextmanager
def _bar(description: str, total: int | None, completed: int, counters: list[ProgressColumn]) -> Iterator[ProgressBar]:
    """A rich progress bar (see `_columns`) on one line that fits the terminal."""
    startup.resume_collection()  # long work begins here (cogtune.startup)
    if not _enabled():
        yield ProgressBar(None, None)
        return
    with _FittingProgress(*_columns(counters), console=stderr, transient=False, refresh_per_second=4) as bar:
        task_id = bar.add_task(description, total=total, completed=completed, fields="")
        yield ProgressBar(bar, task_id)


def progress(description: str, total: int | None, unit: str = "item", completed: int = 0):
    """A progress bar with count, rate and ETA; extra fields (loss, lr, ...) via `update`.

    `unit` names one item (`step`, `clip`): the rate reads `2.10 clips/s` or `1.32 s/step`.
    """
    return _bar(description, total, completed, [MofNCompleteColumn(table_column=_no_wrap()), RateColumn(unit)])


def byte_progress(description: str, total: int | None, completed: int = 0):
    """A transfer bar: bytes done of total, rate and ETA in human units (kB, MB, GB)."""
    from rich.progress import DownloadColumn, TransferSpeedColumn

    return _bar(description, total, completed, [DownloadColumn(table_column=_no_wrap()),
                                                TransferSpeedColumn(table_column=_no_wrap())])


class VideoBar:
    """One video's bar: `step()` after each denoising step, `decoding()` once the VAE starts."""

    def __init__(self, progress: Progress | None, task_id: Any):
        self._progress = progress
        self._task_id = task_id
        self.started = time.perf_counter()
        self.decode_started: float | None = None

    def step(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._task_id)
            self._progress.refresh()  # every step is drawn: a step takes far longer than a redraw

    def decoding(self) -> None:
        self.decode_started = time.perf_counter()
        if self._progress is not None:
            self._progress.stop_task(self._task_id)  # the steps' rate and time stay as they were
            self._progress.update(self._task_id, fields="decoding", refresh=True)


class VideoBars:
    """Bars for generating `count` videos of `steps` denoising steps, one video at a time.

    The video at work shows `step 12/50`, the time per step and the ETA, then `decoding`; a
    finished video leaves one line, so thousands of prompts do not fill the live display.
    """

    def __init__(self, progress: Progress | None, count: int, steps: int, description: str):
        self._progress = progress
        self.count = count
        self.steps = steps
        self.description = description
        self.done = 0

    @contextlib.contextmanager
    def video(self) -> Iterator[VideoBar]:
        label = f"{self.description} {self.done + 1}/{self.count}"
        if self._progress is None:
            yield VideoBar(None, None)
            self.done += 1
            return
        task_id = self._progress.add_task(label, total=self.steps, fields="")
        bar = VideoBar(self._progress, task_id)
        try:
            yield bar
        finally:
            self._progress.remove_task(task_id)
        self.done += 1
        finished = time.perf_counter()
        denoised = (bar.decode_started or finished) - bar.started
        decode = f", decoded in {finished - bar.decode_started:.1f} s" if bar.decode_started else ""
        self._progress.console.print(f"[green]✓[/] {escape(label)}: {plural(self.steps, 'step')} in "
                                     f"{denoised:.1f} s ({_per_step(denoised, self.steps)}){decode}")


def _per_step(seconds: float, steps: int) -> str:
    rate = steps / seconds if seconds > 0 else 0
    return f"{rate:.2f} steps/s" if rate >= 1 else f"{seconds / max(steps, 1):.2f} s/step"


@contextlib.contextmanager
def video_progress(count: int, steps: int, description: str = "video") -> Iterator[VideoBars]:
    """`VideoBars` for `count` videos of `steps` denoising steps each (see `generate_videos`)."""
    startup.resume_collection()  # long work begins here (cogtune.startup)
    if not _enabled():
        yield VideoBars(None, count, steps, description)
        return
    counter = TextColumn("step {task.completed:.0f}/{task.total:.0f}", table_column=_no_wrap())
    # No elapsed time: the line of a finished video gives it, and 80 columns keep room for `decoding`.
    columns = _columns([counter, RateColumn("step", average=True)], elapsed=False)
    with _FittingProgress(*columns, console=stderr, transient=True, refresh_per_second=4) as progress:
        yield VideoBars(progress, count, steps, description)


def hub_tqdm_class(on_bytes: Callable[[float, float | None], None]) -> type:
    """A `tqdm_class` for huggingface_hub's downloads that draws nothing and reports bytes instead.

    huggingface_hub reports the bytes of all files to byte bars (unit "B"; in 2.x one for bytes
    received, one for bytes written, which a plain download advances alike) whose totals grow as
    files start: `on_bytes(done, total)` gets the largest of their counts and totals, under a lock
    (transfers run in threads). The file-count bar is ignored. An exception raised by `on_bytes`
    stops the transfer that reported the bytes.
    """
    from huggingface_hub.utils import tqdm as hub_tqdm

    lock = threading.Lock()
    counts: dict[int, tuple[float, float]] = {}

    class _Bar(hub_tqdm):
        def __init__(self, *args: Any, **kwargs: Any):
            kwargs["disable"] = True  # huggingface_hub's own bars stay off: cogtune draws one bar
            self.counts_bytes = kwargs.get("unit") == "B"
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> None:
            self.n += n or 0
            if not self.counts_bytes or not self.n:
                return
            with lock:
                counts[id(self)] = (self.n, self.total or 0)
                total = max(total for _, total in counts.values()) or None
                on_bytes(max(count for count, _ in counts.values()), total)

    return _Bar


@contextlib.contextmanager
def hub_download_progress(description: str) -> Iterator[type]:
    """A `tqdm_class` that feeds one byte bar; the bar appears with the first bytes, so a model
    already in the cache shows nothing."""
    with contextlib.ExitStack() as stack:
        shown: list[ProgressBar] = []

        def on_bytes(done: float, total: float | None) -> None:
            if not shown:
                shown.append(stack.enter_context(byte_progress(description, total=total)))
            shown[0].update(completed=done, total=total)

        yield hub_tqdm_class(on_bytes)


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]], to_stderr: bool = False,
          numeric: bool = True) -> Table:
    """Print a table of results (stdout by default) and return it.

    With `numeric`, columns after the first are right-aligned (figures); otherwise all are left-aligned.
    """
    result = Table(title=title, title_justify="left", show_header=any(columns))
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


