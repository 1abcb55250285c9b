"""The training recipe: `run_training(config)` assembles the building blocks and runs the loop.

Read top to bottom: plan (`cogtune.train.plan`: everything checked, no weights yet), size the run
(`cogtune.train.sizing`: advice only), set up accelerate, load the transformer and make it
trainable (`cogtune.train.model`), then loop over optimizer steps, and write the outputs
(`cogtune.train.outputs`). A step's batch comes from a
stateless schedule and its random draws from per-sample generators (`cogtune.train.step`), so a
resumed run repeats exactly what an uninterrupted one would have done, and N processes with batch
B draw what one process with batch N x B draws.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import ProjectConfiguration

from cogtune import distributed, report
from cogtune.config import write_config
from cogtune.errors import ConfigError, TrainingError
from cogtune.fsutil import OutputLock, atomic_write_text
from cogtune.launch import is_main_launch_process
from cogtune.interrupt import StopRequest
from cogtune.lora.format import LORA_WEIGHTS_NAME, load_lora_state, save_lora
from cogtune.train import checkpoint, hub, tracking
from cogtune.train.config import TrainConfig
from cogtune.train.data import BatchLoader, BatchSchedule, describe_items, step_items
from cogtune.models.loading import save_transformer
from cogtune.train.full import TRANSFORMER_DIR, load_full_transformer_into
from cogtune.train.interrupt import resume_command
from cogtune.train.memory import MemoryLog
from cogtune.train.model import (
    activations_offloaded,
    ignore_frozen_weights_in_ddp,
    load_trainable_transformer,
    lora_info,
    resolve_mixed_precision,
)
from cogtune.train.model_card import write_model_card
from cogtune.train.optimizers import (
    clip_gradients,
    current_learning_rate,
    keep_tensor_learning_rates,
    make_optimizer,
    remember_tensor_learning_rates,
)
from cogtune.train.outputs import flat_config, print_run_summary, save_final_weights, write_loss_curve
from cogtune.train.plan import plan_run
from cogtune.train.sizing.fit import fit_memory
from cogtune.train.step import StepSettings, derive_seed, sample_generators, training_step
from cogtune.train.validation import Validator, prepare_validation_embeds


@dataclasses.dataclass
class TrainResult:
    output_dir: Path
    steps: int
    losses: list[float]
    weights: Path
    memory: dict[str, Any]


def run_training(config: TrainConfig) -> TrainResult:
    # One run per output folder: a second one is refused, naming the first. Only the launch's main
    # process locks; the run's other processes write into the folder by design.
    with OutputLock(config.output_dir, main=is_main_launch_process()):
        return _run_training(config)


def _run_training(config: TrainConfig) -> TrainResult:
    plan = plan_run(config)
    if is_main_launch_process():  # only the main one: the others may start after it has written config.toml
        checkpoint.check_new_run_folder(config)
    config = fit_memory(config, plan).resolved()
    spec, cache = plan.model.spec, plan.cache
    output_dir = Path(config.output_dir)
    resume_from = checkpoint.find_resume_checkpoint(config)

    from cogtune.quiet import quiet_libraries

    quiet_libraries()
    from diffusers.optimization import get_scheduler

    from cogtune.models.loading import load_scheduler, torch_dtype

    mixed_precision = resolve_mixed_precision(config, spec)
    accelerator = distributed.make_accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir),
                                            logging_dir=str(output_dir / tracking.LOGS_DIR)),
    )
    report.set_main_process(accelerator.is_main_process)
    device = accelerator.device
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_config(config, output_dir)
    print_run_summary(config, plan, accelerator, mixed_precision)
    launched_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")  # what the launch's config file says
    if launched_precision not in ("no", mixed_precision):
        report.warn(f"the accelerate config says mixed precision {launched_precision}; cogtune trains with "
                    f"{mixed_precision} (--mixed-precision {config.mixed_precision})", shared=True)

    # The validation prompts' embeddings go into the run's folder now, so that T5 (for prompts the cache
    # lacks) is loaded and freed before the transformer: training's peak stays what it was.
    prepare_validation_embeds(config, plan.model, cache, accelerator, plan.validation_prompts, plan.prompts_to_embed)
    scheduler = load_scheduler(plan.model)
    transformer, compute_dtype = load_trainable_transformer(config, plan, device, mixed_precision,
                                                            distributed.fsdp_checkpoints_activations(accelerator))
    opt = config.optimizer
    optimizer = make_optimizer(opt.name, [p for p in transformer.parameters() if p.requires_grad],
                               lr=opt.effective_lr, betas=(opt.beta1, opt.beta2), eps=opt.eps,
                               weight_decay=opt.weight_decay, gradient_accumulation=config.gradient_accumulation)
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
            save_transformer(model, folder / TRANSFORMER_DIR, torch.float32, plan.drop_learned_positions, state)
        else:
            save_lora(folder, model, info, state)

    def load_trainable(model: Any, folder: Path) -> None:
        if config.full:
            load_full_transformer_into(model, folder / TRANSFORMER_DIR)
        else:
            load_lora_state(model, folder / LORA_WEIGHTS_NAME)

    checkpoint.register_hooks(accelerator, config, save_trainable, load_trainable)
    if config.report_to != "none":
        if accelerator.is_main_process:
            (output_dir / tracking.LOGS_DIR).mkdir(exist_ok=True)
        accelerator.init_trackers(tracking.PROJECT, config=flat_config(config),
                                  init_kwargs=tracking.tracker_init_kwargs(config))

    start_step, losses = 0, []
    if resume_from is not None:
        try:
            checkpoint.load_state(accelerator, config, resume_from, transformer, optimizer, load_trainable)
        except ConfigError:
            raise
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
    process, world = accelerator.process_index, accelerator.num_processes
    schedule = BatchSchedule.for_cache(cache, config.batch_size, world, config.seed)
    loader = BatchLoader(cache, schedule, process)
    settings = StepSettings(caption_dropout=config.effective_caption_dropout,
                            image_dropout=config.image_dropout if spec.is_i2v else 0.0)
    memory_log = MemoryLog(device)
    memory_log.record("memory_before_training")
    validator = Validator(config, plan.model, cache, accelerator, compute_dtype, plan.validation_prompts)
    accumulation = config.gradient_accumulation
    learning_rates: list[float] = []  # of this session's steps (after the schedule step)
    step_seconds: list[float] = []

    transformer.train()
    stop = StopRequest()
    try:
        with stop.listening(enabled=True, stopping="stopping after this step, with a checkpoint"), \
                report.progress("training", total=config.steps, unit="step", completed=start_step) as bar:
            for step in range(start_step, config.steps):
                started = time.perf_counter()
                step_loss = 0.0
                for micro in range(accumulation):
                    # Dropout inside the model draws from the global RNG: seed it per micro-step too.
                    torch.manual_seed(derive_seed(config.seed, step, micro, process, "global"))
                    batch = loader.get(step * accumulation + micro)
                    generators = sample_generators(config.seed, step, micro, process * config.batch_size,
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
                grad_norm = None  # the norm before clipping, for the tracker
                if config.optimizer.max_grad_norm > 0:
                    grad_norm = clip_gradients(accelerator, optimizer, trainable, config.optimizer.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                keep_tensor_learning_rates(optimizer, tensor_learning_rates)
                optimizer.zero_grad(set_to_none=True)
                lr = current_learning_rate(optimizer)

                # A stop asked of any process (a launcher forwards Ctrl-C to each) stops all of them after this step.
                step_loss, stopping = _agree_across_processes(accelerator, step_loss, stop.requested)
                if not math.isfinite(step_loss):
                    good = checkpoint.last_good_checkpoint(output_dir)
                    where = f"; the last good checkpoint is {good}" if good else "; no good checkpoint was saved"
                    items = describe_items(cache, step_items(schedule, step, accumulation))
                    raise TrainingError(f"loss became {step_loss} at step {step + 1}{where}; the step's items: {items}",
                                        hint="lower --lr or check those items; resume with --resume latest")
                losses.append(step_loss)
                done = step + 1
                learning_rates.append(lr)
                step_seconds.append(time.perf_counter() - started)
                if config.report_to != "none":
                    accelerator.log(tracking.step_values(step_loss, lr, grad_norm, step_seconds[-1], device), step=done)
                bar.advance(1, loss=step_loss, lr=lr, **_memory_field(device))  # the bar shows s/step itself
                if (stopping or config.checkpointing.every and done % config.checkpointing.every == 0) \
                        and done < config.steps:
                    saved = checkpoint.save_checkpoint(accelerator, config, done, losses, lr_scheduler.state_dict())
                    if stopping:
                        raise stop.interrupted(
                            f"interrupted at step {done} of {config.steps}; checkpoint saved: {saved}",
                            hint=f"resume with: {resume_command(report.invocation, launched=world > 1)}")
                if config.validation.every and done % config.validation.every == 0 and done < config.steps:
                    validator.run(transformer, f"step-{done:06d}", memory_log)
                    tracking.log_validation_videos(accelerator, output_dir / "validation" / f"step-{done:06d}", done,
                                                   plan.validation_prompts, spec.fps)
    finally:
        loader.close()

    weights = save_final_weights(accelerator, config, plan, transformer, torch_dtype(spec.weight_dtype))
    if config.checkpointing.every:
        checkpoint.save_checkpoint(accelerator, config, config.steps, losses, lr_scheduler.state_dict())
    if config.validation.final:
        validator.run(transformer, "final", memory_log)
        tracking.log_validation_videos(accelerator, output_dir / "validation" / "final", config.steps,
                                       plan.validation_prompts, spec.fps)
    memory_log.record("memory_after_testing")
    if accelerator.is_main_process:
        memory_log.write(output_dir / "memory.json")
        memory_log.print_table()
        write_loss_curve(losses, output_dir)
        summary = {"steps": config.steps, "final_loss": losses[-1] if losses else None, "losses": losses,
                   "learning_rates": learning_rates, "step_seconds": [round(t, 4) for t in step_seconds],
                   "weights": str(weights), "learned_positional_embeddings_dropped": plan.drop_learned_positions}
        atomic_write_text(output_dir / "training_summary.json", json.dumps(summary, indent=2) + "\n")
        card = write_model_card(config, plan)
        logs = tracking.logs_message(accelerator, config)
        if logs:
            report.info(logs)
    if config.report_to != "none":
        accelerator.end_training()
    accelerator.wait_for_everyone()
    if config.push_to_hub and accelerator.is_main_process:  # last: a failure leaves the run complete on disk
        hub.push_run(config, hub.files_to_push(config, card.shown))
    return TrainResult(output_dir, config.steps, losses, weights, memory_log.records)


def _agree_across_processes(accelerator: Any, loss: float, stop_requested: bool) -> tuple[float, bool]:
    """The step's loss averaged over the processes, and whether any of them was asked to stop (one collective)."""
    if accelerator.num_processes == 1:
        return loss, stop_requested
    tensor = torch.tensor([loss, float(stop_requested)], device=accelerator.device)
    summed = accelerator.reduce(tensor, reduction="sum")
    return float((summed[0] / accelerator.num_processes).item()), bool(summed[1].item() > 0)


def _memory_field(device: Any) -> dict[str, str]:
    if torch.device(device).type == "cuda":
        return {"mem": f"{torch.cuda.max_memory_reserved(device) / 1024**3:.1f}GiB"}
    return {}
