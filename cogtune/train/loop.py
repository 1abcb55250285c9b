"""The training recipe: `run_training(config)` assembles the pieces and runs the loop.

Read top to bottom: check everything (no weights yet), set up accelerate, load the transformer and
make it trainable (LoRA or full), then loop over optimizer steps. A step's batch comes from a
stateless schedule and its random draws from per-sample generators (`cogtune.train.step`), so a
resumed run repeats exactly what an uninterrupted one would have done, and N processes with batch
B draw what one process with batch N x B draws.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from cogtune import __version__, distributed, report
from cogtune.config import config_to_dict, write_config
from cogtune.encode.cache import VideoLatentCache
from cogtune.errors import ConfigError, TrainingError
from cogtune.fsutil import OutputLock, atomic_write_text, is_main_launch_process
from cogtune.models.loading import ResolvedModel, resolve_model
from cogtune.models.positions import drop_learned_positional_embeddings, needs_learned_positions_dropped
from cogtune.models.registry import ModelSpec
from cogtune.train import checkpoint
from cogtune.train.config import TrainConfig
from cogtune.train.data import BatchLoader, BatchSchedule, describe_items, step_items
from cogtune.train.full import TRANSFORMER_DIR, load_full_transformer_into, save_full_transformer
from cogtune.train.lora import LORA_WEIGHTS_NAME, add_lora, load_lora_state, save_lora
from cogtune.train.memory import MemoryLog
from cogtune.train.optimizers import (
    CUDA_ONLY,
    clip_gradients,
    current_learning_rate,
    keep_tensor_learning_rates,
    make_optimizer,
    remember_tensor_learning_rates,
)
from cogtune.train.step import StepSettings, derive_seed, sample_generators, training_step
from cogtune.train.validation import Validator, validation_prompts, validation_shape


@dataclasses.dataclass
class TrainResult:
    output_dir: Path
    steps: int
    losses: list[float]
    weights: Path
    memory: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """Everything decided before any weight is loaded."""

    model: ResolvedModel
    cache: VideoLatentCache
    drop_learned_positions: bool
    validation_prompts: list[str]


# --- checks before any weight is loaded --------------------------------------------------------

def plan_run(config: TrainConfig) -> RunPlan:
    model = resolve_model(config.model, random_weights=config.random_weights)
    spec = model.spec
    if config.task == "i2v" and not spec.is_i2v:
        raise ConfigError(f"{spec.name} is a text-to-video model; use `cogtune train t2v` or an I2V model")
    if config.task == "t2v" and spec.is_i2v:
        raise ConfigError(f"{spec.name} is an image-to-video model; use `cogtune train i2v`")
    if config.report_to != "none" and importlib.util.find_spec(config.report_to) is None:
        raise ConfigError(f"--report-to {config.report_to} needs the {config.report_to} package",
                          hint=f"pip install {config.report_to}")
    if config.optimizer.name in CUDA_ONLY:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"optimizer {config.optimizer.name} needs a CUDA GPU")
    _check_strategy(config)
    cache = VideoLatentCache(config.data)
    cache.check_compatible(spec, needs_image_latents=config.task == "i2v")
    checked = {f"bucket {bucket}": tuple(int(v) for v in bucket.split("x")) for bucket in cache.buckets}
    prompts = validation_prompts(config, cache, spec.is_i2v)
    if prompts:
        checked["validation"] = validation_shape(config, cache)
    spec.check_clip_shapes(checked)  # type: ignore[arg-type]
    needed = needs_learned_positions_dropped(spec, list(checked.values()))  # type: ignore[arg-type]
    if needed and config.learned_positional_embeddings == "keep":
        raise ConfigError(
            f"{spec.name} has learned positional embeddings for its native resolution only; "
            f"{', '.join(checked)} need them dropped",
            hint="--learned-positional-embeddings drop (or auto)",
        )
    drop = config.learned_positional_embeddings == "drop" or (needed and config.learned_positional_embeddings == "auto")
    if drop and not spec.learned_positional_embeddings:
        drop = False
    return RunPlan(model, cache, drop, prompts)


def _check_strategy(config: TrainConfig) -> None:
    """The launch's strategy (DDP, FSDP, DeepSpeed) can run here and combines with the memory options."""
    distributed.check_launch()
    strategy = distributed.requested_strategy()
    if strategy not in ("fsdp", "deepspeed"):
        return
    clashes = [flag for flag, on in (("--fp8", config.memory.fp8_weights),
                                     ("--offload-blocks", config.memory.offload_blocks),
                                     ("--optimizer adamw-cpu-offload", config.optimizer.name == "adamw-cpu-offload"))
               if on]
    if clashes:
        name = "FSDP" if strategy == "fsdp" else "DeepSpeed"
        raise ConfigError(f"{clashes[0]} does not combine with {name}, which shards and offloads weights itself",
                          hint="drop the option, or use a config with CPU offload "
                               "(`cogtune config accelerate --strategy zero3-offload`)")


# --- setup ---------------------------------------------------------------------------------------

def _mixed_precision(config: TrainConfig, spec: ModelSpec) -> str:
    import torch

    if config.mixed_precision != "auto":
        return config.mixed_precision
    if not torch.cuda.is_available():
        return "no"
    return {"float16": "fp16", "bfloat16": "bf16"}.get(spec.weight_dtype, "no")


def load_trainable_transformer(config: TrainConfig, plan: RunPlan, device: Any, mixed_precision: str,
                               checkpoint_blocks: bool | None = None):
    """The transformer with the right parameters trainable, in the right dtypes, and its compute dtype.

    LoRA: frozen base weights in the model's dtype (float32 on a CPU; float8 storage with
    `memory.fp8_weights`), LoRA weights in float32. Full: float32 master weights; autocast (mixed
    precision) runs the matmuls in bf16/fp16. Order matters: block offloading hooks go on before
    the LoRA layers exist (so that they stay on the GPU), float8 storage after (so that peft does not
    create the LoRA layers in float8), compilation last. `checkpoint_blocks` overrides
    `config.gradient_checkpointing` (off when FSDP checkpoints the blocks itself).
    """
    import torch
    from diffusers.training_utils import cast_training_params

    from cogtune.models.fp8 import store_frozen_linears_in_float8
    from cogtune.models.loading import load_transformer, torch_dtype

    memory = config.memory
    on_cpu = torch.device(device).type == "cpu"
    base_dtype = torch.float32 if config.full or on_cpu else torch_dtype(plan.model.spec.weight_dtype)
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, base_dtype)
    transformer = load_transformer(plan.model, dtype=base_dtype, device="cpu" if memory.offload_blocks else device)
    if plan.drop_learned_positions:
        drop_learned_positional_embeddings(transformer)
    if config.full:
        transformer.requires_grad_(True)
        if plan.drop_learned_positions:
            transformer.patch_embed.pos_embedding.requires_grad_(False)  # unused, so it gets no gradient
    else:
        transformer.requires_grad_(False)
        if memory.offload_blocks:
            transformer.enable_group_offload(onload_device=torch.device(device), offload_device=torch.device("cpu"),
                                             offload_type="leaf_level", use_stream=not on_cpu)
        torch.manual_seed(derive_seed(config.seed, "lora-init"))  # the LoRA's A matrices start random
        add_lora(transformer, config.lora)
        if memory.offload_blocks:
            for name, parameter in transformer.named_parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.to(device)  # only the frozen weights travel
        if memory.fp8_weights:
            store_frozen_linears_in_float8(transformer, compute_dtype)
        cast_training_params(transformer, dtype=torch.float32)
    if config.gradient_checkpointing if checkpoint_blocks is None else checkpoint_blocks:
        transformer.enable_gradient_checkpointing()
    if memory.compile:
        for block in transformer.transformer_blocks:
            block.compile()
    return transformer, compute_dtype


def ignore_frozen_weights_in_ddp(transformer: Any) -> None:
    """DDP need not broadcast or reduce what does not train (and cannot broadcast float8 over some backends)."""
    from torch.nn.parallel import DistributedDataParallel

    frozen = [name for name, p in transformer.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in transformer.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(transformer, frozen)


def lora_info(config: TrainConfig, plan: RunPlan) -> dict[str, Any]:
    """What a LoRA file records about its training (read back by `cogtune sample`)."""
    spec = plan.model.spec
    return {
        "cogtune_version": __version__,
        "model": plan.model.reference,
        "hub_id": spec.hub_id,
        "family": spec.family,
        "task": config.task,
        "rank": config.lora.rank,
        "alpha": config.lora.effective_alpha,
        "buckets": plan.cache.buckets,
        "drop_learned_positional_embeddings": plan.drop_learned_positions,
    }


# --- the recipe ----------------------------------------------------------------------------------

def fit_memory(config: TrainConfig, plan: RunPlan) -> TrainConfig:
    """`--memory-profile`: the fastest memory options that fit; otherwise warn on a GPU that will not fit.

    Both use the estimator (`cogtune.bench`), which sizes one-GPU runs; every process of a DDP
    launch computes the same choice, since the estimate is deterministic.
    """
    import torch

    from cogtune.bench import fit

    strategy = distributed.requested_strategy()
    if config.memory.profile != "none":
        if strategy not in ("single", "ddp"):
            raise ConfigError(f"memory profiles size one GPU's run; under {strategy} choose the options yourself")
        budget = fit.profile_budget(config.memory.profile)
        requested = fit.case_for_training(config, plan.cache.buckets)
        case, estimate = fit.choose_profile(requested, budget)
        changes = case.changes(requested) or ["no change"]
        report.info(f"memory profile {config.memory.profile}: {', '.join(changes)} "
                    f"(estimated peak {estimate.memory.after_testing:.1f} GiB of {budget:.1f} GiB)")
        return fit.apply_case(config, case)
    main = int(os.environ.get("RANK", "0")) == 0
    if config.memory.check and torch.cuda.is_available() and strategy in ("single", "ddp") and main:
        from cogtune.bench.estimate import estimate_case

        budget = fit.budget_gib(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1024**3)
        estimate = estimate_case(fit.case_for_training(config, plan.cache.buckets))
        if not fit.fits(estimate, budget):
            suggestion = fit.cheapest_fit(estimate, budget)
            advice = ", ".join(suggestion.changes) if suggestion else "a smaller clip shape or batch"
            report.warn(f"this run is estimated to peak at {estimate.memory.after_testing:.1f} GiB; this GPU gives "
                        f"{budget:.1f} GiB: it will likely run out of memory (try {advice}, or --memory-profile auto)")
    return config


def run_training(config: TrainConfig) -> TrainResult:
    # One run per output folder: a second one is refused, naming the first. Only the launch's main
    # process locks; the run's other processes write into the folder by design.
    with OutputLock(config.output_dir, main=is_main_launch_process()):
        return _run_training(config)


def _run_training(config: TrainConfig) -> TrainResult:
    plan = plan_run(config)
    config = fit_memory(config, plan)
    spec, cache = plan.model.spec, plan.cache
    output_dir = Path(config.output_dir)
    if is_main_launch_process():  # only the main one: the others may start after it has written config.toml
        checkpoint.check_new_run_folder(config)
    resume_from = checkpoint.find_resume_checkpoint(config)

    from cogtune.quiet import quiet_libraries

    quiet_libraries()
    import torch
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler

    from cogtune.models.loading import load_scheduler, torch_dtype

    mixed_precision = _mixed_precision(config, spec)
    accelerator = distributed.make_accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    report.set_main_process(accelerator.is_main_process)
    device = accelerator.device
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_config(config, output_dir)
    _print_run_summary(config, plan, accelerator, mixed_precision)
    launched_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")  # what the launch's config file says
    if launched_precision not in ("no", mixed_precision):
        report.warn(f"the accelerate config says mixed precision {launched_precision}; cogtune trains with "
                    f"{mixed_precision} (--mixed-precision {config.mixed_precision})")

    scheduler = load_scheduler(plan.model)
    # With FSDP's own activation checkpointing (its config's choice) the model's would recompute twice.
    checkpoint_blocks = config.gradient_checkpointing and not distributed.fsdp_checkpoints_activations(accelerator)
    transformer, compute_dtype = load_trainable_transformer(config, plan, device, mixed_precision, checkpoint_blocks)
    opt = config.optimizer
    optimizer = make_optimizer(opt.name, [p for p in transformer.parameters() if p.requires_grad], opt.effective_lr,
                               (opt.beta1, opt.beta2), opt.eps, opt.weight_decay, config.gradient_accumulation)
    if not config.full and distributed.requested_strategy() in ("ddp", "single"):
        ignore_frozen_weights_in_ddp(transformer)
    # Stepped once per optimizer step by this loop (not prepared: accelerate would step it per process).
    lr_scheduler = get_scheduler(config.optimizer.lr_schedule, optimizer=optimizer,
                                 num_warmup_steps=config.optimizer.warmup_steps, num_training_steps=config.steps)
    distributed.configure_deepspeed(accelerator, config.batch_size, config.gradient_accumulation,
                                    config.optimizer.max_grad_norm)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    trainable = [p for p in transformer.parameters() if p.requires_grad]  # FSDP replaces them with shards
    tensor_learning_rates = remember_tensor_learning_rates(optimizer)
    info = lora_info(config, plan)

    def save_trainable(model: Any, folder: Path, state: dict[str, Any]) -> None:
        if config.full:
            save_full_transformer(model, folder / TRANSFORMER_DIR, torch.float32, plan.drop_learned_positions, state)
        else:
            save_lora(folder, model, info, state)

    def load_trainable(model: Any, folder: Path) -> None:
        if config.full:
            load_full_transformer_into(model, folder / TRANSFORMER_DIR)
        else:
            load_lora_state(model, folder / LORA_WEIGHTS_NAME)

    checkpoint.register_hooks(accelerator, config, save_trainable, load_trainable)
    if config.report_to != "none":
        accelerator.init_trackers("cogtune", config=_flat_config(config))

    start_step, losses = 0, []
    if resume_from is not None:
        try:
            accelerator.load_state(str(resume_from))
        except Exception as exc:  # verified, yet unreadable: name the checkpoint, not just the library's reason
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise TrainingError(f"cannot load the checkpoint {resume_from}: {reason}",
                                hint="resume from another checkpoint, or train without --resume") from exc
        start_step, losses, scheduler_state = checkpoint.read_trainer_state(resume_from)
        if distributed.requested_strategy() in ("single", "ddp") and accelerator.scaler is None:
            checkpoint.check_optimizer_steps(optimizer, start_step, resume_from)  # fp16 scaling skips steps
        lr_scheduler.load_state_dict(scheduler_state)
        report.info(f"resumed from {resume_from} at step {start_step}")
    if start_step >= config.steps:
        raise ConfigError(f"the checkpoint is at step {start_step}; --steps {config.steps} leaves nothing to train",
                          hint="raise --steps to continue training")

    empty_embeds = cache.empty_prompt_embeds()
    rank, world = accelerator.process_index, accelerator.num_processes
    schedule = BatchSchedule([item["bucket"] for item in cache.items], config.batch_size, world, config.seed)
    loader = BatchLoader(cache, schedule, rank)
    settings = StepSettings(caption_dropout=config.effective_caption_dropout,
                            image_dropout=config.image_dropout if spec.is_i2v else 0.0)
    memory = MemoryLog(device)
    memory.record("memory_before_training")
    validator = Validator(config, plan.model, cache, accelerator, compute_dtype, plan.validation_prompts)
    accumulation = config.gradient_accumulation
    learning_rates: list[float] = []  # of this session's steps (after the schedule step)
    step_seconds: list[float] = []

    transformer.train()
    try:
        with report.progress("training", total=config.steps, unit="step", completed=start_step) as bar:
            for step in range(start_step, config.steps):
                started = time.perf_counter()
                step_loss = 0.0
                for micro in range(accumulation):
                    # Dropout inside the model draws from the global RNG: seed it per micro-step too.
                    torch.manual_seed(derive_seed(config.seed, step, micro, rank, "global"))
                    batch = loader.get(step * accumulation + micro)
                    generators = sample_generators(config.seed, step, micro, rank * config.batch_size,
                                                   len(batch["indices"]))
                    # accumulate(): gradients synchronise on the last micro-step only (DeepSpeed steps there).
                    with accelerator.accumulate(transformer):
                        # Backward runs outside autocast, so that its cache of low-precision weight copies is
                        # freed first (checkpointed blocks re-enter autocast when they recompute).
                        with accelerator.autocast(), activations_offloaded(config.memory.offload_activations, device):
                            loss = training_step(transformer, scheduler, spec, batch, empty_embeds, settings,
                                                 generators, device, compute_dtype)
                        accelerator.backward(loss)  # divided by the accumulation steps
                    step_loss += loss.detach().float().item() / accumulation
                if config.optimizer.max_grad_norm > 0:
                    clip_gradients(accelerator, optimizer, trainable, config.optimizer.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                keep_tensor_learning_rates(optimizer, tensor_learning_rates)
                optimizer.zero_grad(set_to_none=True)

                step_loss = _mean_across_processes(accelerator, step_loss)
                if not math.isfinite(step_loss):
                    good = checkpoint.last_good_checkpoint(output_dir)
                    where = f"; the last good checkpoint is {good}" if good else "; no good checkpoint was saved"
                    items = describe_items(cache, step_items(schedule, step, accumulation))
                    raise TrainingError(f"loss became {step_loss} at step {step + 1}{where}; the step's items: {items}",
                                        hint="lower --lr or check those items; resume with --resume latest")
                losses.append(step_loss)
                done = step + 1
                lr = current_learning_rate(optimizer)
                learning_rates.append(lr)
                step_seconds.append(time.perf_counter() - started)
                if config.report_to != "none":
                    accelerator.log({"loss": step_loss, "lr": lr}, step=done)
                bar.advance(1, loss=step_loss, lr=lr, **{"s/step": time.perf_counter() - started},
                            **_memory_field(device))
                if config.checkpointing.every and done % config.checkpointing.every == 0 and done < config.steps:
                    checkpoint.save_checkpoint(accelerator, config, done, losses, lr_scheduler.state_dict())
                if config.validation.every and done % config.validation.every == 0 and done < config.steps:
                    validator.run(transformer, f"step-{done:06d}", memory)
    finally:
        loader.close()

    weights = _save_final_weights(accelerator, config, plan, transformer, torch_dtype(spec.weight_dtype))
    if config.checkpointing.every:
        checkpoint.save_checkpoint(accelerator, config, config.steps, losses, lr_scheduler.state_dict())
    if config.validation.final:
        validator.run(transformer, "final", memory)
    memory.record("memory_after_testing")
    if accelerator.is_main_process:
        memory.write(output_dir / "memory.json")
        memory.print_table()
        _write_loss_curve(losses, output_dir)
        summary = {"steps": config.steps, "final_loss": losses[-1] if losses else None, "losses": losses,
                   "learning_rates": learning_rates, "step_seconds": [round(t, 4) for t in step_seconds],
                   "weights": str(weights), "learned_positional_embeddings_dropped": plan.drop_learned_positions}
        atomic_write_text(output_dir / "training_summary.json", json.dumps(summary, indent=2) + "\n")
    if config.report_to != "none":
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return TrainResult(output_dir, config.steps, losses, weights, memory.records)


def activations_offloaded(enabled: bool, device: Any):
    """Keep tensors saved for backward in (pinned) CPU memory; with checkpointing, the block inputs."""
    import torch

    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.device(device).type == "cuda")


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


def _save_final_weights(accelerator: Any, config: TrainConfig, plan: RunPlan, transformer: Any, dtype: Any) -> Path:
    """OUT/pytorch_lora_weights.safetensors, or OUT/transformer/ in the model's dtype.

    Under FSDP and ZeRO the weights are gathered from every process first, so the files are the
    same plain diffusers files as a one-process run's (no `zero_to_fp32` step).
    """
    accelerator.wait_for_everyone()
    output_dir = Path(config.output_dir)
    state = distributed.gather_state_dict(accelerator, transformer, trainable_only=not config.full)
    unwrapped = accelerator.unwrap_model(transformer)
    target = output_dir / TRANSFORMER_DIR if config.full else output_dir / LORA_WEIGHTS_NAME
    if accelerator.is_main_process:
        if config.full:
            save_full_transformer(unwrapped, target, dtype, plan.drop_learned_positions, state)
        else:
            save_lora(output_dir, unwrapped, lora_info(config, plan), state)
        report.success(f"weights saved: {target}")
    accelerator.wait_for_everyone()
    return target


def _write_loss_curve(losses: list[float], output_dir: Path) -> None:
    if not losses:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cogtune.fsutil import atomic_path

    figure, axis = plt.subplots(figsize=(7, 3.5), dpi=120)
    steps = range(1, len(losses) + 1)
    axis.plot(steps, losses, linewidth=1, alpha=0.5, label="loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        smoothed = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                    for i in range(len(losses))]
        axis.plot(steps, smoothed, linewidth=2, label=f"mean of {window}")
    positive = [value for value in losses if value > 0]
    if positive and max(positive) / min(positive) > 20:  # a log axis only when the loss spans decades
        axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
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


def _print_run_summary(config: TrainConfig, plan: RunPlan, accelerator: Any, mixed_precision: str) -> None:
    world = accelerator.num_processes
    model = plan.model
    rows = [
        ("model", f"{model.reference} ({model.spec.family})"),
        ("task", config.task),
        ("method", "full fine-tuning (float32 master weights)" if config.full else
         f"LoRA rank {config.lora.rank}, alpha {config.lora.effective_alpha:g}"),
        ("cache", f"{config.data} ({len(plan.cache)} items; buckets {', '.join(plan.cache.buckets)})"),
        ("device", f"{accelerator.device} x {world} process(es), mixed precision {mixed_precision}"),
        ("strategy", distributed.strategy_name(accelerator)),
        ("batch", f"{config.batch_size} per process x {world} processes x {config.gradient_accumulation} "
                  f"accumulation = {config.batch_size * world * config.gradient_accumulation} per step"),
        ("steps", config.steps),
        ("optimizer", f"{config.optimizer.name}, lr {config.optimizer.effective_lr:g}, {config.optimizer.lr_schedule}"),
        ("output", config.output_dir),
    ]
    if plan.drop_learned_positions:
        rows.append(("positions", "learned positional embeddings dropped (rotary only)"))
    memory = config.memory
    options = [name for name, on in (("gradient checkpointing", config.gradient_checkpointing
                                      and not distributed.fsdp_checkpoints_activations(accelerator)),
                                     ("fp8 weights", memory.fp8_weights), ("offloaded blocks", memory.offload_blocks),
                                     ("offloaded activations", memory.offload_activations),
                                     ("compiled blocks", memory.compile)) if on]
    rows.append(("memory", ", ".join(options) or "none"))
    report.key_values("training run", rows, to_stderr=True)
