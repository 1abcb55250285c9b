"""Options shared by several commands that are not run settings, declared once as `Annotated` aliases.

The options that set a run config (`--lr`, `--frames`, ...) are not here: they are made from the
config's fields by `cogtune.cli.settings`. The callbacks below check values the way the configs
do (`cogtune.config.Bounds`), but as usage errors naming the option, before anything loads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cogtune.config import MODEL_HELP, Bounds


def number(low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Callable[[Any], Any]:
    """An option callback: the value (None: not given) must be finite and within the bounds.

    Click's own ranges let NaN through (every comparison with NaN is false), so numeric options use
    this: `--lr nan` is a usage error naming the option, before anything loads.
    """
    bounds = Bounds(low, high, low_open, high_open)

    def check(value: Any) -> Any:
        problem = bounds.problem(value) if value is not None else None
        if problem:
            raise typer.BadParameter(problem)
        return value

    return check


def choice(choices: Sequence[str]) -> Callable[[Any], Any]:
    """An option callback: the value (None: not given) must be one of `choices`."""

    def check(value: Any) -> Any:
        if value is not None and value not in choices:
            raise typer.BadParameter(f"'{value}' is not one of {', '.join(choices)}")
        return value

    return check


def completes(values: Sequence[str] | Callable[[], Sequence[str]],
              comma_list: bool = False) -> Callable[[str], list[str]]:
    """`autocompletion=` for a `typer.Option`/`typer.Argument` whose values are a closed set.

    `values`, or a function returning them (to keep an import out of `--help`), are what the shell
    offers. With `comma_list` the option takes `a,b,c` and the item after the last comma completes.
    `cogtune completion` writes into its static scripts what each parameter completes here.
    """

    def complete(incomplete: str) -> list[str]:
        done, comma, last = incomplete.rpartition(",") if comma_list else ("", "", incomplete)
        offered = values() if callable(values) else values
        return [f"{done}{comma}{value}" for value in offered if value.startswith(last)]

    return complete


OptionalModelOpt = Annotated[
    Optional[str], typer.Option("--model", "-m", help=MODEL_HELP, metavar="MODEL", show_default=False)
]
ConfigFileOpt = Annotated[
    Optional[Path],
    typer.Option("--config", help="TOML file of settings; flags given on the command line win.", metavar="FILE",
                 show_default=False),
]

DataRootArg = Annotated[Path, typer.Argument(help="Dataset root folder.", metavar="DATA_ROOT", show_default=False)]
FramesOpt = Annotated[Optional[int], typer.Option("--frames", "-F", help="Frames per clip.", metavar="INTEGER",
                                                  callback=number(low=1))]
HeightOpt = Annotated[Optional[int], typer.Option("--height", "-H", help="Clip height in pixels.", metavar="INTEGER",
                                                  callback=number(low=1))]
WidthOpt = Annotated[Optional[int], typer.Option("--width", "-W", help="Clip width in pixels.", metavar="INTEGER",
                                                 callback=number(low=1))]
