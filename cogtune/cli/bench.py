"""`cogtune bench memory`: will a run fit, and how fast will it go."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cogtune.cli.common import examples
from cogtune.cli.options import FramesOpt, HeightOpt, WidthOpt, completes, number

app = typer.Typer(help="Size and time training runs before you start them.", no_args_is_help=True)

ListOpt = Optional[str]


def _presets() -> list[str]:
    from cogtune.models.registry import ALL_PRESETS

    return list(ALL_PRESETS)


def _methods() -> tuple[str, ...]:
    from cogtune.bench import METHODS

    return METHODS


def _optimizers() -> tuple[str, ...]:
    from cogtune.train.config import OPTIMIZERS

    return OPTIMIZERS


_ON_OFF = completes(("on", "off"), comma_list=True)  # the words the help uses; `parse_list` also reads true/false


@app.command(
    "memory",
    epilog=examples(
        "cogtune bench memory --model cogvideox-5b --rank 16,64,256 --gradient-checkpointing on,off --estimate "
        "--gpu-memory 24 --markdown memory.md --plot memory.png",
        "cogtune bench memory --model cogvideox-5b --method full --optimizer adamw-8bit,adamw-4bit-ao --estimate",
        "cogtune bench memory --model cogvideox-2b,cogvideox-5b --fp8 on,off --offload-activations on,off --estimate",
        "cogtune bench memory --model cogvideox-5b --rank 64 --measure --json measured.json",
        "cogtune bench memory --config run.toml --data cache/disney --gpu-memory 24",
    ),
)
def memory(
    model: Annotated[ListOpt, typer.Option("--model", "-m", help="Presets, comma-separated. [default: cogvideox-5b]",
                                           autocompletion=completes(_presets, comma_list=True))]
    = None,
    method: Annotated[ListOpt, typer.Option("--method", help="lora and/or full, comma-separated. [default: lora]",
                                            autocompletion=completes(_methods, comma_list=True))]
    = None,
    rank: Annotated[ListOpt, typer.Option("--rank", help="LoRA ranks, comma-separated. [default: 64]")] = None,
    gradient_checkpointing: Annotated[
        ListOpt,
        typer.Option("--gradient-checkpointing", help="on, off or on,off. [default: on]", autocompletion=_ON_OFF),
    ] = None,
    optimizer: Annotated[ListOpt, typer.Option("--optimizer", help="Optimizers, comma-separated. [default: adamw]",
                                               autocompletion=completes(_optimizers, comma_list=True))]
    = None,
    batch_size: Annotated[ListOpt, typer.Option("--batch-size", help="Batch sizes, comma-separated. [default: 1]")]
    = None,
    frames: FramesOpt = None,
    height: HeightOpt = None,
    width: WidthOpt = None,
    shape: Annotated[ListOpt, typer.Option("--shape", help="Clip shapes FxHxW, comma-separated (a resolution grid).")]
    = None,
    fp8: Annotated[ListOpt, typer.Option("--fp8", help="on, off or on,off (LoRA). [default: off]",
                                         autocompletion=_ON_OFF)] = None,
    offload_blocks: Annotated[ListOpt, typer.Option("--offload-blocks", help="on, off or on,off (LoRA).",
                                                    autocompletion=_ON_OFF)] = None,
    offload_activations: Annotated[ListOpt, typer.Option("--offload-activations", help="on, off or on,off.",
                                                         autocompletion=_ON_OFF)] = None,
    no_validation: Annotated[bool, typer.Option("--no-validation", help="Leave out the validation pass.")] = False,
    estimate: Annotated[bool, typer.Option("--estimate", help="Estimate without a GPU or a download (default).")]
    = False,
    measure: Annotated[bool, typer.Option("--measure", help="Run real steps on the present GPU.")] = False,
    gpu_memory: Annotated[
        Optional[float], typer.Option("--gpu-memory", help="GPU size in GiB: which fit, and how to fit the others.",
                                      callback=number(low=0, low_open=True))
    ] = None,
    host_memory: Annotated[
        Optional[float], typer.Option("--host-memory", help="Host RAM in GiB that one GPU's offloading may fill "
                                                            "(checked with --gpu-memory; with several GPUs on a "
                                                            "machine, each one's share). [default: this machine's]",
                                      callback=number(low=0, low_open=True))
    ] = None,
    gpu: Annotated[Optional[str], typer.Option("--gpu", help="GPU for rough step times (H100, A100, RTX 4090...).")]
    = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Steps per measured configuration. [default: 4]")]
    = None,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON.")] = None,
    markdown: Annotated[Optional[Path], typer.Option("--markdown", help="Write a markdown table: one row per configuration, memory in GiB.")]
    = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG chart.")] = None,
    breakdown: Annotated[
        bool, typer.Option("--breakdown", help="Show each peak in its parts (weights, gradients, optimizer state, "
                                               "activations, workspaces, allocator slack, validation) and the host RAM "
                                               "offloading needs.")
    ] = False,
    random_weights: Annotated[
        bool, typer.Option("--random-weights", help="Always on here: bench builds each preset's real architecture "
                                                    "with random weights (nothing is downloaded).")
    ] = False,
    run_config: Annotated[
        Optional[Path],
        typer.Option("--config", help="A run's TOML (as `train --config` reads it): size exactly that run; grid "
                                      "options then vary it.", show_default=False),
    ] = None,
    data: Annotated[
        Optional[Path],
        typer.Option("--data", "-d", help="The run's cache: its buckets (the largest decides the peak) and "
                                          "validation prompts. [default: the run's data]", show_default=False),
    ] = None,
) -> None:
    """Peak GPU memory at the trainer's four moments (and step time) of a grid of configurations."""
    from cogtune.bench.cases import parse_list
    from cogtune.bench.run import BenchConfig, run_bench
    from cogtune.config import load_config
    from cogtune.errors import ConfigError

    if estimate and measure:
        raise ConfigError("--estimate and --measure exclude each other")
    shapes = [s for s in (shape or "").split(",") if s.strip()]
    if frames or height or width:
        if shapes:
            raise ConfigError("--shape and --frames/--height/--width exclude each other")
        if not (frames and height and width):
            raise ConfigError("--frames, --height and --width go together")
        shapes = [f"{frames}x{height}x{width}"]

    def listed(text: str | None, kind: type, name: str) -> tuple | None:
        return tuple(parse_list(text, kind, name)) or None

    config = load_config(BenchConfig, None, {
        "run_config": str(run_config) if run_config is not None else None,
        "data": str(data) if data is not None else None,
        "models": listed(model, str, "model"), "methods": listed(method, str, "method"),
        "ranks": listed(rank, int, "rank"), "optimizers": listed(optimizer, str, "optimizer"),
        "gradient_checkpointing": listed(gradient_checkpointing, bool, "gradient-checkpointing"),
        "batch_sizes": listed(batch_size, int, "batch-size"), "shapes": tuple(shapes) or None,
        "fp8": listed(fp8, bool, "fp8"), "offload_blocks": listed(offload_blocks, bool, "offload-blocks"),
        "offload_activations": listed(offload_activations, bool, "offload-activations"),
        "validation": False if no_validation else None, "mode": "measure" if measure else None,
        "gpu_memory": gpu_memory, "host_memory": host_memory, "gpu": gpu, "steps": steps, "breakdown": True if breakdown else None,
    })
    run_bench(config, json_path=json_file, markdown_path=markdown, plot_path=plot)
