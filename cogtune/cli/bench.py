"""`cogtune bench memory`: will a run fit, and how fast will it go."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cogtune.cli.common import examples
from cogtune.cli.options import FramesOpt, HeightOpt, OptionalModelOpt, WidthOpt

app = typer.Typer(help="Size and time training runs before you start them.", no_args_is_help=True)


@app.command(
    "memory",
    epilog=examples("cogtune bench memory --model cogvideox-5b --rank 16,64,256 --estimate --markdown memory.md"),
)
def memory(
    model: OptionalModelOpt = None,
    rank: Annotated[Optional[str], typer.Option("--rank", help="LoRA ranks, comma-separated.")] = None,
    gradient_checkpointing: Annotated[Optional[str], typer.Option("--gradient-checkpointing", help="on,off")] = None,
    optimizer: Annotated[Optional[str], typer.Option("--optimizer", help="Optimizers, comma-separated.")] = None,
    batch_size: Annotated[Optional[str], typer.Option("--batch-size", help="Batch sizes, comma-separated.")] = None,
    frames: FramesOpt = None,
    height: HeightOpt = None,
    width: WidthOpt = None,
    estimate: Annotated[bool, typer.Option("--estimate", help="Estimate without a GPU or a download.")] = False,
    measure: Annotated[bool, typer.Option("--measure", help="Run real steps on the present GPU.")] = False,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Write the table as JSON.")] = None,
    markdown: Annotated[Optional[Path], typer.Option("--markdown", help="Write the table as markdown.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG chart.")] = None,
) -> None:
    """Peak GPU memory (and step time) of training configurations."""
    from cogtune.errors import NotBuiltError

    raise NotBuiltError("`cogtune bench memory` is not built yet (issue 8)",
                        hint="`cogtune train` reports measured memory in OUT/memory.json meanwhile")
