"""Planning a run: everything checked and decided before any weight is loaded.

`plan_run` resolves the model, opens the cache, checks the task, the launch's strategy, every bucket
and the validation shape against the model's limits, finds the validation prompts to embed before
training (and that the model has a text encoder for them), and decides whether 5b-I2V's learned
positional embeddings are dropped. The recipe (`cogtune.train.loop`) and the estimator
(`cogtune.train.sizing`) both start from its `RunPlan`.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import torch

from cogtune import distributed
from cogtune.encode.cache import VideoLatentCache
from cogtune.errors import ConfigError
from cogtune.models.loading import ResolvedModel, default_device, resolve_model
from cogtune.models.positions import needs_learned_positions_dropped
from cogtune.models.quantize import check_base_weights, nf4_backend
from cogtune.models.registry import ModelSpec
from cogtune.train.config import TrainConfig
from cogtune.train.hub import check_push_target
from cogtune.train.lora import check_lora_targets
from cogtune.train.optimizers import CUDA_ONLY
from cogtune.train.validation import prompts_to_embed, validation_prompts, validation_shape


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """Everything decided before any weight is loaded."""

    model: ResolvedModel
    cache: VideoLatentCache
    drop_learned_positions: bool
    validation_prompts: list[str]
    # those neither the cache nor (on resume) the run's folder has: embedded before the transformer loads
    prompts_to_embed: list[str] = dataclasses.field(default_factory=list)


def plan_run(config: TrainConfig) -> RunPlan:
    model = resolve_model(config.model, random_weights=config.random_weights)
    spec = model.spec
    if config.task == "i2v" and not spec.is_i2v:
        raise ConfigError(f"{spec.name} is a text-to-video model; use `cogtune train t2v` or an I2V model")
    if config.task == "t2v" and spec.is_i2v:
        raise ConfigError(f"{spec.name} is an image-to-video model; use `cogtune train i2v`")
    if config.report_to != "none" and importlib.util.find_spec(config.report_to) is None:
        raise ConfigError(f"--report-to {config.report_to} needs the {config.report_to} package",
                          hint=f"pip install 'cogtune[{config.report_to}]'")
    check_push_target(config)
    if config.optimizer.name in CUDA_ONLY:
        if not torch.cuda.is_available():
            raise ConfigError(f"optimizer {config.optimizer.name} needs a CUDA GPU")
    check_strategy(config)
    check_base_weights(config.memory.base_weights, spec, config.memory.nf4_backend)
    check_nf4_activation_offloading(config)
    if not config.full:
        check_lora_targets(spec, config.lora)
    cache = VideoLatentCache(config.data)
    cache.check_compatible(spec, needs_image_latents=config.task == "i2v")
    checked = {f"bucket {bucket}": shape for bucket, shape in zip(cache.buckets, cache.bucket_shapes)}
    prompts = validation_prompts(config, cache, spec.is_i2v)
    new_prompts = prompts_to_embed(config, model, cache, prompts)
    given = (config.validation.frames, config.validation.height, config.validation.width)
    if prompts or any(value is not None for value in given):  # a shape given is checked even with no prompt
        checked["validation"] = validation_shape(config, cache)
    spec.check_clip_shapes(checked)  # type: ignore[arg-type]
    needed = needs_learned_positions_dropped(spec, list(checked.values()))  # type: ignore[arg-type]
    if needed and config.learned_positional_embeddings == "keep":
        raise ConfigError(
            f"{spec.name} has learned positional embeddings for its native resolution only; "
            f"{', '.join(checked)} need them dropped",
            hint="--learned-positional-embeddings drop (or auto)",
        )
    return RunPlan(model, cache, drops_learned_positions(config, spec, needed), prompts, new_prompts)


def check_nf4_activation_offloading(config: TrainConfig) -> None:
    """torchao's NF4 weights saved for backward cannot go to pinned host memory: `--offload-activations` on a GPU
    copies each into a pinned dense tensor, and torchao's `copy_` takes NF4 destinations only. With gradient
    checkpointing only the block inputs are offloaded (the quantized layers all sit inside the blocks)."""
    memory = config.memory
    device = default_device()
    if (memory.base_weights == "nf4" and nf4_backend(memory.nf4_backend, device) == "torchao" and device == "cuda"
            and memory.offload_activations and not config.gradient_checkpointing):
        raise ConfigError("--offload-activations without gradient checkpointing cannot offload torchao's NF4 weights "
                          "(torch's pinned copy fails on an NF4Tensor)",
                          hint="--gradient-checkpointing, or --nf4-backend bitsandbytes")


def drops_learned_positions(config: TrainConfig, spec: ModelSpec, needed: bool) -> bool:
    """Whether the run drops 5b-I2V's learned positional embeddings (`needed`: its shapes require it)."""
    if not spec.learned_positional_embeddings:
        return False
    return config.learned_positional_embeddings == "drop" or (needed and config.learned_positional_embeddings == "auto")


def check_strategy(config: TrainConfig) -> None:
    """The launch's strategy (DDP, FSDP, DeepSpeed) can run here and combines with the memory options."""
    distributed.check_launch(config.mixed_precision)
    strategy = distributed.requested_strategy()
    if strategy not in ("fsdp", "deepspeed"):
        return
    clashes = [flag for flag, on in ((f"--base-weights {config.memory.base_weights}",
                                      config.memory.base_weights != "bf16"),
                                     ("--offload-blocks", config.memory.offload_blocks),
                                     ("--optimizer adamw-cpu-offload", config.optimizer.name == "adamw-cpu-offload"))
               if on]
    if clashes:
        name = "FSDP" if strategy == "fsdp" else "DeepSpeed"
        raise ConfigError(f"{clashes[0]} does not combine with {name}, which shards and offloads weights itself",
                          hint="drop the option, or use a config with CPU offload "
                               "(`cogtune config accelerate --strategy zero3-offload`)")
