"""`cogtune demo`: the whole pipeline, offline, on the built-in tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cogtune.cli.common import examples

EPILOG = examples("cogtune demo --output-dir demo", "cogtune demo --output-dir demo --steps 100")


def demo(
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Folder for the model, data, cache, run and sample.")]
    = Path("cogtune-demo"),
    steps: Annotated[int, typer.Option("--steps", help="Training steps.", min=1)] = 100,
) -> None:
    """Synthesize clips, then validate, encode, train a LoRA and sample, on a tiny model, offline."""
    from cogtune import startup
    from cogtune.demo import run_demo

    startup.load_libraries()
    run_demo(output_dir, steps=steps)
