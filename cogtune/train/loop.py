"""The training recipe: `run_training(config)` assembles the pieces and runs the loop.

Read top to bottom: resolve and check everything (no weights yet), set up accelerate, load the
transformer and make it trainable (LoRA or full), then loop over optimizer steps. Each step draws
its randomness from a generator seeded by (seed, step, rank), and its batch from a stateless
schedule, so a resumed run repeats exactly what an uninterrupted one would have done.
Text-to-video and image-to-video differ only in `make_model_input`, in plain sight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from cogtune import report
from cogtune.config import config_to_dict, write_config
from cogtune.distributed import force_cpu
from cogtune.encode.cache import VideoLatentCache
from cogtune.errors import ConfigError, TrainingError
from cogtune.fsutil import atomic_write_text
from cogtune.models.loading import ResolvedModel, resolve_model
from cogtune.models.positions import pad_latent_frames, rotary_embeddings
from cogtune.models.registry import ModelSpec
from cogtune.train.config import TrainConfig
from cogtune.train.data import BatchLoader, BatchSchedule
from cogtune.train.loss import compute_v_prediction_loss
from cogtune.train.memory import MemoryLog

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"


@dataclasses.dataclass
class TrainResult:
    output_dir: Path
    steps: int
    losses: list[float]
    weights: Path
    memory: dict[str, Any]


# --- checks before any weight is loaded --------------------------------------------------------

def check_run(config: TrainConfig) -> tuple[ResolvedModel, VideoLatentCache]:
    model = resolve_model(config.model, random_weights=config.random_weights)
    spec = model.spec
    if config.task == "i2v" and not spec.is_i2v:
        raise ConfigError(f"{spec.name} is a text-to-video model; use `cogtune train t2v` or an I2V model")
    if config.task == "t2v" and spec.is_i2v:
        raise ConfigError(f"{spec.name} is an image-to-video model; use `cogtune train i2v`")
    cache = VideoLatentCache(config.data)
    cache.check_compatible(spec, needs_image_latents=config.task == "i2v")
    for bucket in cache.buckets:
        frames, height, width = (int(v) for v in bucket.split("x"))
        spec.check_clip_shape(frames, height, width)
    return model, cache


# --- one training step ---------------------------------------------------------------------------

def sample_latents(latent_dist: Any, scale: float, generator: Any) -> Any:
    """A latent drawn from the cached posterior (B, 2C, F, H, W) -> scaled (B, F, C, H, W)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    posterior = DiagonalGaussianDistribution(latent_dist.float())
    return (posterior.sample(generator=generator) * scale).permute(0, 2, 1, 3, 4)


def condition_latent_dist(batch: dict[str, Any], generator: Any) -> Any:
    """The posterior of the condition image: one of the cached noise-augmented encodes, or the clean one."""
    import torch

    noised = batch.get("image_latent_dist_noised")
    if noised is None:
        return batch["image_latent_dist"]
    pick = torch.randint(0, noised.shape[1], (noised.shape[0],), generator=generator)
    return noised[torch.arange(noised.shape[0]), pick]


def make_model_input(spec: ModelSpec, noisy_latents: Any, batch: dict[str, Any], generator: Any,
                     image_dropout: float) -> Any:
    """The transformer's `hidden_states`: the noisy latents, plus the condition image for I2V.

    I2V (as the I2V pipeline does): the condition image's latent sits in the first frame of a
    zero tensor shaped like the video latents, concatenated on channels; 1.5 pads that tensor at the
    front the same way as the video latents. The image is dropped (zeroed) with `image_dropout`.
    """
    import torch

    if not spec.is_i2v:
        return noisy_latents
    image = sample_latents(condition_latent_dist(batch, generator), spec.image_latent_scale, generator)
    batch_size, frames = noisy_latents.shape[:2]
    keep = (torch.rand(batch_size, generator=generator) >= image_dropout).to(image)
    image = image * keep[:, None, None, None, None]
    condition = torch.zeros_like(noisy_latents)
    padding = batch.get("padding_frames", 0)
    condition[:, padding : padding + 1] = image
    if padding:
        condition[:, :padding] = image
    return torch.cat([noisy_latents, condition.to(noisy_latents.dtype)], dim=2)


def training_step(transformer: Any, scheduler: Any, spec: ModelSpec, batch: dict[str, Any], empty_embeds: Any,
                  caption_dropout: float, generator: Any, device: Any, dtype: Any) -> Any:
    """Loss of one micro-batch; all randomness comes from `generator` (on the CPU)."""
    import torch

    latents = sample_latents(batch["latent_dist"], spec.video_latent_scale, generator)
    latents, padding = pad_latent_frames(spec, latents)
    batch_size, frames, _, height, width = latents.shape
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)

    prompt_embeds = batch["prompt_embeds"].float()
    if caption_dropout > 0:
        drop = torch.rand(batch_size, generator=generator) < caption_dropout
        prompt_embeds = torch.where(drop[:, None, None], empty_embeds.float()[None], prompt_embeds)

    model_input = make_model_input(spec, noisy, {**batch, "padding_frames": padding}, generator,
                                   image_dropout=0.05 if spec.is_i2v else 0.0)
    frame_mask = torch.ones(batch_size, frames)
    frame_mask[:, :padding] = 0
    output = transformer(
        hidden_states=model_input.to(device=device, dtype=dtype),
        encoder_hidden_states=prompt_embeds.to(device=device, dtype=dtype),
        timestep=timesteps.to(device),
        ofs=torch.full((batch_size,), 2.0, device=device, dtype=dtype) if spec.uses_ofs else None,
        image_rotary_emb=rotary_embeddings(spec, frames, height, width, device=device),
        return_dict=False,
    )[0]
    return compute_v_prediction_loss(output, noisy.to(device), latents.to(device), timesteps.to(device), scheduler,
                                     frame_mask=frame_mask.to(device) if padding else None)


def derive_seed(*parts: Any) -> int:
    """A seed that depends only on `parts` (Python's `hash` of strings changes between processes)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:7], "little")


def step_generator(seed: int, step: int, micro: int, rank: int):
    import torch

    return torch.Generator().manual_seed(derive_seed(seed, step, micro, rank, "data"))


# --- setup ---------------------------------------------------------------------------------------

def _mixed_precision(config: TrainConfig, spec: ModelSpec) -> str:
    import torch

    if config.mixed_precision != "auto":
        return config.mixed_precision
    if not torch.cuda.is_available():
        return "no"
    return {"float16": "fp16", "bfloat16": "bf16"}.get(spec.weight_dtype, "no")


def _make_optimizer(config: TrainConfig, parameters: list[Any]):
    import torch

    opt = config.optimizer
    if opt.name == "adamw":
        return torch.optim.AdamW(parameters, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps,
                                 weight_decay=opt.weight_decay)
    if opt.name == "adam":
        return torch.optim.Adam(parameters, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps)
    raise ConfigError(f"unknown optimizer '{opt.name}'")


def _load_trainable_transformer(config: TrainConfig, model: ResolvedModel, device: Any, mixed_precision: str):
    """The transformer with the right parameters trainable, in the right dtypes.

    LoRA: frozen base weights in the model's dtype (float32 on a CPU), LoRA weights in float32.
    Full: float32 master weights; autocast (mixed precision) runs the matmuls in bf16/fp16.
    """
    import torch
    from diffusers.training_utils import cast_training_params

    from cogtune.models.loading import load_transformer, torch_dtype
    from cogtune.train.lora import add_lora

    on_cpu = torch.device(device).type == "cpu"
    if config.full or on_cpu:
        base_dtype = torch.float32
    else:
        base_dtype = torch_dtype(model.spec.weight_dtype)
    transformer = load_transformer(model, dtype=base_dtype, device=device)
    if config.full:
        transformer.requires_grad_(True)
    else:
        transformer.requires_grad_(False)
        add_lora(transformer, config.lora)
        cast_training_params(transformer, dtype=torch.float32)
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, base_dtype)
    return transformer, compute_dtype


# --- checkpoints ---------------------------------------------------------------------------------

def checkpoint_dirs(output_dir: Path) -> list[Path]:
    root = output_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_resume_checkpoint(config: TrainConfig) -> Path | None:
    if config.resume is None:
        return None
    if config.resume == "latest":
        found = checkpoint_dirs(Path(config.output_dir))
        if not found:
            report.warn(f"--resume latest: no checkpoint in {config.output_dir}; starting from step 0")
            return None
        return found[-1]
    path = Path(config.resume)
    if not (path / TRAINER_STATE).is_file():
        raise ConfigError(f"{path} is not a complete cogtune checkpoint (no {TRAINER_STATE})")
    return path


def _register_checkpoint_hooks(accelerator: Any, config: TrainConfig) -> None:
    """Checkpoint only what trains: LoRA weights (not the frozen base) or the full transformer."""
    from cogtune.train.lora import LORA_WEIGHTS_NAME, load_lora_state, save_lora

    def save_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        for model in models:
            unwrapped = accelerator.unwrap_model(model)
            if accelerator.is_main_process:
                if config.full:
                    unwrapped.save_pretrained(Path(output_dir) / "transformer", safe_serialization=True)
                else:
                    save_lora(output_dir, unwrapped)
            if weights:
                weights.pop()

    def load_hook(models: list[Any], input_dir: str) -> None:
        while models:
            model = accelerator.unwrap_model(models.pop())
            if config.full:
                from diffusers import CogVideoXTransformer3DModel

                loaded = CogVideoXTransformer3DModel.from_pretrained(Path(input_dir) / "transformer",
                                                                     torch_dtype=model.dtype)
                model.load_state_dict(loaded.state_dict())
                del loaded
            else:
                load_lora_state(model, Path(input_dir) / LORA_WEIGHTS_NAME)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator: Any, config: TrainConfig, step: int, losses: list[float]) -> Path:
    """A resumable checkpoint, written under a temporary name and renamed when complete."""
    root = Path(config.output_dir) / CHECKPOINTS_DIR
    final = root / f"step-{step:06d}"
    staging = root / f".tmp-step-{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_config(config, staging)
        state = {"step": step, "losses": losses}
        atomic_write_text(staging / TRAINER_STATE, json.dumps(state) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        if config.checkpointing.keep:
            for old in checkpoint_dirs(Path(config.output_dir))[: -config.checkpointing.keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# --- the recipe ----------------------------------------------------------------------------------

def run_training(config: TrainConfig) -> TrainResult:
    model, cache = check_run(config)
    spec = model.spec
    output_dir = Path(config.output_dir)
    resume_from = find_resume_checkpoint(config)

    from cogtune.quiet import quiet_libraries

    quiet_libraries()
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler

    from cogtune.models.loading import load_scheduler

    mixed_precision = _mixed_precision(config, spec)
    accelerator = Accelerator(
        cpu=force_cpu(),
        mixed_precision=mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    report.set_main_process(accelerator.is_main_process)
    device = accelerator.device
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_config(config, output_dir)
    _print_run_summary(config, model, cache, accelerator, mixed_precision)

    scheduler = load_scheduler(model)
    transformer, compute_dtype = _load_trainable_transformer(config, model, device, mixed_precision)
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = _make_optimizer(config, trainable)
    lr_scheduler = get_scheduler(config.optimizer.lr_schedule, optimizer=optimizer,
                                 num_warmup_steps=config.optimizer.warmup_steps, num_training_steps=config.steps)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    _register_checkpoint_hooks(accelerator, config)
    if config.report_to != "none":
        accelerator.init_trackers("cogtune", config=_flat_config(config))

    start_step, losses = 0, []
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        state = json.loads((resume_from / TRAINER_STATE).read_text())
        start_step, losses = int(state["step"]), list(state["losses"])
        report.info(f"resumed from {resume_from} at step {start_step}")

    empty_embeds = cache.empty_prompt_embeds()
    schedule = BatchSchedule([item["bucket"] for item in cache.items], config.batch_size,
                             accelerator.num_processes, config.seed)
    loader = BatchLoader(cache, schedule, accelerator.process_index)
    memory = MemoryLog(device)
    memory.record("memory_before_training")
    validator = _Validator(config, model, cache, accelerator, compute_dtype)

    accumulation = config.gradient_accumulation
    caption_dropout = config.effective_caption_dropout
    transformer.train()
    try:
        with report.progress("training", total=config.steps, unit="step", completed=start_step) as bar:
            for step in range(start_step, config.steps):
                started = time.perf_counter()
                step_loss = 0.0
                for micro in range(accumulation):
                    torch.manual_seed(derive_seed(config.seed, step, micro, accelerator.process_index, "global"))
                    batch = loader.get(step * accumulation + micro)
                    generator = step_generator(config.seed, step, micro, accelerator.process_index)
                    last_micro = micro == accumulation - 1
                    sync = contextlib.nullcontext() if last_micro else accelerator.no_sync(transformer)
                    with sync, accelerator.autocast():
                        loss = training_step(transformer, scheduler, spec, batch, empty_embeds, caption_dropout,
                                             generator, device, compute_dtype)
                        accelerator.backward(loss / accumulation)
                    step_loss += loss.detach().float().item() / accumulation
                if config.optimizer.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, config.optimizer.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                step_loss = _mean_across_processes(accelerator, step_loss)
                if not math.isfinite(step_loss):
                    kept = checkpoint_dirs(output_dir)
                    where = f"; the last good checkpoint is {kept[-1]}" if kept else ""
                    raise TrainingError(f"loss became {step_loss} at step {step + 1}{where}",
                                        hint="lower --lr, or check the data; resume with --resume latest")
                losses.append(step_loss)
                done = step + 1
                if config.report_to != "none":
                    accelerator.log({"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}, step=done)
                bar.advance(1, loss=step_loss, lr=lr_scheduler.get_last_lr()[0],
                            **{"s/step": time.perf_counter() - started}, **_memory_field(device))
                if config.checkpointing.every and done % config.checkpointing.every == 0 and done < config.steps:
                    save_checkpoint(accelerator, config, done, losses)
                if config.validation.every and done % config.validation.every == 0 and done < config.steps:
                    validator.run(transformer, f"step-{done:06d}", memory)
    finally:
        loader.close()

    weights = _save_final_weights(accelerator, config, transformer, output_dir)
    if config.checkpointing.every:
        save_checkpoint(accelerator, config, config.steps, losses)
    if config.validation.final:
        validator.run(transformer, "final", memory)
    memory.record("memory_after_testing")
    if accelerator.is_main_process:
        memory.write(output_dir / "memory.json")
        memory.print_table()
        _write_loss_curve(losses, output_dir)
        summary = {"steps": config.steps, "final_loss": losses[-1] if losses else None, "losses": losses,
                   "weights": str(weights)}
        atomic_write_text(output_dir / "training_summary.json", json.dumps(summary, indent=2) + "\n")
    if config.report_to != "none":
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return TrainResult(output_dir, config.steps, losses, weights, memory.records)


def _mean_across_processes(accelerator: Any, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    import torch

    tensor = torch.tensor([value], device=accelerator.device)
    return float(accelerator.reduce(tensor, reduction="mean").item())


def _memory_field(device: Any) -> dict[str, str]:
    import torch

    if torch.device(device).type == "cuda":
        return {"mem": f"{torch.cuda.max_memory_reserved(device) / 1024**3:.1f}GiB"}
    return {}


def _save_final_weights(accelerator: Any, config: TrainConfig, transformer: Any, output_dir: Path) -> Path:
    from cogtune.train.lora import save_lora

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(transformer)
    target = output_dir / "transformer" if config.full else output_dir / "pytorch_lora_weights.safetensors"
    if accelerator.is_main_process:
        if config.full:
            save_full_transformer(unwrapped, target, resolve_model(config.model, config.random_weights).spec)
        else:
            save_lora(output_dir, unwrapped)
        report.success(f"weights saved: {target}")
    accelerator.wait_for_everyone()
    return target


def save_full_transformer(transformer: Any, target: Path, spec: ModelSpec) -> None:
    """A diffusers `transformer/` folder in the model's own dtype, cast on the host, written atomically."""
    from huggingface_hub import save_torch_state_dict

    from cogtune.fsutil import atomic_directory
    from cogtune.models.loading import torch_dtype

    dtype = torch_dtype(spec.weight_dtype)
    state = {name: tensor.detach().to("cpu", dtype=dtype) for name, tensor in transformer.state_dict().items()}
    with atomic_directory(target, replace=True) as tmp:
        transformer.save_config(tmp)
        save_torch_state_dict(state, tmp, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                              max_shard_size="10GB")


def _write_loss_curve(losses: list[float], output_dir: Path) -> None:
    if not losses:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cogtune.fsutil import atomic_path

    figure, axis = plt.subplots(figsize=(7, 3.5), dpi=120)
    axis.plot(range(1, len(losses) + 1), losses, linewidth=1, alpha=0.5, label="loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        smoothed = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                    for i in range(len(losses))]
        axis.plot(range(1, len(losses) + 1), smoothed, linewidth=2, label=f"mean of {window}")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    positive = [value for value in losses if value > 0]
    if positive and max(positive) / min(positive) > 20:  # a log axis only when the loss spans decades
        axis.set_yscale("log")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_path(output_dir / "loss.png") as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)


def _flat_config(config: TrainConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(prefix: str, data: dict[str, Any]) -> None:
        for key, value in data.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", config_to_dict(config))
    return flat


def _print_run_summary(config: TrainConfig, model: ResolvedModel, cache: VideoLatentCache, accelerator: Any,
                       mixed_precision: str) -> None:
    world = accelerator.num_processes
    rows = [
        ("model", f"{model.reference} ({model.spec.family})"),
        ("task", config.task),
        ("method", "full fine-tuning" if config.full else
         f"LoRA rank {config.lora.rank}, alpha {config.lora.effective_alpha:g}"),
        ("cache", f"{config.data} ({len(cache)} items; buckets {', '.join(cache.buckets)})"),
        ("device", f"{accelerator.device} x {world} process(es), mixed precision {mixed_precision}"),
        ("batch", f"{config.batch_size} per process x {world} processes x {config.gradient_accumulation} accumulation "
                  f"= {config.batch_size * world * config.gradient_accumulation} per step"),
        ("steps", config.steps),
        ("optimizer", f"{config.optimizer.name}, lr {config.optimizer.lr:g}, {config.optimizer.lr_schedule}"),
        ("output", config.output_dir),
    ]
    report.key_values("training run", rows, to_stderr=True)


class _Validator:
    """Validation videos with the in-training weights; the text embeddings come from the cache."""

    def __init__(self, config: TrainConfig, model: ResolvedModel, cache: VideoLatentCache, accelerator: Any,
                 compute_dtype: Any):
        self.config = config
        self.model = model
        self.cache = cache
        self.accelerator = accelerator
        self.compute_dtype = compute_dtype
        self.prompts = list(config.validation.prompts) or cache.validation_prompts
        self._embeds = None

    def _prompt_embeds(self):
        if self._embeds is None:
            cached_embeds = self.cache.validation_prompt_embeds()
            cached = dict(zip(self.cache.validation_prompts, cached_embeds)) if cached_embeds is not None else {}
            missing = [p for p in self.prompts if p not in cached]
            if missing:
                raise ConfigError(
                    f"validation prompt not in the cache: {missing[0]!r}",
                    hint="pass validation prompts to `cogtune encode --validation-prompt` so that training needs no text encoder",
                )
            import torch

            self._embeds = torch.stack([cached[p] for p in self.prompts])
        return self._embeds

    def run(self, transformer: Any, name: str, memory: MemoryLog) -> None:
        """Render the validation videos into `validation/<name>/`; the first run's memory is recorded."""
        if not self.prompts:
            return
        if "memory_before_validation" not in memory.records:
            memory.record("memory_before_validation")
        if self.accelerator.is_main_process:
            self._render(transformer, Path(self.config.output_dir) / "validation" / name)
        self.accelerator.wait_for_everyone()
        if "memory_after_validation" not in memory.records:
            memory.record("memory_after_validation")

    def _render(self, transformer: Any, folder: Path) -> None:
        import torch

        from cogtune.data.video import write_video
        from cogtune.models.loading import build_pipeline, load_scheduler, load_vae
        from cogtune.sample import generate_videos, load_condition_image

        spec = self.model.spec
        config = self.config.validation
        frames, height, width = (int(v) for v in self.cache.buckets[0].split("x"))
        frames, height, width = config.frames or frames, config.height or height, config.width or width
        unwrapped = self.accelerator.unwrap_model(transformer)
        was_training = unwrapped.training
        unwrapped.eval()
        vae = load_vae(self.model, dtype=self.compute_dtype, device=self.accelerator.device)
        pipe = build_pipeline(self.model, transformer=unwrapped, vae=vae, text_encoder=None, tokenizer=None,
                              scheduler=load_scheduler(self.model))
        embeds = self._prompt_embeds()
        negative = self.cache.empty_prompt_embeds()[None].expand_as(embeds)
        images = [load_condition_image(p) for p in config.images] if config.images else None
        with self.accelerator.autocast():
            videos = generate_videos(pipe, spec, embeds, negative, frames, height, width, config.steps,
                                     config.guidance, config.seed, images=images)
        for index, video in enumerate(videos):
            write_video(folder / f"{index:02d}.mp4", video, fps=spec.fps)
        del pipe, vae
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if was_training:
            unwrapped.train()
        report.info(f"validation videos: {folder}")
