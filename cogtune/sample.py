"""`cogtune sample`: generate videos from a base model or a LoRA, through diffusers' pipelines.

`generate_videos` is the one code path for sampling: the CLI uses it with prompts it encodes, the
trainer's validation uses it with the cached prompt embeddings and the in-training weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cogtune import report
from cogtune.config import setting
from cogtune.errors import ConfigError, DataError, ModelError
from cogtune.models.registry import ModelSpec


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    model: str = setting("", "MODEL: a preset, tiny preset, Hub id or local diffusers folder.")
    prompts: tuple[str, ...] = setting((), "Prompts; one video each.")
    output: str = setting("", "Output .mp4 file (one prompt) or folder (several).")
    lora: str | None = setting(None, "LoRA weights: a pytorch_lora_weights.safetensors file or its folder.")
    lora_scale: float = setting(1.0, "Strength of the LoRA (0: the base model).")
    images: tuple[str, ...] = setting((), "I2V: condition image(s), one for all prompts or one per prompt.")
    negative_prompt: str = setting("", "Negative prompt for classifier-free guidance.")
    frames: int | None = setting(None, "Frames; default: the model's.")
    height: int | None = setting(None, "Height; default: the model's.")
    width: int | None = setting(None, "Width; default: the model's.")
    steps: int = setting(50, "Denoising steps.")
    guidance: float = setting(6.0, "Classifier-free guidance scale (1: off).")
    dynamic_cfg: bool = setting(False, "Raise guidance over the denoising steps (CogVideoX's dynamic CFG).")
    seed: int = setting(42, "Seed; the i-th video uses seed + i.")
    fps: int | None = setting(None, "Frame rate of the written mp4; default: the model's.")
    random_weights: bool = setting(False, "Use the preset's architecture with random weights (no download).")
    overwrite: bool = setting(False, "Replace existing output files.")

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model is required")
        if not self.prompts:
            raise ConfigError("at least one prompt is required")
        if not self.output:
            raise ConfigError("output is required")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.images and len(self.images) not in (1, len(self.prompts)):
            raise ConfigError(f"{len(self.images)} images for {len(self.prompts)} prompts; give one, or one per prompt")


def resolve_shape(spec: ModelSpec, frames: int | None, height: int | None, width: int | None,
                  learned_positions_dropped: bool = False) -> tuple[int, int, int]:
    """The clip shape to sample, defaulted from the model and checked against its rules."""
    from cogtune.models.positions import native_resolution

    frames = frames or spec.default_frames
    height = height or spec.default_height
    width = width or spec.default_width
    spec.check_clip_shape(frames, height, width)
    if spec.learned_positional_embeddings and not learned_positions_dropped:
        native_height, native_width = native_resolution(spec)
        if (height, width) != (native_height, native_width):
            raise ModelError(
                f"{spec.name} has learned positional embeddings for {native_width}x{native_height} only; "
                f"cannot sample {width}x{height}",
                hint="a LoRA trained with --learned-positional-embeddings drop samples at any resolution",
            )
    return frames, height, width


def check_lora_fits(info: dict[str, Any], spec: ModelSpec, lora_file: Path) -> None:
    """Refuse a cogtune LoRA trained for another model family (LoRAs from elsewhere carry no record)."""
    family = info.get("family")
    if family and family != spec.family:
        raise ModelError(f"the LoRA {lora_file} was trained for {info.get('model', 'another model')} ({family}); "
                         f"{spec.name} is {spec.family}",
                         hint="sample it with the model it was trained for")


def output_paths(output: str | Path, count: int, overwrite: bool) -> list[Path]:
    output = Path(output)
    if count == 1 and output.suffix.lower() == ".mp4":
        paths = [output]
    else:
        if output.suffix:
            raise ConfigError(f"{count} prompts need an output folder, not the file {output}")
        paths = [output / f"sample_{i:03d}.mp4" for i in range(count)]
    if not overwrite:
        existing = [p for p in paths if p.exists()]
        if existing:
            raise ConfigError(f"{existing[0]} exists; pass --overwrite to replace it")
    return paths


def generate_videos(
    pipe: Any,
    spec: ModelSpec,
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
) -> list[Any]:
    """One video (F, H, W, 3 float in [0, 1]) per row of `prompt_embeds`; video i uses seed + i."""
    import torch

    videos = []
    device = pipe._execution_device
    dtype = pipe.transformer.dtype
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
            "generator": torch.Generator(device="cpu").manual_seed(seed + index),
            "output_type": "np",
            "max_sequence_length": spec.max_text_tokens,
            "attention_kwargs": attention_kwargs,
        }
        if spec.is_i2v:
            if not images:
                raise DataError(f"{spec.name} is an image-to-video model: give a condition image")
            kwargs["image"] = images[index] if len(images) > 1 else images[0]
        with torch.no_grad():
            videos.append(pipe(**kwargs).frames[0])
    return videos


def load_condition_image(path: str | Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def resolve_lora_file(lora: str | Path) -> Path:
    path = Path(lora)
    if path.is_dir():
        path = path / "pytorch_lora_weights.safetensors"
    if not path.is_file():
        raise DataError(f"LoRA weights not found: {path}")
    return path


def run_sample(config: SampleConfig) -> list[Path]:
    """Generate one mp4 per prompt; returns the written paths."""
    from cogtune.data.video import write_video
    from cogtune.models.loading import build_pipeline, default_device, load_tokenizer, resolve_model
    from cogtune.quiet import quiet_libraries
    from cogtune.models.text import encode_prompts

    from cogtune.models.positions import drop_learned_positional_embeddings
    from cogtune.train.lora import read_lora_info

    model = resolve_model(config.model, random_weights=config.random_weights)
    spec = model.spec
    lora_file = resolve_lora_file(config.lora) if config.lora else None
    lora_info = read_lora_info(lora_file) if lora_file is not None else {}
    if lora_file is not None:
        check_lora_fits(lora_info, spec, lora_file)
    drop_positions = bool(lora_info.get("drop_learned_positional_embeddings"))
    frames, height, width = resolve_shape(spec, config.frames, config.height, config.width, drop_positions)
    paths = output_paths(config.output, len(config.prompts), config.overwrite)
    if spec.is_i2v and not config.images:
        raise ConfigError(f"{spec.name} is an image-to-video model: pass --image")
    if config.images and not spec.is_i2v:
        raise ConfigError(f"{spec.name} is a text-to-video model: --image is for image-to-video models")
    images = [load_condition_image(p) for p in config.images]

    quiet_libraries()
    import torch

    device = default_device()
    dtype = torch.float32 if device == "cpu" else None
    from cogtune.models.loading import load_text_encoder, load_transformer, load_vae

    with report.status(f"loading {model.reference}"):
        tokenizer = load_tokenizer(model)
        text_encoder = load_text_encoder(model, dtype=dtype, device=device)
        pipe = build_pipeline(
            model,
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            transformer=load_transformer(model, dtype=dtype, device=device),
            vae=load_vae(model, dtype=dtype, device=device),
        )
        if lora_file is not None:
            _load_lora(pipe, lora_file, spec)
        if drop_positions:
            drop_learned_positional_embeddings(pipe.transformer)  # as the LoRA was trained
    prompt_embeds, counts = encode_prompts(tokenizer, text_encoder, config.prompts, spec.max_text_tokens, device)
    negative, _ = encode_prompts(tokenizer, text_encoder, [config.negative_prompt] * len(config.prompts),
                                 spec.max_text_tokens, device)
    for prompt, count in zip(config.prompts, counts):
        if count > spec.max_text_tokens:
            report.warn(f"prompt has {count} tokens; {spec.name} reads the first {spec.max_text_tokens}: {prompt[:60]}...")
    attention_kwargs = {"scale": config.lora_scale} if lora_file is not None else None
    written = []
    with report.progress("sampling", total=len(paths), unit="videos") as bar:
        for index, path in enumerate(paths):
            video = generate_videos(
                pipe, spec, prompt_embeds[index : index + 1], negative[index : index + 1], frames, height, width,
                config.steps, config.guidance, config.seed + index,
                images=[images[index] if len(images) > 1 else images[0]] if images else None,
                dynamic_cfg=config.dynamic_cfg, attention_kwargs=attention_kwargs,
            )[0]
            written.append(write_video(path, video, fps=config.fps or spec.fps))
            bar.advance()
    return written


def _load_lora(pipe: Any, lora_file: Path, spec: ModelSpec) -> None:
    try:
        pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name="cogtune")
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load the LoRA {lora_file} into {spec.name}: {first[:200]}",
                         hint="was it trained for another model family?") from None
