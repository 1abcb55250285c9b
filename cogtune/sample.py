"""`cogtune sample`: generate videos from a base model, a LoRA or a full fine-tune.

Video generation itself is `cogtune.generate`, the one code path for sampling, shared with the
trainer's validation.

Everything is checked before a weight loads (shape rules, images, outputs, the LoRA's family).
Prompts are encoded a chunk (`PROMPT_CHUNK`) at a time, just before they are generated; a run of
one chunk encodes first and frees T5 before the transformer loads, so the two never share the GPU
(longer runs park T5 in CPU memory between chunks). Memory options (VAE tiling/slicing, model or
sequential CPU offload, fp8 storage of the transformer's weights) are diffusers' own; a quantized
transformer (`--base-weights int8|nf4`) is `cogtune.models.quantize`'s, as training makes it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cogtune import report
from cogtune.config import QUANTIZED_BASE_WEIGHTS, write_config
from cogtune.errors import CogtuneError, ConfigError, DataError, ModelError
from cogtune.fsutil import OutputLock, check_writable
from cogtune.generate import generate_videos, load_condition_image
from cogtune.models.quantize import check_base_weights
from cogtune.models.registry import ModelSpec
from cogtune.sample_config import SampleConfig


# --- checks before loading -----------------------------------------------------------------------

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


def read_prompts_with_origins(config: SampleConfig) -> tuple[list[str], list[str]]:
    """The prompts, and where each came from (`--prompt 2`, `line 7 of prompts.txt`) for messages."""
    prompts = list(config.prompts)
    origins = [f"--prompt {number}" for number in range(1, len(prompts) + 1)]
    if config.prompts_file:
        from cogtune.data.dataset import read_text_lines

        path = Path(config.prompts_file)
        try:
            lines = read_text_lines(path)
        except FileNotFoundError as exc:
            raise DataError(f"prompts file not found: {path}") from exc
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
        for number, line in enumerate(lines, start=1):
            if line.strip():
                prompts.append(line.strip())
                origins.append(f"line {number} of {path.name}")
    if not prompts:
        raise DataError(f"{config.prompts_file} holds no prompts")
    return prompts, origins


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


def load_any_lora(pipe: Any, lora_file: Path, lora: Any) -> None:
    """Load a LoRA of any layout cogtune reads (diffusers, ComfyUI, kohya, SAT) as the adapter "cogtune".

    diffusers reads its own layout from the file; the others are converted in memory to it (alpha
    folded in), as `cogtune lora convert --to diffusers` would write them.
    """
    from cogtune.lora.layouts import ADAPTER_METADATA_KEY, write_state

    if lora.layout == "diffusers":
        pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name="cogtune")
        return
    state, metadata = write_state(lora, "diffusers")
    pipe.transformer.load_lora_adapter(state, prefix="transformer", metadata=json.loads(metadata[ADAPTER_METADATA_KEY]),
                                       adapter_name="cogtune")


def resolve_transformer_folder(path: str | Path, spec: ModelSpec) -> Path:
    """A full fine-tune's `transformer/` folder, checked against the model's architecture."""
    folder = Path(path)
    if (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise DataError(f"no fine-tuned transformer in {path} (expected transformer/config.json)")
    config = json.loads(config_path.read_text())
    keys = ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "patch_size",
            "patch_size_t", "use_rotary_positional_embeddings", "ofs_embed_dim", "text_embed_dim")
    different = [k for k in keys if config.get(k) != spec.transformer_config.get(k)]
    if different:
        raise ModelError(f"the transformer in {folder} does not fit {spec.name} (differs in {', '.join(different)})",
                         hint="sample it with the model it was fine-tuned from")
    return folder


@dataclasses.dataclass(frozen=True)
class SamplePlan:
    model: Any
    prompts: list[str]
    paths: list[Path]
    shape: tuple[int, int, int]
    images: list[Any]
    lora_file: Path | None
    transformer_folder: Path | None
    drop_learned_positions: bool
    prompt_origins: tuple[str, ...] = ()  # `line 7 of prompts.txt`, per prompt
    lora: Any = None  # the LoRA's layers (cogtune.lora.layouts.LoraLayers), read and checked up front


def plan_sample(config: SampleConfig) -> SamplePlan:
    from cogtune.models.loading import resolve_model
    from cogtune.lora.format import read_lora_info
    from cogtune.lora.layouts import read_lora, resolve_lora_path

    model = resolve_model(config.model, random_weights=config.random_weights)
    spec = model.spec
    prompts, origins = read_prompts_with_origins(config)
    lora_file = resolve_lora_path(config.lora) if config.lora else None
    lora = read_lora(lora_file) if lora_file is not None else None  # any layout; not a LoRA: one line now
    info = read_lora_info(lora_file) if lora_file is not None else {}
    if lora_file is not None:
        check_lora_fits(info, spec, lora_file)
    transformer_folder = resolve_transformer_folder(config.transformer, spec) if config.transformer else None
    drop = bool(info.get("drop_learned_positional_embeddings"))
    if transformer_folder is not None and spec.learned_positional_embeddings:
        saved = json.loads((transformer_folder / "config.json").read_text())
        drop = not saved.get("use_learned_positional_embeddings", True)  # saved without the table
    shape = resolve_shape(spec, config.frames, config.height, config.width, drop)
    if spec.is_i2v and not config.images:
        raise ConfigError(f"{spec.name} is an image-to-video model: pass --image")
    if config.images and not spec.is_i2v:
        raise ConfigError(f"{spec.name} is a text-to-video model: --image is for image-to-video models")
    if config.images and len(config.images) not in (1, len(prompts)):
        raise ConfigError(f"{len(config.images)} images for {len(prompts)} prompts; give one, or one per prompt")
    images = [load_condition_image(p) for p in config.images]
    if config.offload != "none" or config.base_weights == "fp8":
        if not torch.cuda.is_available():
            option = "--base-weights fp8" if config.base_weights == "fp8" else f"--offload {config.offload}"
            raise ConfigError(f"{option} needs a CUDA GPU")
    check_base_weights(config.base_weights, spec)
    paths = output_paths(config.output, len(prompts), config.overwrite)
    if config.compare_base and not config.overwrite:
        from cogtune.generate import comparison_path

        existing = [comparison_path(p) for p in paths if comparison_path(p).exists()]
        if existing:
            raise ConfigError(f"{existing[0]} exists; pass --overwrite to replace it")
    check_writable(paths[0].parent)  # before minutes of generation, not after
    return SamplePlan(model, prompts, paths, shape, images, lora_file, transformer_folder, drop, tuple(origins), lora)


# Prompts embedded at a time: memory holds one chunk's embeddings, not every prompt's (100k prompts
# of a 5b model would take hundreds of GB, 6.7 GB even on the tiny model). A run of up to this many
# prompts encodes them all first and frees T5 before the transformer loads.
PROMPT_CHUNK = 16


class _PromptEncoder:
    """Embeds prompts a chunk at a time, just before they are generated.

    With more than one chunk, T5 stays loaded: parked in CPU memory between chunks and brought to
    the device for each chunk (it shares the GPU with the pipeline only while it encodes).
    """

    def __init__(self, model: Any, negative: str, device: Any, dtype: Any, chunks: int):
        from cogtune.models.loading import load_text_encoder, load_tokenizer
        from cogtune.models.text import encode_prompts

        self.spec = model.spec
        self.device = device
        self.last_chunk = chunks <= 1
        self.tokenizer = load_tokenizer(model)
        self.text_encoder = load_text_encoder(model, dtype=dtype, device=device)
        negatives, _ = encode_prompts(self.tokenizer, self.text_encoder, [negative], self.spec.max_text_tokens, device)
        self.negative = negatives.cpu()  # (1, L, D): the same for every prompt

    def warn_truncated(self, prompts: list[str], origins: Sequence[str]) -> None:
        """One line for all prompts longer than the model reads (the tokenizer alone counts them)."""
        limit = self.spec.max_text_tokens
        cut = []
        for start in range(0, len(prompts), 1024):
            ids = self.tokenizer(prompts[start : start + 1024], add_special_tokens=True).input_ids
            counts = [len(row) for row in ids]
            cut += [start + i for i, count in enumerate(counts) if count > limit]
        if cut:
            first = origins[cut[0]] if cut[0] < len(origins) else f"prompt {cut[0] + 1}"
            many = len(cut) > 1
            report.warn(f"{len(cut)} prompt{'s were' if many else ' was'} longer than {limit} tokens and "
                        f"{'were' if many else 'was'} truncated (first: {first})")

    def encode(self, prompts: list[str]) -> Any:
        """(N, L, D) embeddings on the CPU; T5 is freed after the last chunk, parked on the CPU otherwise."""
        from cogtune.models.text import encode_prompts

        if self.text_encoder is None:
            raise RuntimeError("the prompt encoder was already freed")
        self.text_encoder.to(self.device)
        embeds, _ = encode_prompts(self.tokenizer, self.text_encoder, prompts, self.spec.max_text_tokens, self.device)
        embeds = embeds.cpu()
        if self.last_chunk:
            self.text_encoder = None
        else:
            self.text_encoder.to("cpu")
        if torch.device(self.device).type == "cuda":
            torch.cuda.empty_cache()
        return embeds

    def last(self) -> None:
        """The next `encode` is the last: free T5 after it."""
        self.last_chunk = True


def _sampling_pipeline(plan: SamplePlan, config: SampleConfig, device: Any, dtype: Any):
    from diffusers import CogVideoXDPMScheduler, CogVideoXTransformer3DModel

    from cogtune.models.fp8 import store_frozen_linears_in_float8
    from cogtune.models.quantize import quantize_frozen_linears
    from cogtune.models.loading import build_pipeline, load_scheduler, load_transformer, load_vae, torch_dtype
    from cogtune.models.positions import drop_learned_positional_embeddings

    model, spec = plan.model, plan.model.spec
    dtype = dtype or torch_dtype(spec.weight_dtype)
    place = "cpu" if config.offload != "none" else device  # offload hooks move components themselves
    quantized = config.base_weights in QUANTIZED_BASE_WEIGHTS
    loaded_at = "cpu" if quantized else place  # a quantized base comes to the device a quantized layer at a time
    if plan.transformer_folder is not None:
        transformer = CogVideoXTransformer3DModel.from_pretrained(plan.transformer_folder, torch_dtype=dtype)
        transformer.to(loaded_at)
    else:
        transformer = load_transformer(model, dtype=dtype, device=loaded_at)
    transformer.requires_grad_(False)
    scheduler = load_scheduler(model)
    if config.scheduler == "dpm":
        scheduler = CogVideoXDPMScheduler.from_config(scheduler.config)
    elif config.scheduler == "ddim" and type(scheduler).__name__ != "CogVideoXDDIMScheduler":
        from diffusers import CogVideoXDDIMScheduler

        scheduler = CogVideoXDDIMScheduler.from_config(scheduler.config)
    if quantized:  # before the LoRA, as in training: peft wraps the quantized layers
        quantize_frozen_linears(transformer, config.base_weights, dtype, place)
        transformer.to(place)
    pipe = build_pipeline(model, transformer=transformer, vae=load_vae(model, dtype=dtype, device=place),
                          text_encoder=None, tokenizer=None, scheduler=scheduler)
    if plan.lora_file is not None:
        try:
            load_any_lora(pipe, plan.lora_file, plan.lora)
        except CogtuneError:
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"cannot load the LoRA {plan.lora_file} into {spec.name}: {first[:200]}",
                             hint="was it trained for another model?") from exc
    if config.base_weights == "fp8":
        # After the LoRA: peft creates its layers in the base weight's dtype, so they must exist first.
        store_frozen_linears_in_float8(pipe.transformer, dtype)
    if plan.drop_learned_positions:
        drop_learned_positional_embeddings(pipe.transformer)  # as it was trained
    if config.vae_tiling:
        pipe.vae.enable_tiling()
    if config.vae_slicing:
        pipe.vae.enable_slicing()
    if config.offload == "model":
        pipe.enable_model_cpu_offload()
    elif config.offload == "sequential":
        pipe.enable_sequential_cpu_offload()
    return pipe


def write_previews(path: Path, video: Any, fps: float, kind: str) -> list[Path]:
    """A GIF and/or a PNG contact sheet (up to 8 frames in a row) beside the mp4."""
    from cogtune.fsutil import atomic_path

    frames = (np.clip(video, 0, 1) * 255).round().astype(np.uint8)
    written = []
    if kind in ("gif", "both"):
        gif = path.with_suffix(".gif")
        with atomic_path(gif) as tmp:
            images = [Image.fromarray(frame) for frame in frames]
            images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                           duration=max(1, round(1000 / fps)), loop=0)
        written.append(gif)
    if kind in ("png", "both"):
        sheet = path.with_suffix(".png")
        picks = np.linspace(0, len(frames) - 1, min(8, len(frames))).round().astype(int)
        strip = np.concatenate([frames[i] for i in picks], axis=1)
        with atomic_path(sheet) as tmp:
            Image.fromarray(strip).save(tmp, format="PNG")
        written.append(sheet)
    return written


def write_comparison(pipe: Any, spec: ModelSpec, arguments: dict[str, Any], video: Any, path: Path, fps: float) -> Path:
    """`--compare-base`: the same video with the LoRA switched off (peft's switch; same seed and noise), written
    base | LoRA side by side beside `path`."""
    from cogtune.data.video import write_video
    from cogtune.generate import comparison_path, side_by_side
    from cogtune.lora.switch import lora_disabled

    with lora_disabled(pipe.transformer):
        base = generate_videos(pipe, spec, **arguments)[0]
    return write_video(comparison_path(path), side_by_side(base, video), fps=fps)


def run_sample(config: SampleConfig) -> list[Path]:
    """Generate one mp4 per prompt (and previews); returns the written mp4 paths.

    One run at a time per output: an output file (its own lock beside it, so that samples into other
    files of the folder run at once), or an output folder.
    """
    output = Path(config.output)
    with OutputLock(output, kind="file" if output.suffix else "folder"):
        return _run_sample(config)


def _run_sample(config: SampleConfig) -> list[Path]:
    from cogtune.data.video import write_video
    from cogtune.models.loading import default_device
    from cogtune.quiet import quiet_libraries

    plan = plan_sample(config)
    spec = plan.model.spec
    frames, height, width = plan.shape
    quiet_libraries()

    device = default_device()
    dtype = torch.float32 if device == "cpu" else None  # half precision is slow or missing on CPUs
    chunks = -(-len(plan.prompts) // PROMPT_CHUNK)
    with report.status(f"encoding {min(len(plan.prompts), PROMPT_CHUNK)} of {len(plan.prompts)} prompt(s)"):
        encoder = _PromptEncoder(plan.model, config.negative_prompt, device, dtype, chunks)
        encoder.warn_truncated(plan.prompts, plan.prompt_origins)
        embeds = encoder.encode(plan.prompts[:PROMPT_CHUNK])  # with one chunk, T5 is freed here
    with report.status(f"loading {plan.model.reference}"):
        pipe = _sampling_pipeline(plan, config, device, dtype)
    attention_kwargs = {"scale": config.lora_scale} if plan.lora_file is not None else None
    fps = config.fps or spec.fps
    written = []
    with report.video_progress(len(plan.paths) * (2 if config.compare_base else 1), config.steps) as videos:
        for index, path in enumerate(plan.paths):
            if index and index % PROMPT_CHUNK == 0:  # the next chunk, just before it is generated
                if index + PROMPT_CHUNK >= len(plan.prompts):
                    encoder.last()
                embeds = encoder.encode(plan.prompts[index : index + PROMPT_CHUNK])
            row = index % PROMPT_CHUNK
            image = [plan.images[index] if len(plan.images) > 1 else plan.images[0]] if plan.images else None
            arguments = dict(prompt_embeds=embeds[row : row + 1], negative_prompt_embeds=encoder.negative,
                             frames=frames, height=height, width=width, steps=config.steps, guidance=config.guidance,
                             seed=config.seed + index, images=image, dynamic_cfg=config.dynamic_cfg,
                             attention_kwargs=attention_kwargs, progress=videos)
            video = generate_videos(pipe, spec, **arguments)[0]
            written.append(write_video(path, video, fps=fps))
            if config.compare_base:
                written.append(write_comparison(pipe, spec, arguments, video, path, fps))
            if config.preview != "none":
                write_previews(path, video, fps, config.preview)
    folder = plan.paths[0].parent
    config_name = "config.toml" if len(plan.paths) > 1 else f"{plan.paths[0].stem}.config.toml"
    write_config(dataclasses.replace(config, prompts=tuple(plan.prompts), prompts_file=None), folder, config_name)
    return written
