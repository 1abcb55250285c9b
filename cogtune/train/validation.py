"""Validation videos with the in-training weights, through the same code as `cogtune sample`.

Text embeddings come from the cache (no text encoder on the device); the VAE is loaded for the
pass and freed after it. The first pass records `memory_before_validation` and
`memory_after_validation`.

Every process renders: process r takes prompts r, r + N, r + 2N, ... (video i always uses seed + i,
so the videos are those one process would render), and the main process gathers and writes them.
Under FSDP and ZeRO-3 each forward needs every process, so all of them must run the same number
of forwards: processes with fewer prompts render padding videos (their last prompt again) and
throw them away. A prompt count that does not divide the process count therefore cannot hang
(finetrainers documents that it does there).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cogtune import report
from cogtune.encode.cache import VideoLatentCache
from cogtune.errors import ConfigError
from cogtune.models.loading import ResolvedModel
from cogtune.train.config import TrainConfig
from cogtune.train.memory import MemoryLog


FEED_FORWARD_CHUNK_TOKENS = 4096


@contextlib.contextmanager
def chunked_feed_forward(transformer: Any, chunk_tokens: int = FEED_FORWARD_CHUNK_TOKENS) -> Iterator[None]:
    """Run every block's feed-forward over at most `chunk_tokens` tokens at a time (inference only).

    The feed-forward acts on each token alone, so chunking the sequence changes no result beyond
    rounding, while its 4x-wide intermediate, doubled by classifier-free guidance's batch of two,
    shrinks to a chunk's: that intermediate is what made validation the peak of low-memory runs
    (estimate for 5b with --fp8 --offload-activations: 13.9 GiB against 12.2 GiB for training).
    The chunked forwards are made once per block and reused, so a compiled block sees the same
    function at every validation.
    """
    import torch

    patched = []
    for block in getattr(transformer, "transformer_blocks", []):
        ff = block.ff
        chunked = ff.__dict__.get("_cogtune_chunked_forward")
        if chunked is None:
            def chunked(hidden_states: Any, *args: Any, _forward: Any = ff.forward, **kwargs: Any) -> Any:
                if hidden_states.shape[1] <= chunk_tokens:
                    return _forward(hidden_states, *args, **kwargs)
                parts = hidden_states.split(chunk_tokens, dim=1)
                return torch.cat([_forward(part, *args, **kwargs) for part in parts], dim=1)

            ff._cogtune_chunked_forward = chunked
        ff.forward = chunked
        patched.append(ff)
    try:
        yield
    finally:
        for ff in patched:
            del ff.forward  # the instance attribute; the class's forward shows through again


def validation_feed_forward_chunks(transformer: Any, offload_blocks: bool) -> Any:
    """`chunked_feed_forward`, except with offloaded blocks, whose layers would be brought to the
    device once per chunk (their weights, not the activations, are that run's memory)."""
    return contextlib.nullcontext() if offload_blocks else chunked_feed_forward(transformer)


def validation_prompts(config: TrainConfig, cache: VideoLatentCache, is_i2v: bool) -> list[str]:
    """The prompts validation renders: the configured ones, else those cached by `encode`.

    Checked before any weight loads: prompts must be in the cache, and I2V needs an image per
    prompt (cached prompts without images are skipped with a warning instead).
    """
    runs = config.validation.every > 0 or config.validation.final
    explicit = list(config.validation.prompts)
    prompts = explicit or cache.validation_prompts
    if not runs or not prompts:
        return []
    if is_i2v and len(config.validation.images) != len(prompts):
        if not explicit:
            report.warn("validation skipped: the cache has validation prompts, but image-to-video validation needs "
                        "one --validation-image per prompt")
            return []
        raise ConfigError(f"image-to-video validation needs one --validation-image per prompt "
                          f"({len(prompts)} prompts, {len(config.validation.images)} images)")
    missing = [p for p in prompts if p not in cache.validation_prompts]
    if missing:
        raise ConfigError(
            f"validation prompt not in the cache: {missing[0]!r}",
            hint="pass validation prompts to `cogtune encode --validation-prompt`, so that training needs no "
                 "text encoder",
        )
    return prompts


def validation_shape(config: TrainConfig, cache: VideoLatentCache) -> tuple[int, int, int]:
    """(frames, height, width) of validation videos: the configured ones, else the cache's first bucket's."""
    return validation_shape_from(config, cache.bucket_shapes[0])


def validation_shape_from(config: TrainConfig, first_bucket: tuple[int, int, int]) -> tuple[int, int, int]:
    """`validation_shape` for a run whose first bucket is `first_bucket` (the estimator has no cache)."""
    frames, height, width = first_bucket
    validation = config.validation
    return validation.frames or frames, validation.height or height, validation.width or width


class Validator:
    def __init__(self, config: TrainConfig, model: ResolvedModel, cache: VideoLatentCache, accelerator: Any,
                 compute_dtype: Any, prompts: list[str]):
        self.config = config
        self.model = model
        self.cache = cache
        self.accelerator = accelerator
        self.compute_dtype = compute_dtype
        self.prompts = prompts
        self.embeds = self._prompt_embeds() if prompts else None

    def _prompt_embeds(self):
        import torch

        cached = dict(zip(self.cache.validation_prompts, self.cache.validation_prompt_embeds()))
        return torch.stack([cached[p] for p in self.prompts])

    def run(self, transformer: Any, name: str, memory: MemoryLog) -> None:
        """Render the validation videos into `validation/<name>/`."""
        if not self.prompts:
            return
        if "memory_before_validation" not in memory.records:
            memory.record("memory_before_validation")
        self._render(transformer, Path(self.config.output_dir) / "validation" / name)
        self.accelerator.wait_for_everyone()
        if "memory_after_validation" not in memory.records:
            memory.record("memory_after_validation")

    def _my_prompts(self) -> tuple[list[int], int]:
        """The prompt indices this process renders, and how many of them are real (the rest pad)."""
        from cogtune.distributed import is_sharded

        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        mine = list(range(rank, len(self.prompts), world))
        if not is_sharded(self.accelerator):
            return mine, len(mine)
        rounds = -(-len(self.prompts) // world)
        return mine + [mine[-1] if mine else 0] * (rounds - len(mine)), len(mine)

    def _shape(self) -> tuple[int, int, int]:
        return validation_shape(self.config, self.cache)

    def _render(self, transformer: Any, folder: Path) -> None:
        from cogtune.data.video import write_video

        indices, real = self._my_prompts()
        rendered = self._generate(transformer, indices)[:real] if indices else []
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            rendered = gather_object(rendered)
        if self.accelerator.is_main_process:
            for index, video in sorted(rendered, key=lambda item: item[0]):
                write_video(folder / f"{index:02d}.mp4", video, fps=self.model.spec.fps)
            report.info(f"validation videos: {folder}")

    def _generate(self, transformer: Any, indices: list[int]) -> list[tuple[int, Any]]:
        """(prompt index, uint8 video) for each index; video i with seed + i, as `cogtune sample` does."""
        import numpy as np
        import torch

        from cogtune.models.loading import build_pipeline, load_scheduler, load_vae
        from cogtune.generate import generate_videos, load_condition_image

        spec = self.model.spec
        validation = self.config.validation
        frames, height, width = self._shape()
        unwrapped = self.accelerator.unwrap_model(transformer)
        was_training = unwrapped.training
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # training's cached blocks would not fit the VAE's tensors: give them back
        unwrapped.eval()
        vae = load_vae(self.model, dtype=self.compute_dtype, device=self.accelerator.device)
        if self.config.memory.validation_vae_tiling:
            tile_height, tile_width = self.config.memory.validation_tile_size
            vae.enable_tiling(tile_sample_min_height=tile_height, tile_sample_min_width=tile_width)
        pipe = build_pipeline(self.model, transformer=unwrapped, vae=vae, text_encoder=None, tokenizer=None,
                              scheduler=load_scheduler(self.model))
        negative = self.cache.empty_prompt_embeds()[None]
        videos = []
        with report.video_progress(len(indices), validation.steps, description="validation") as bars:
            for index in indices:
                image = [load_condition_image(validation.images[index])] if validation.images else None
                with validation_feed_forward_chunks(unwrapped, self.config.memory.offload_blocks):
                    (video,) = generate_videos(pipe, spec, prompt_embeds=self.embeds[index : index + 1],
                                               negative_prompt_embeds=negative, frames=frames, height=height,
                                               width=width, steps=validation.steps, guidance=validation.guidance,
                                               seed=validation.seed + index, images=image,
                                               denoising_context=self.accelerator.autocast, progress=bars)
                videos.append((index, (np.clip(video, 0.0, 1.0) * 255).round().astype(np.uint8)))
        del pipe, vae
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if was_training:
            unwrapped.train()
        return videos
