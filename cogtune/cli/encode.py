"""`cogtune encode`: the latent and text-embedding cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cogtune.cli.common import as_tuple, dataset_overrides, examples
from cogtune.cli.options import (
    AllowOutsideRootOpt,
    CaptionColumnOpt,
    ConfigFileOpt,
    DatasetFileOpt,
    FrameSamplingOpt,
    FramesOpt,
    HeightOpt,
    IdTokenOpt,
    ImageColumnOpt,
    OptionalModelOpt,
    RandomWeightsOpt,
    ResizeModeOpt,
    SampleFpsOpt,
    VideoColumnOpt,
    WidthOpt,
)

EPILOG = examples(
    "cogtune encode --model cogvideox-5b --data-root data/disney --output-dir cache/disney "
    "--frames 49 --height 480 --width 720",
    "cogtune encode --model tiny --data-root demo/data --output-dir demo/cache --dry-run",
)


def encode(
    model: OptionalModelOpt = None,
    data_root: Annotated[Optional[Path], typer.Option("--data-root", help="Dataset root folder.")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Cache folder to write.")] = None,
    caption_column: CaptionColumnOpt = None,
    video_column: VideoColumnOpt = None,
    image_column: ImageColumnOpt = None,
    dataset_file: DatasetFileOpt = None,
    allow_outside_root: AllowOutsideRootOpt = False,
    id_token: IdTokenOpt = None,
    frame_sampling: FrameSamplingOpt = None,
    sample_fps: SampleFpsOpt = None,
    resize_mode: ResizeModeOpt = None,
    frames: FramesOpt = None,
    height: HeightOpt = None,
    width: WidthOpt = None,
    buckets: Annotated[
        Optional[list[str]], typer.Option("--buckets", help="Clip shape FxHxW (repeatable); each clip takes the nearest.")
    ] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Clips per VAE call.", min=1)] = None,
    i2v: Annotated[
        Optional[bool], typer.Option("--i2v/--no-i2v", help="Encode condition images too. [default: for I2V models]")
    ] = None,
    image_noise_samples: Annotated[
        Optional[int],
        typer.Option("--image-noise-samples", help="I2V: noisy encodes per condition image (augmentation). [default: 4]",
                     min=0),
    ] = None,
    validation_prompt: Annotated[
        Optional[list[str]], typer.Option("--validation-prompt", help="Cache this prompt's embedding (repeatable).")
    ] = None,
    vae_slicing: Annotated[Optional[bool], typer.Option("--vae-slicing", help="One clip at a time in the VAE.")] = None,
    vae_tiling: Annotated[Optional[bool], typer.Option("--vae-tiling", help="Encode in spatial tiles.")] = None,
    num_workers: Annotated[Optional[int], typer.Option("--num-workers", help="Decoding worker processes.", min=0)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Recompute items already cached.")] = False,
    skip_invalid: Annotated[
        bool, typer.Option("--skip-invalid", help="Encode the entries without errors; list the others.")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (items, buckets, disk) and stop.")] = False,
    random_weights: RandomWeightsOpt = False,
    config_file: ConfigFileOpt = None,
) -> None:
    """Encode a dataset into a reusable latent cache. Re-running skips finished items."""
    from cogtune.config import load_config
    from cogtune.encode import EncodeConfig, encode_dataset

    overrides = {
        "model": model,
        "output_dir": str(output_dir) if output_dir is not None else None,
        **dataset_overrides(data_root, caption_column, video_column, image_column, dataset_file, allow_outside_root,
                            id_token, frame_sampling, sample_fps, resize_mode),
        "buckets": as_tuple(buckets),
        "batch_size": batch_size,
        "i2v": i2v,
        "image_noise_samples": image_noise_samples,
        "validation_prompts": as_tuple(validation_prompt),
        "vae_slicing": vae_slicing,
        "vae_tiling": vae_tiling,
        "num_workers": num_workers,
        "overwrite": overwrite or None,
        "skip_invalid": skip_invalid or None,
        "random_weights": random_weights or None,
    }
    config = load_config(EncodeConfig, config_file, overrides)
    encode_dataset(config, frames=frames, height=height, width=width, dry_run=dry_run)

