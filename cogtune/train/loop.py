"""The training recipe: `run_training(config)` assembles the building blocks and runs the loop.

Read top to bottom: plan (`cogtune.train.plan`: everything checked, no weights yet), size the run
(`cogtune.train.sizing`: advice only), set up accelerate, load the transformer and make it
trainable (`cogtune.train.model`), resume, then loop over optimizer steps, and finish: the final
weights and every other output (`cogtune.train.outputs`), each where the run folder
(`cogtune.train.run_folder`) says. A step's batch comes from a stateless schedule and its random
draws from per-sample generators (`cogtune.train.step`), so a resumed run repeats exactly what an
uninterrupted one would have done, and N processes with batch B draw what one process with batch
N x B draws.
"""

from __future__ import annotations

import dataclasses
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
from cogtune.fsutil import OutputLock
from cogtune.launch import is_main_launch_process
from cogtune.interrupt import StopRequest
from cogtune.lora.format import LAYOUT_FILE_NAMES, load_lora_state, save_lora
from cogtune.models.loading import save_transformer
from cogtune.train import checkpoint, hub, tracking
from cogtune.train.config import TrainConfig
from cogtune.train.data import BatchLoader, BatchSchedule, describe_items, step_items
from cogtune.train.evaluation import (EvaluationLog, Evaluator, print_evaluation_summary,
                                      timestep_range_losses)
from cogtune.train.full import load_full_transformer_into
from cogtune.train.heldout import HeldOut, plan_held_out, write_record
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
from cogtune.train.outputs import (
    flat_config,
    print_run_summary,
    save_best_weights,
    save_final_weights,
    write_loss_curve,
    write_training_summary,
)
from cogtune.train.plan import RunPlan, plan_run
from cogtune.train.reshard import check_loadable_here, load_state
from cogtune.train.run_folder import FINAL_PASS, RunFolder, check_run_folder, step_name, weights_in
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


@dataclasses.dataclass
class Training:
    """What the set-up assembles: the loop and the finish use it."""

    config: TrainConfig
    plan: RunPlan
    run: RunFolder
    accelerator: Any
    noise_scheduler: Any  # the diffusion scheduler the loss draws timesteps and noise from
    transformer: Any  # prepared by accelerate
    compute_dtype: Any
    optimizer: Any  # prepared by accelerate
    lr_scheduler: Any  # stepped once per optimizer step by the loop (not prepared: accelerate steps per process)
    trainable: list[Any]  # the trained parameters after `prepare` (FSDP replaces them with shards)
    tensor_learning_rates: Any  # learning rates an optimizer keeps as tensors (`keep_tensor_learning_rates`)
    hooks: checkpoint.CheckpointHooks
    load_trainable: Any  # `(model, folder)`: a run folder's or checkpoint's trainable weights into the model


@dataclasses.dataclass
class History:
    """What the loop records: every step's loss (a resumed run's earlier ones too), this session's rates and times."""

    losses: list[float]
    learning_rates: list[float] = dataclasses.field(default_factory=list)  # after the schedule's step
    step_seconds: list[float] = dataclasses.field(default_factory=list)
    timestep_losses: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # this session's samples
    evaluations: EvaluationLog | None = None  # the held-out loss and the LoRA's effect (`cogtune.train.evaluation`)


def run_training(config: TrainConfig) -> TrainResult:
    # One run per output folder: a second one is refused, naming the first. Only the launch's main
    # process locks; the run's other processes write into the folder by design.
    with OutputLock(config.output_dir, main=is_main_launch_process()):
        return _run_training(config)


def _run_training(config: TrainConfig) -> TrainResult:
    plan = plan_run(config)
    if is_main_launch_process():  # only the main one: the others may start after it has written config.toml
        check_run_folder(config)
    config = fit_memory(config, plan).resolved()
    resume_from = checkpoint.find_resume_checkpoint(config)
    if resume_from is not None:
        check_loadable_here(resume_from)  # a DeepSpeed checkpoint resumes under DeepSpeed, on as many processes
    held = plan_held_out(config, plan.model.spec, plan.cache, resuming=resume_from is not None)
    training = _set_up(config, plan)
    history = History(losses=[], evaluations=EvaluationLog(config))
    start_step = _resume(training, resume_from, history) if resume_from is not None else 0
    evaluator = _set_up_evaluation(training, held, history, start_step)
    if start_step > config.steps:
        raise ConfigError(f"the checkpoint is at step {start_step}; --steps {config.steps} leaves nothing to train",
                          hint="raise --steps to continue training")
    memory_log = MemoryLog(training.accelerator.device)
    memory_log.record("memory_before_training")
    validator = Validator(config, plan.model, plan.cache, training.accelerator, training.compute_dtype,
                          plan.validation_prompts)
    if start_step == config.steps:  # trained to the end, then stopped while finishing (killed, a full disk)
        report.info(f"training is done ({resume_from} is step {start_step} of {config.steps}); writing the "
                    "outputs the run's finish did not")
        return _finish(training, history, validator, evaluator, memory_log, completing=True)
    _train(training, start_step, history, validator, evaluator, memory_log)
    return _finish(training, history, validator, evaluator, memory_log)


# --- set-up ----------------------------------------------------------------------------------------


def _set_up(config: TrainConfig, plan: RunPlan) -> Training:
    """Accelerate, the validation prompts' embeddings, the trainable transformer, its optimizer and schedule."""
    from cogtune.quiet import quiet_libraries

    quiet_libraries()
    from diffusers.optimization import get_scheduler

    from cogtune.models.loading import load_scheduler

    run = RunFolder.of(config)
    accelerator, mixed_precision = _start_accelerate(config, plan, run)
    # The validation prompts' embeddings go into the run's folder now, so that T5 (for prompts the cache
    # lacks) is loaded and freed before the transformer: training's peak stays what it was.
    prepare_validation_embeds(config, plan.model, plan.cache, accelerator, plan.validation_prompts,
                              plan.prompts_to_embed)
    noise_scheduler = load_scheduler(plan.model)
    transformer, compute_dtype = load_trainable_transformer(config, plan, accelerator.device, mixed_precision,
                                                            distributed.fsdp_checkpoints_activations(accelerator))
    opt = config.optimizer
    optimizer = make_optimizer(opt.name, [p for p in transformer.parameters() if p.requires_grad],
                               lr=opt.effective_lr, betas=(opt.beta1, opt.beta2), eps=opt.eps,
                               weight_decay=opt.weight_decay, gradient_accumulation=config.gradient_accumulation)
    if not config.full and distributed.requested_strategy() in ("ddp", "single"):
        ignore_frozen_weights_in_ddp(transformer)
    lr_scheduler = get_scheduler(opt.lr_schedule, optimizer=optimizer, num_warmup_steps=opt.warmup_steps,
                                 num_training_steps=config.steps)
    distributed.configure_deepspeed(accelerator, config.batch_size, config.gradient_accumulation, opt.max_grad_norm)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    save_trainable, load_trainable = _trainable_weights_io(config, plan)
    hooks = checkpoint.register_hooks(accelerator, config, save_trainable, load_trainable)
    if config.report_to != "none":
        if accelerator.is_main_process:
            run.logs.mkdir(exist_ok=True)
        accelerator.init_trackers(tracking.PROJECT, config=flat_config(config),
                                  init_kwargs=tracking.tracker_init_kwargs(config))
    return Training(config, plan, run, accelerator, noise_scheduler, transformer, compute_dtype, optimizer,
                    lr_scheduler, trainable=[p for p in transformer.parameters() if p.requires_grad],
                    tensor_learning_rates=remember_tensor_learning_rates(optimizer), hooks=hooks,
                    load_trainable=load_trainable)


def _start_accelerate(config: TrainConfig, plan: RunPlan, run: RunFolder) -> tuple[Any, str]:
    """The accelerator (and its mixed precision); the run's folder with its `config.toml`; the run's summary."""
    mixed_precision = resolve_mixed_precision(config, plan.model.spec)
    accelerator = distributed.make_accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(run.root), logging_dir=str(run.logs)),
    )
    report.set_main_process(accelerator.is_main_process)
    if accelerator.is_main_process:
        run.root.mkdir(parents=True, exist_ok=True)
        write_config(config, run.root)  # `run.config_file`
    print_run_summary(config, plan, accelerator, mixed_precision)
    launched_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")  # what the launch's config file says
    if launched_precision not in ("no", mixed_precision):
        report.warn(f"the accelerate config says mixed precision {launched_precision}; cogtune trains with "
                    f"{mixed_precision} (--mixed-precision {config.mixed_precision})", shared=True)
    return accelerator, mixed_precision


def _trainable_weights_io(config: TrainConfig, plan: RunPlan) -> tuple[Any, Any]:
    """(save, load) of the trainable weights in a folder (a checkpoint's), as the run's final weights are."""
    info = lora_info(config, plan)

    def save_trainable(model: Any, folder: Path, state: dict[str, Any]) -> None:
        if config.full:
            save_transformer(model, weights_in(folder, full=True), torch.float32, plan.drop_learned_positions, state)
        else:
            save_lora(folder, model, info, state)  # writes `weights_in(folder, full=False)`

    def load_trainable(model: Any, folder: Path) -> None:
        if config.full:
            load_full_transformer_into(model, weights_in(folder, full=True))
        else:
            load_lora_state(model, weights_in(folder, full=False))

    return save_trainable, load_trainable


def _set_up_evaluation(training: Training, held: HeldOut, history: History, start_step: int) -> Evaluator:
    """Record the held-out items, read a resumed run's evaluations up to its step: the run's evaluator."""
    config, run = training.config, training.run
    if training.accelerator.is_main_process:
        write_record(config, held)
    if start_step:
        history.evaluations = EvaluationLog.read(config, run.evaluation, start_step)
    return Evaluator(config, training.plan.model.spec, held, training.noise_scheduler, training.accelerator,
                     training.compute_dtype)


def _resume(training: Training, resume_from: Path, history: History) -> int:
    """Load the checkpoint into the prepared model, optimizer and schedule; its losses into `history`. Its step."""
    config, accelerator = training.config, training.accelerator
    try:
        load_state(accelerator, config, resume_from, training.transformer, training.optimizer,
                   training.load_trainable)
    except ConfigError:
        raise
    except Exception as exc:  # verified, yet unreadable: name the checkpoint, not just the library's reason
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise TrainingError(f"cannot load the checkpoint {resume_from}: {reason}",
                            hint="resume from another checkpoint, or train without --resume") from exc
    start_step, history.losses, scheduler_state = checkpoint.read_trainer_state(resume_from)
    if distributed.requested_strategy() in ("single", "ddp") and accelerator.scaler is None:
        checkpoint.check_optimizer_steps(training.optimizer, start_step, resume_from)  # fp16 scaling skips steps
    training.lr_scheduler.load_state_dict(scheduler_state)
    report.info(f"resumed from {resume_from} at step {start_step}")
    return start_step


# --- the loop --------------------------------------------------------------------------------------


def _train(training: Training, start_step: int, history: History, validator: Validator, evaluator: Evaluator,
           memory_log: MemoryLog) -> None:
    """Optimizer steps from `start_step` on; after each, what its number asks for: a checkpoint, validation,
    an evaluation."""
    config, accelerator, cache = training.config, training.accelerator, training.plan.cache
    schedule = BatchSchedule.for_cache(cache, config.batch_size, accelerator.num_processes, config.seed,
                                       held_out=evaluator.held.excluded)
    loader = BatchLoader(cache, schedule, accelerator.process_index)
    empty_embeds = cache.empty_prompt_embeds()
    settings = StepSettings(caption_dropout=config.effective_caption_dropout,
                            image_dropout=config.image_dropout if training.plan.model.spec.is_i2v else 0.0)
    training.transformer.train()
    stop = StopRequest()
    try:
        with stop.listening(enabled=True, stopping="stopping after this step, with a checkpoint"), \
                report.progress("training", total=config.steps, unit="step", completed=start_step) as bar:
            for step in range(start_step, config.steps):
                started = time.perf_counter()
                step_loss, grad_norm = _optimizer_step(training, loader, step, settings, empty_embeds,
                                                       history.timestep_losses)
                lr = current_learning_rate(training.optimizer)
                # A stop asked of any process (a launcher forwards Ctrl-C to each) stops all of them after this step.
                step_loss, stopping = _agree_across_processes(accelerator, step_loss, stop.requested)
                if not math.isfinite(step_loss):
                    good = checkpoint.last_good_checkpoint(training.run.root)
                    where = f"; the last good checkpoint is {good}" if good else "; no good checkpoint was saved"
                    items = describe_items(cache, step_items(schedule, step, config.gradient_accumulation))
                    raise TrainingError(f"loss became {step_loss} at step {step + 1}{where}; the step's items: {items}",
                                        hint="lower --lr or check those items; resume with --resume latest")
                done = step + 1
                history.losses.append(step_loss)
                history.learning_rates.append(lr)
                history.step_seconds.append(time.perf_counter() - started)
                if config.report_to != "none":
                    accelerator.log(tracking.step_values(step_loss, lr, grad_norm, history.step_seconds[-1],
                                                         accelerator.device), step=done)
                bar.advance(1, loss=step_loss, lr=lr, **_memory_field(accelerator.device))  # the bar shows s/step
                if (stopping or _every(config.checkpointing.every, done)) and done < config.steps:
                    saved = checkpoint.save_checkpoint(accelerator, config, done, history.losses,
                                                       training.lr_scheduler.state_dict(), training.hooks)
                    if stopping:
                        command = resume_command(report.invocation, launched=accelerator.num_processes > 1)
                        raise stop.interrupted(f"interrupted at step {done} of {config.steps}; checkpoint saved: "
                                               f"{saved}", hint=f"resume with: {command}")
                if _every(config.validation.every, done) and done < config.steps:
                    _validate(training, validator, memory_log, step_name(done), done)
                if evaluator.due(done) and done < config.steps:
                    _evaluate(training, evaluator, history, done)
    finally:
        loader.close()


def _optimizer_step(training: Training, loader: BatchLoader, step: int, settings: StepSettings,
                    empty_embeds: Any, timestep_losses: list[tuple[int, float]]) -> tuple[float, Any]:
    """One optimizer step over `accumulation` micro-steps: its mean loss, and the gradients' norm before clipping."""
    config, accelerator, device = training.config, training.accelerator, training.accelerator.device
    transformer, optimizer = training.transformer, training.optimizer
    accumulation, process = config.gradient_accumulation, accelerator.process_index
    step_loss = 0.0
    for micro in range(accumulation):
        # Dropout inside the model draws from the global RNG: seed it per micro-step too.
        torch.manual_seed(derive_seed(config.seed, step, micro, process, "global"))
        batch = loader.get(step * accumulation + micro)
        generators = sample_generators(config.seed, step, micro, process * config.batch_size, len(batch["indices"]))
        # accumulate(): gradients synchronise on the last micro-step only (DeepSpeed steps there).
        with accelerator.accumulate(transformer):
            # Backward runs outside autocast, so that its cache of low-precision weight copies is
            # freed first (checkpointed blocks re-enter autocast when they recompute).
            with accelerator.autocast(), activations_offloaded(config.memory.offload_activations, device):
                loss = training_step(transformer, training.noise_scheduler, training.plan.model.spec, batch,
                                     empty_embeds, settings, generators, device, training.compute_dtype,
                                     per_sample=timestep_losses)
            accelerator.backward(loss)  # divided by the accumulation steps
        step_loss += loss.detach().float().item() / accumulation
    grad_norm = None  # the norm before clipping, for the tracker
    if config.optimizer.max_grad_norm > 0:
        grad_norm = clip_gradients(accelerator, optimizer, training.trainable, config.optimizer.max_grad_norm)
    optimizer.step()
    training.lr_scheduler.step()
    keep_tensor_learning_rates(optimizer, training.tensor_learning_rates)
    optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm


def _validate(training: Training, validator: Validator, memory_log: MemoryLog, name: str, step: int) -> None:
    """A validation pass into `RunFolder.validation(name)`, logged to the tracker at `step`."""
    validator.run(training.transformer, name, memory_log)
    plan = training.plan
    tracking.log_validation_videos(training.accelerator, training.run.validation(name), step, plan.validation_prompts,
                                   plan.model.spec.fps)


def _evaluate(training: Training, evaluator: Evaluator, history: History, step: int) -> None:
    """An evaluation after `step` (`cogtune.train.evaluation`): logged, recorded, and the best weights kept."""
    from cogtune.models.loading import torch_dtype

    config, accelerator, log = training.config, training.accelerator, history.evaluations
    since = max((record.step for record in log.records if record.step < step), default=0)
    recent = history.losses[since:step]
    record = evaluator.evaluate(training.transformer, step, sum(recent) / len(recent) if recent else None)
    best = log.add(record)
    if config.report_to != "none":
        accelerator.log(tracking.evaluation_values(record), step=step)
    if best and config.evaluation.keep_best:
        save_best_weights(accelerator, config, training.plan, training.transformer,
                          torch_dtype(training.plan.model.spec.weight_dtype), step)
    if accelerator.is_main_process:
        log.write(training.run.evaluation)


def _every(interval: int, step: int) -> bool:
    """Whether `step` is a multiple of a setting's interval (0: never)."""
    return bool(interval) and step % interval == 0


# --- the finish ------------------------------------------------------------------------------------


def _finish(training: Training, history: History, validator: Validator, evaluator: Evaluator,
            memory_log: MemoryLog, completing: bool = False) -> TrainResult:
    """The final weights, the last checkpoint and validation, then every other output; the upload last.

    `completing`: the run resumed from its last step's checkpoint, because its finish was cut short;
    only what is missing is written (the model card and the upload are redone), each named.
    """
    from cogtune.models.loading import torch_dtype

    config, accelerator, run = training.config, training.accelerator, training.run
    weights = run.weights(config.full)
    done = [weights, *(run.layout(name) for name in config.lora.save_formats if name in LAYOUT_FILE_NAMES)]
    # What a cut-short finish left out, in the order it is written now.
    missing = [path.name for path in done if completing and not path.exists()]
    missing_reports = [path.name for path in (run.memory, run.loss_curve, run.summary) if not path.exists()]
    if not completing or not all(path.exists() for path in done):
        dtype = torch_dtype(training.plan.model.spec.weight_dtype)  # the final weights': the model's own
        weights = save_final_weights(accelerator, config, training.plan, training.transformer, dtype)
    if config.checkpointing.every and not completing:
        checkpoint.save_checkpoint(accelerator, config, config.steps, history.losses,
                                   training.lr_scheduler.state_dict(), training.hooks)
    if evaluator.measures and not history.evaluations.made(config.steps):
        _evaluate(training, evaluator, history, config.steps)
    if config.validation.final and not (completing and validator.rendered(FINAL_PASS)):
        if completing:
            missing.append(f"{run.final_validation.relative_to(run.root)}/")
        _validate(training, validator, memory_log, FINAL_PASS, config.steps)
    memory_log.record("memory_after_testing")
    if accelerator.is_main_process:
        if not (completing and run.memory.exists()):
            memory_log.write(run.memory)
        memory_log.print_table()
        evaluations = history.evaluations.summary()
        ranges = timestep_range_losses(history.timestep_losses, training.noise_scheduler.config.num_train_timesteps)
        if not (completing and run.loss_curve.exists()):
            write_loss_curve(history.losses, run.loss_curve, history.evaluations.records)
        if not (completing and run.summary.exists()):
            write_training_summary(run.summary, config, training.plan, weights, history.losses,
                                   history.learning_rates, history.step_seconds,
                                   {"evaluation": evaluations, "training_loss_by_timesteps": ranges})
        print_evaluation_summary(evaluations, ranges)
        card = write_model_card(config, training.plan)
        if completing:
            written = [*missing, *missing_reports, run.model_card.name]
            report.success(f"run finished: wrote {', '.join(written)} in {run.root}")
        logs = tracking.logs_message(accelerator, config)
        if logs:
            report.info(logs)
    if config.report_to != "none":
        accelerator.end_training()
    accelerator.wait_for_everyone()
    if config.push_to_hub and accelerator.is_main_process:  # last: a failure leaves the run complete on disk
        hub.push_run(config, hub.files_to_push(config, card.shown))
    return TrainResult(run.root, config.steps, history.losses, weights, memory_log.records)


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
