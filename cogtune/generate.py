"""Videos from a CogVideoX pipeline: the one code path for sampling.

`cogtune sample` uses it with the prompts it encodes; the trainer's validation with the cached
prompt embeddings and the in-training weights. It sits below both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from cogtune import report
from cogtune.config import SEED_MAX
from cogtune.data.video import displayed_image
from cogtune.errors import DataError
from cogtune.models.registry import ModelSpec


def load_condition_image(path: str | Path):
    try:
        with Image.open(path) as image:
            return displayed_image(image)
    except FileNotFoundError as exc:
        raise DataError(f"image not found: {path}") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc


def generate_videos(
    pipe: Any,
    spec: ModelSpec,
    *,
    prompt_embeds: Any,
    negative_prompt_embeds: Any,
    frames: int,
    height: int,
    width: int,
    steps: int,
    guidance: float,
    seed: int,
    images: Sequence[Any] | None = None,
    dynamic_cfg: bool = False,
    attention_kwargs: dict[str, Any] | None = None,
    denoising_context: Callable[[], Any] = contextlib.nullcontext,
    progress: report.VideoBars | None = None,
) -> list[Any]:
    """One video (F, H, W, 3 float in [0, 1]) per row of `prompt_embeds`; video i uses seed + i.

    The pipeline denoises inside `denoising_context` (training's validation passes its autocast) and
    the VAE decodes outside it: under autocast the decoder's group norms would run, and keep their
    outputs, in float32. Each video gets a bar of its denoising steps, then of its decode: in
    `progress` when the caller renders several videos through several calls, else in its own.
    """
    with contextlib.ExitStack() as stack:
        if progress is None:
            progress = stack.enter_context(report.video_progress(prompt_embeds.shape[0], steps))
        return _generate(pipe, spec, prompt_embeds, negative_prompt_embeds, frames, height, width, steps, guidance,
                         seed, images, dynamic_cfg, attention_kwargs, denoising_context, progress)


def _generate(pipe: Any, spec: ModelSpec, prompt_embeds: Any, negative_prompt_embeds: Any, frames: int, height: int,
              width: int, steps: int, guidance: float, seed: int, images: Sequence[Any] | None, dynamic_cfg: bool,
              attention_kwargs: dict[str, Any] | None, denoising_context: Callable[[], Any],
              progress: report.VideoBars) -> list[Any]:
    videos = []
    device = pipe._execution_device
    dtype = pipe.transformer.dtype
    padding = spec.padded_latent_frames(frames) - spec.latent_frames(frames)  # 1.5's, dropped as the pipeline does
    for index in range(prompt_embeds.shape[0]):
        kwargs: dict[str, Any] = {
            "prompt_embeds": prompt_embeds[index : index + 1].to(device=device, dtype=dtype),
            "negative_prompt_embeds": negative_prompt_embeds[index : index + 1].to(device=device, dtype=dtype),
            "num_frames": frames,
            "height": height,
            "width": width,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "use_dynamic_cfg": dynamic_cfg,
            "generator": torch.Generator(device="cpu").manual_seed((seed + index) % (SEED_MAX + 1)),
            "output_type": "latent",
            "max_sequence_length": spec.max_text_tokens,
            "attention_kwargs": attention_kwargs,
        }
        if spec.is_i2v:
            if not images:
                raise DataError(f"{spec.name} is an image-to-video model: give a condition image")
            kwargs["image"] = images[index] if len(images) > 1 else images[0]
        with torch.no_grad(), progress.video() as bar:
            kwargs["callback_on_step_end"] = _step_reporter(bar)  # diffusers' own bar is off (build_pipeline)
            with denoising_context():
                latents = pipe(**kwargs).frames[:, padding:]
            bar.decoding()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the decode's tensors have other sizes than the denoiser's cached blocks
            decoded = pipe.decode_latents(latents.to(pipe.vae.dtype))
            videos.append(pipe.video_processor.postprocess_video(video=decoded, output_type="np")[0])
    return videos


def _step_reporter(bar: report.VideoBar) -> Callable[..., dict[str, Any]]:
    """A diffusers `callback_on_step_end` that advances `bar` and leaves the latents alone."""

    def on_step_end(pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        bar.step()
        return callback_kwargs

    return on_step_end


COMPARISON_LABELS = ("base", "LoRA")
LABEL_HEIGHT = 16  # pixels of the strip above each half that names it


def side_by_side(left: Any, right: Any, labels: Sequence[str] = COMPARISON_LABELS) -> Any:
    """Two videos (F, H, W, 3 float in [0, 1]) as one, left | right, each under a strip that names it.

    The halves' pixels are the videos' own, below the strip: `comparison_halves` takes them back out.
    """
    import numpy as np
    from PIL import ImageDraw

    frames, height, width, _ = left.shape
    strip = Image.new("RGB", (2 * width, LABEL_HEIGHT), (0, 0, 0))
    draw = ImageDraw.Draw(strip)
    for column, label in enumerate(labels):
        draw.text((column * width + 4, 2), label, fill=(255, 255, 255))
    header = np.broadcast_to(np.asarray(strip, dtype=np.float32)[None] / 255.0, (frames, LABEL_HEIGHT, 2 * width, 3))
    return np.concatenate([header, np.concatenate([left, right], axis=2)], axis=1)


def comparison_halves(video: Any) -> tuple[Any, Any]:
    """The (left, right) videos of a `side_by_side` one."""
    width = video.shape[2] // 2
    return video[:, LABEL_HEIGHT:, :width], video[:, LABEL_HEIGHT:, width:]


def comparison_path(path: Path) -> Path:
    """Where `sample --compare-base` writes the side-by-side of the video at `path`."""
    return path.with_name(f"{path.stem}.base-vs-lora.mp4")
