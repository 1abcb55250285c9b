"""Validation videos with the in-training weights, through the same code as `cogtune sample`.

Text embeddings come from the run's `validation_prompts.safetensors`, written before the
transformer loads from the cache's embeddings and, for prompts the cache lacks, the model's T5
(loaded, used and freed then, so that no text encoder shares the device with training); the VAE is
loaded for each pass and freed after it. The first pass records `memory_before_validation` and
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
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file

from cogtune import report
from cogtune.encode.cache import VideoLatentCache, compatibility, read_metadata, stable_hash, write_safetensors
from cogtune.errors import ConfigError, DataError
from cogtune.models.loading import ResolvedModel
from cogtune.train.config import TrainConfig
from cogtune.train.memory import MemoryLog
from cogtune.train.placement import memory_placement
from cogtune.generate import side_by_side
from cogtune.train.run_folder import COMPARISON_FOLDER, RunFolder


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


def validation_feed_forward_chunks(transformer: Any, config: TrainConfig) -> Any:
    """`chunked_feed_forward` where the run's placement says so (not with offloaded blocks)."""
    chunked = memory_placement(config).chunked_validation_feed_forward
    return chunked_feed_forward(transformer) if chunked else contextlib.nullcontext()


def validation_prompts(config: TrainConfig, cache: VideoLatentCache, is_i2v: bool) -> list[str]:
    """The prompts validation renders: the configured ones, else those cached by `encode`.

    Checked before any weight loads: no prompt may be empty, and I2V needs an image per prompt
    (cached prompts without images are skipped with a warning instead). Prompts the cache lacks are
    fine: `prepare_validation_embeds` embeds them before the transformer loads.
    """
    runs = config.validation.every > 0 or config.validation.final
    explicit = list(config.validation.prompts)
    prompts = explicit or cache.validation_prompts
    if not runs or not prompts:
        return []
    empty = [number for number, prompt in enumerate(prompts, 1) if not prompt.strip()]
    if empty:
        raise ConfigError(f"validation prompt {empty[0]} is empty", hint="give each --validation-prompt some text")
    if is_i2v and len(config.validation.images) != len(prompts):
        if not explicit:
            report.warn("validation skipped: the cache has validation prompts, but image-to-video validation needs "
                        "one --validation-image per prompt")
            return []
        raise ConfigError(f"image-to-video validation needs one --validation-image per prompt "
                          f"({len(prompts)} prompts, {len(config.validation.images)} images)")
    return prompts


# --- validation prompts kept with the run ---------------------------------------------------------
#
# Every run that validates writes `validation_prompts.safetensors` into its folder: `prompt_embeds`
# (N, L, D) in the order of the prompts, which its metadata lists (JSON, with each prompt's token
# count and a key of the model and its text settings). Prompts come from the cache when it has them
# and are embedded with the model's T5 otherwise; a resumed run (`--resume`) reuses the file's
# embeddings, so it needs neither the text encoder nor the cache's validation prompts.

def _run_prompts_key(model: ResolvedModel) -> str:
    return stable_hash({"compat": compatibility(model.spec), "model": model.location})


def stored_validation_prompts(config: TrainConfig, model: ResolvedModel) -> list[str]:
    """Prompts whose embeddings a resumed run reuses from its folder (none for a new run)."""
    if config.resume is None:
        return []  # a new run embeds afresh: the folder may hold an older run's file (--overwrite)
    meta = read_metadata(RunFolder.of(config).validation_prompts) or {}
    if meta.get("key") != _run_prompts_key(model):
        return []
    try:
        prompts = json.loads(meta.get("prompts", "[]"))
    except ValueError:
        return []
    return [p for p in prompts if isinstance(p, str)] if isinstance(prompts, list) else []


def prompts_to_embed(config: TrainConfig, model: ResolvedModel, cache: VideoLatentCache,
                     prompts: list[str]) -> list[str]:
    """The validation prompts neither the cache nor (on resume) the run's folder has embeddings of.

    Checked before any weight loads: when there are some, the model must have a text encoder.
    """
    known = set(cache.validation_prompts) | set(stored_validation_prompts(config, model))
    new = list(dict.fromkeys(p for p in prompts if p not in known))
    if new and not has_text_encoder(model):
        raise ConfigError(
            f"validation prompt {new[0]!r} is not in the cache, and {model.reference} has no text encoder to embed "
            f"it (no text_encoder/ or tokenizer/ folder)",
            hint="pass the prompt to `cogtune encode --validation-prompt`, or use a model folder with its text encoder",
        )
    return new


def has_text_encoder(model: ResolvedModel) -> bool:
    """Whether the model's tokenizer and T5 can be loaded (a local folder may lack them; a Hub model is
    checked when it loads, a random-weights one builds its own)."""
    if model.source not in ("local", "tiny"):
        return True
    root = Path(model.location or "")
    return (root / "text_encoder" / "config.json").is_file() and (root / "tokenizer").is_dir()


def text_encoder_device(model: ResolvedModel, device: Any) -> Any:
    """Where training embeds new validation prompts: the training device when it is a GPU with room for
    T5's weights and a margin (nothing else is on it yet), else the CPU. Both give what `cogtune
    encode` would have cached on this machine (float32 on the CPU, the model's dtype on the GPU)."""
    from cogtune.models.text import text_encoder_bytes, text_encoder_dtype

    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return "cpu"
    free, _ = torch.cuda.mem_get_info(device)
    needed = text_encoder_bytes(model.spec, text_encoder_dtype(model.spec, device))
    return device if free >= needed * 1.25 + 2 * 1024**3 else "cpu"


def prepare_validation_embeds(config: TrainConfig, model: ResolvedModel, cache: VideoLatentCache, accelerator: Any,
                              prompts: list[str], new: list[str]) -> None:
    """Write the run's `validation_prompts.safetensors` before the transformer loads.

    Only the main process works (embedding `new` prompts with T5, freed afterwards, see
    `text_encoder_device`); the others wait for the file, which `Validator` reads.
    """
    if not prompts:
        return
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            _write_run_prompts(config, model, cache, prompts, new, accelerator.device)


def _write_run_prompts(config: TrainConfig, model: ResolvedModel, cache: VideoLatentCache, prompts: list[str],
                       new: list[str], device: Any) -> None:
    from cogtune.models.text import embed_prompts, warn_cut_prompts

    path = RunFolder.of(config).validation_prompts
    stored = stored_validation_prompts(config, model)
    if not new and set(prompts) <= set(stored):
        return  # a resumed run with the same prompts: the file stays as it is
    embeds: dict[str, Any] = {}
    counts: dict[str, int | None] = {}
    if stored:
        embeds.update(zip(stored, _read_run_prompts(path)))
        counts.update(zip(stored, _stored_token_counts(path)))
    in_cache = [p for p in prompts if p not in embeds and p in cache.validation_prompts]
    if in_cache:
        embeds.update((p, e) for p, e in zip(cache.validation_prompts, cache.validation_prompt_embeds())
                      if p in in_cache)
    if new:
        where = text_encoder_device(model, device)
        report.info(f"embedding {len(new)} validation prompt{'s' if len(new) > 1 else ''} the cache lacks "
                    f"with {model.reference}'s text encoder (on {torch.device(where).type})")
        new_embeds, new_counts = embed_prompts(model, new, where)
        embeds.update(zip(new, new_embeds))
        counts.update(zip(new, new_counts))
        warn_cut_prompts(new, new_counts, model.spec.max_text_tokens, model.reference, what="validation prompt")
        if torch.device(where).type == "cuda":
            torch.cuda.reset_peak_memory_stats(where)  # the run's memory figures are training's, not T5's
    dtype = embeds[prompts[0]].dtype
    for prompt in prompts:
        dtype = torch.promote_types(dtype, embeds[prompt].dtype)  # float32 from the CPU, bf16 from a GPU cache
    tensor = torch.stack([embeds[p].to(dtype) for p in prompts])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, {"prompt_embeds": tensor},
                      {"key": _run_prompts_key(model), "prompts": prompts,
                       "num_tokens": [counts.get(p) for p in prompts]})


def _stored_token_counts(path: Path) -> list[int | None]:
    try:
        counts = json.loads((read_metadata(path) or {}).get("num_tokens", "[]"))
    except ValueError:
        return []
    return counts if isinstance(counts, list) else []


def _read_run_prompts(path: Path) -> Any:
    try:
        return load_file(str(path))["prompt_embeds"]
    except Exception as exc:
        raise DataError(f"{path} is unreadable ({exc})",
                        hint="delete it: training embeds its validation prompts again") from exc


def run_prompt_embeds(output_dir: str | Path, prompts: list[str]) -> Any:
    """(N, L, D) embeddings of `prompts`, from the run's file that `prepare_validation_embeds` wrote."""
    path = RunFolder(Path(output_dir)).validation_prompts
    try:
        stored = json.loads((read_metadata(path) or {}).get("prompts", "[]"))
    except ValueError:
        stored = []
    missing = [p for p in prompts if p not in stored]
    if missing:
        raise DataError(f"{path} lacks the validation prompt {missing[0]!r}",
                        hint="delete it: training embeds its validation prompts again")
    embeds = _read_run_prompts(path)
    return embeds[[stored.index(p) for p in prompts]]


def validation_shape(config: TrainConfig, cache: VideoLatentCache) -> tuple[int, int, int]:
    """(frames, height, width) of validation videos: the configured ones, else the cache's first video bucket's."""
    return validation_shape_from(config, first_video_bucket(cache.bucket_shapes))


def first_video_bucket(shapes: list[tuple[int, int, int]]) -> tuple[int, int, int]:
    """The first bucket of several frames (images' 1-frame buckets sort first), else the first bucket."""
    return next((shape for shape in shapes if shape[0] > 1), shapes[0])


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
        self.base_videos: dict[int, Any] = {}  # the base model's video per prompt: the same at every pass

    def _prompt_embeds(self):
        return run_prompt_embeds(self.config.output_dir, self.prompts)

    def run(self, transformer: Any, name: str, memory: MemoryLog) -> None:
        """Render the validation videos into the pass's folder (`RunFolder.validation(name)`)."""
        if not self.prompts:
            return
        if "memory_before_validation" not in memory.records:
            memory.record("memory_before_validation")
        self._render(transformer, RunFolder.of(self.config).validation(name))
        self.accelerator.wait_for_everyone()
        if "memory_after_validation" not in memory.records:
            memory.record("memory_after_validation")

    def rendered(self, name: str) -> bool:
        """Whether pass `name` wrote every prompt's video (a pass killed half-way did not)."""
        folder = RunFolder.of(self.config).validation(name)
        return all((folder / f"{index:02d}.mp4").is_file() for index in range(len(self.prompts)))

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
            rendered = gather_object(rendered)
        if self.accelerator.is_main_process:
            for index, video, base in sorted(rendered, key=lambda item: item[0]):
                write_video(folder / f"{index:02d}.mp4", video, fps=self.model.spec.fps)
                if base is not None:
                    write_video(folder / COMPARISON_FOLDER / f"{index:02d}.mp4",
                                side_by_side(base / 255.0, video / 255.0), fps=self.model.spec.fps)
            report.info(f"validation videos: {folder}")

    def _generate(self, transformer: Any, indices: list[int]) -> list[tuple[int, Any, Any]]:
        """(prompt index, uint8 video, the base's uint8 video or None) for each index; video i with seed + i, as
        `cogtune sample` does."""
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
        # The bases are rendered at the first pass, for every index this process has (padding ones too: under
        # FSDP and ZeRO-3 every process must run as many forwards as the others).
        render_bases = self._compares(unwrapped) and not self.base_videos
        with report.video_progress(len(indices) * (2 if render_bases else 1), validation.steps,
                                   description="validation") as bars:
            for index in indices:
                image = [load_condition_image(validation.images[index])] if validation.images else None
                arguments = dict(prompt_embeds=self.embeds[index : index + 1], negative_prompt_embeds=negative,
                                 frames=frames, height=height, width=width, steps=validation.steps,
                                 guidance=validation.guidance, seed=validation.seed + index, images=image,
                                 denoising_context=self.accelerator.autocast, progress=bars)
                with validation_feed_forward_chunks(unwrapped, self.config):
                    (video,) = generate_videos(pipe, spec, **arguments)
                    if render_bases:
                        self.base_videos[index] = self._base_video(pipe, unwrapped, arguments)
                videos.append((index, _uint8(video), self.base_videos.get(index)))
        del pipe, vae
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if was_training:
            unwrapped.train()
        return videos

    def _base_video(self, pipe: Any, unwrapped: Any, arguments: dict[str, Any]) -> Any:
        """The prompt's video with the LoRA switched off (peft's switch): rendered at the first pass and kept,
        since the base's weights do not train."""
        from cogtune.generate import generate_videos
        from cogtune.lora.switch import lora_disabled

        with lora_disabled(unwrapped):
            (video,) = generate_videos(pipe, self.model.spec, **arguments)
        return _uint8(video)

    def _compares(self, unwrapped: Any) -> bool:
        """Whether validation writes base | LoRA videos: a LoRA run with `validation.compare_base` on."""
        from cogtune.lora.switch import lora_layers

        return self.config.validation.compare_base and bool(lora_layers(unwrapped))


def _uint8(video: Any) -> Any:
    return (np.clip(video, 0.0, 1.0) * 255).round().astype(np.uint8)
