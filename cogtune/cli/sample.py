"""`cogtune sample`: videos from a base model, a LoRA or a full fine-tune."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cogtune.cli.common import as_tuple, examples
from cogtune.cli.options import (
    ConfigFileOpt,
    FramesOpt,
    HeightOpt,
    OptionalModelOpt,
    RandomWeightsOpt,
    SeedOpt,
    WidthOpt,
    number,
)

EPILOG = examples(
    "cogtune sample --model THUDM/CogVideoX-5b --lora runs/disney --prompt 'A panda playing a guitar' "
    "--output panda.mp4 --scheduler dpm --dynamic-cfg",
    "cogtune sample --model THUDM/CogVideoX-5b-I2V --image first.png --prompt 'The cat jumps' --output cat.mp4 "
    "--offload model --vae-tiling",
    "cogtune sample --model tiny --prompt 'A red circle moves left' --output red.mp4 --steps 10 --preview png",
)


def sample(
    model: OptionalModelOpt = None,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="Prompt (repeatable).")] = None,
    prompts_file: Annotated[
        Optional[Path], typer.Option("--prompts-file", help="Text file of prompts, one per line (one video each).")
    ] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output .mp4 (or folder for several).")] = None,
    lora: Annotated[Optional[Path], typer.Option("--lora", help="LoRA weights file or the run folder holding it.")] = None,
    lora_scale: Annotated[Optional[float], typer.Option("--lora-scale", help="LoRA strength. [default: 1.0]",
                                                                callback=number())] = None,
    transformer: Annotated[
        Optional[Path], typer.Option("--transformer", help="A full fine-tune: its transformer/ folder or run folder.")
    ] = None,
    image: Annotated[Optional[list[str]], typer.Option("--image", help="I2V condition image (repeatable).")] = None,
    negative_prompt: Annotated[Optional[str], typer.Option("--negative-prompt", help="Negative prompt.")] = None,
    frames: FramesOpt = None,
    height: HeightOpt = None,
    width: WidthOpt = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Denoising steps. [default: 50]", min=1)] = None,
    guidance: Annotated[Optional[float], typer.Option("--guidance", help="Guidance scale. [default: 6.0]",
                                                              callback=number(low=0))] = None,
    dynamic_cfg: Annotated[Optional[bool], typer.Option("--dynamic-cfg", help="CogVideoX's dynamic guidance.")] = None,
    scheduler: Annotated[
        Optional[str], typer.Option("--scheduler", help="model (its own DDIM) or dpm. [default: model]")
    ] = None,
    seed: SeedOpt = None,
    fps: Annotated[Optional[int], typer.Option("--fps", help="Frame rate of the mp4. [default: the model's]", min=1)] = None,
    vae_tiling: Annotated[Optional[bool], typer.Option("--vae-tiling", help="Decode in tiles (less memory).")] = None,
    vae_slicing: Annotated[Optional[bool], typer.Option("--vae-slicing", help="Decode one video at a time.")] = None,
    offload: Annotated[
        Optional[str], typer.Option("--offload", help="none, model or sequential CPU offload (GPU). [default: none]")
    ] = None,
    fp8: Annotated[Optional[bool], typer.Option("--fp8", help="Store the transformer in float8 (GPU).")] = None,
    preview: Annotated[
        Optional[str], typer.Option("--preview", help="none, gif, png (contact sheet) or both. [default: none]")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")] = False,
    random_weights: RandomWeightsOpt = False,
    config_file: ConfigFileOpt = None,
) -> None:
    """Generate videos with a base model, a trained LoRA, or a full fine-tune."""
    from cogtune import report
    from cogtune.config import load_config
    from cogtune.sample import SampleConfig, run_sample

    config = load_config(SampleConfig, config_file, {
        "model": model, "prompts": as_tuple(prompt), "prompts_file": str(prompts_file) if prompts_file else None,
        "output": str(output) if output is not None else None, "lora": str(lora) if lora is not None else None,
        "lora_scale": lora_scale, "transformer": str(transformer) if transformer is not None else None,
        "images": as_tuple(image), "negative_prompt": negative_prompt, "frames": frames, "height": height,
        "width": width, "steps": steps, "guidance": guidance, "dynamic_cfg": dynamic_cfg, "scheduler": scheduler,
        "seed": seed, "fps": fps, "vae_tiling": vae_tiling, "vae_slicing": vae_slicing, "offload": offload,
        "fp8": fp8, "preview": preview, "overwrite": overwrite or None, "random_weights": random_weights or None,
    })
    for path in run_sample(config):
        report.success(f"wrote {path}")
