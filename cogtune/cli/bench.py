"""`cogtune bench memory`: will a run fit, and how fast will it go.

The grid's options are `BenchConfig`'s flagged fields (cogtune/bench/config.py), made by
`settings_options`; the options here are not bench settings: the two modes as flags,
`--frames/--height/--width` (another way to give one `--shape`) and where to write the results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cogtune.bench.config import BenchConfig
from cogtune.cli.common import examples
from cogtune.cli.options import FramesOpt, HeightOpt, WidthOpt
from cogtune.cli.settings import Overrides, settings_options

app = typer.Typer(help="Size and time training runs before you start them.", no_args_is_help=True)

EPILOG = examples(
    "cogtune bench memory --model cogvideox-5b --rank 16,64,256 --gradient-checkpointing on,off --estimate "
    "--gpu-memory 24 --markdown memory.md --plot memory.png",
    "cogtune bench memory --model cogvideox-5b --method full --optimizer adamw-8bit,adamw-4bit-ao --estimate",
    "cogtune bench memory --model cogvideox-2b,cogvideox-5b --base-weights bf16,fp8,nf4 --offload-activations on,off --estimate",
    "cogtune bench memory --model cogvideox1.5-5b --method full --fsdp-gpus 8 --shape 81x768x1360 --gpu-memory 80",
    "cogtune bench memory --model cogvideox-5b --rank 64 --measure --json measured.json",
    "cogtune bench memory --config run.toml --data cache/disney --gpu-memory 24",
)


@app.command("memory", epilog=EPILOG)
@settings_options(BenchConfig)
def memory(
    overrides: Overrides = None,
    frames: FramesOpt = None,
    height: HeightOpt = None,
    width: WidthOpt = None,
    estimate: Annotated[bool, typer.Option("--estimate", help="Estimate without a GPU or a download (default).")]
    = False,
    measure: Annotated[bool, typer.Option("--measure", help="Run real steps on the present GPU.")] = False,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON.", metavar="PATH")]
    = None,
    markdown: Annotated[Optional[Path], typer.Option("--markdown", metavar="PATH",
                                                     help="Write a markdown table: one row per configuration, "
                                                          "memory in GiB.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG chart.", metavar="PATH")] = None,
    random_weights: Annotated[
        bool, typer.Option("--random-weights", help="Always on here: bench builds each preset's real architecture "
                                                    "with random weights (nothing is downloaded).")
    ] = False,
) -> None:
    """Peak GPU memory at the trainer's four moments (and step time) of a grid of configurations."""
    from cogtune.bench.run import run_bench
    from cogtune.config import load_config
    from cogtune.errors import ConfigError

    if estimate and measure:
        raise ConfigError("--estimate and --measure exclude each other")
    if frames or height or width:
        if overrides["shapes"]:
            raise ConfigError("--shape and --frames/--height/--width exclude each other")
        if not (frames and height and width):
            raise ConfigError("--frames, --height and --width go together")
        overrides = {**overrides, "shapes": (f"{frames}x{height}x{width}",)}
    config = load_config(BenchConfig, None, {**overrides, "mode": "measure" if measure else None})
    run_bench(config, json_path=json_file, markdown_path=markdown, plot_path=plot)
