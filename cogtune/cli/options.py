"""Options shared by several commands, declared once as `Annotated` aliases.

Options that map onto a run config default to `None`, meaning "not given": the value then comes
from the `--config` TOML file or the config's own default, so flags win only when typed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer


def number(low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Callable[[Any], Any]:
    """An option callback: the value (None: not given) must be finite and within the bounds.

    Click's own ranges let NaN through (every comparison with NaN is false), so float options use
    this: `--lr nan` is a usage error naming the option, before anything loads.
    """

    def check(value: Any) -> Any:
        if value is None:
            return value
        if not math.isfinite(value):
            raise typer.BadParameter(f"must be a finite number, got {value}")
        if low is not None and (value <= low if low_open else value < low):
            raise typer.BadParameter(f"must be {'>' if low_open else '>='} {low:g}, got {value:g}")
        if high is not None and (value >= high if high_open else value > high):
            raise typer.BadParameter(f"must be {'<' if high_open else '<='} {high:g}, got {value:g}")
        return value

    return check


MODEL_HELP = (
    "Preset (cogvideox-2b, cogvideox-5b, cogvideox-5b-i2v, cogvideox1.5-5b, cogvideox1.5-5b-i2v, or the offline "
    "tiny, tiny-i2v, ...), Hub id, or local diffusers folder."
)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP, show_default=False)]
OptionalModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help=MODEL_HELP, show_default=False)]
RandomWeightsOpt = Annotated[
    bool, typer.Option("--random-weights", help="The preset's real architecture with random weights; nothing is downloaded.")
]
ConfigFileOpt = Annotated[
    Optional[Path],
    typer.Option("--config", help="TOML file of settings; flags given on the command line win.", show_default=False),
]

DataRootArg = Annotated[Path, typer.Argument(help="Dataset root folder.", show_default=False)]
DataRootOpt = Annotated[Path, typer.Option("--data-root", help="Dataset root folder.", show_default=False)]
CaptionColumnOpt = Annotated[
    Optional[str], typer.Option("--caption-column", help="Caption file (one per line), relative to the root. [default: prompts.txt]")
]
VideoColumnOpt = Annotated[
    Optional[str], typer.Option("--video-column", help="Video-path file (one per line), relative to the root. [default: videos.txt]")
]
ImageColumnOpt = Annotated[
    Optional[str], typer.Option("--image-column", help="I2V condition-image file; default: each clip's first frame.")
]
DatasetFileOpt = Annotated[
    Optional[str],
    typer.Option("--dataset-file", help="CSV, JSON or JSONL table of entries (columns named by the --*-column options)."),
]
FrameSamplingOpt = Annotated[
    Optional[str],
    typer.Option("--frame-sampling", help="uniform (over the whole clip) or fps (at --sample-fps). [default: uniform]"),
]
SampleFpsOpt = Annotated[
    Optional[float], typer.Option("--sample-fps", help="Frame rate for --frame-sampling fps. [default: the model's]",
                                  callback=number(low=0, low_open=True))
]
ResizeModeOpt = Annotated[
    Optional[str], typer.Option("--resize-mode", help="crop (keep aspect, center-crop) or stretch. [default: crop]")
]
AllowOutsideRootOpt = Annotated[
    bool, typer.Option("--allow-outside-root", help="Accept dataset paths that are absolute or escape the root.")
]
IdTokenOpt = Annotated[Optional[str], typer.Option("--id-token", help="Token prepended to every caption.")]
FramesOpt = Annotated[Optional[int], typer.Option("--frames", "-F", help="Frames per clip.", min=1)]
HeightOpt = Annotated[Optional[int], typer.Option("--height", "-H", help="Clip height in pixels.", min=1)]
WidthOpt = Annotated[Optional[int], typer.Option("--width", "-W", help="Clip width in pixels.", min=1)]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed.")]
