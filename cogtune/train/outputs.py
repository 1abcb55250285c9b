"""What a run writes and prints besides its checkpoints: final weights, loss curve, summaries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cogtune import distributed, report
from cogtune.config import flatten_settings
from cogtune.fsutil import atomic_path, atomic_write_text
from cogtune.lora.format import save_lora
from cogtune.lora.layouts import save_layouts
from cogtune.models.loading import save_transformer
from cogtune.train.config import TrainConfig
from cogtune.train.model import lora_info
from cogtune.train.placement import memory_placement
from cogtune.train.plan import RunPlan
from cogtune.train.run_folder import RunFolder


def save_final_weights(accelerator: Any, config: TrainConfig, plan: RunPlan, transformer: Any, dtype: Any) -> Path:
    """OUT/pytorch_lora_weights.safetensors, or OUT/transformer/ in the model's dtype.

    Under FSDP and ZeRO the weights are gathered from every process first, so the files are the
    same plain diffusers files as a one-process run's (no `zero_to_fp32` step).
    """
    accelerator.wait_for_everyone()
    run = RunFolder.of(config)
    state = distributed.gather_state_dict(accelerator, transformer, trainable_only=not config.full)
    unwrapped = accelerator.unwrap_model(transformer)
    target = run.weights(config.full)
    if accelerator.is_main_process:
        if config.full:
            save_transformer(unwrapped, target, dtype, plan.drop_learned_positions, state)
        else:
            save_lora(run.root, unwrapped, lora_info(config, plan), state)  # writes `run.lora_weights`
        report.success(f"weights saved: {target}")
        if not config.full:
            for path in save_layouts(target, config.lora.save_formats):  # `--save-format comfyui,kohya`
                report.success(f"weights saved: {path}")
    accelerator.wait_for_everyone()
    return target


def save_best_weights(accelerator: Any, config: TrainConfig, plan: RunPlan, transformer: Any, dtype: Any,
                      step: int) -> Path:
    """`--keep-best`: the trainable weights of the lowest held-out loss so far into `RunFolder.best`, held as a
    checkpoint holds them (a LoRA file, or `transformer/`), with the run's config; all processes call this."""
    from cogtune.config import write_config
    from cogtune.fsutil import remove_tree

    accelerator.wait_for_everyone()
    run = RunFolder.of(config)
    state = distributed.gather_state_dict(accelerator, transformer, trainable_only=not config.full)
    unwrapped = accelerator.unwrap_model(transformer)
    best = run.best
    if accelerator.is_main_process:
        if best.exists():
            remove_tree(best)
        best.mkdir(parents=True)
        if config.full:
            save_transformer(unwrapped, RunFolder(best).weights(full=True), dtype, plan.drop_learned_positions, state)
        else:
            save_lora(best, unwrapped, lora_info(config, plan), state)
        write_config(config, best)
        atomic_write_text(best / "best.json", json.dumps({"step": step}) + "\n")
        report.info(f"lowest held-out loss so far (step {step}): weights kept in {best}")
    accelerator.wait_for_everyone()
    return best


def write_training_summary(path: Path, config: TrainConfig, plan: RunPlan, weights: Path, losses: list[float],
                           learning_rates: list[float], step_seconds: list[float],
                           extra: dict[str, Any] | None = None) -> None:
    """`training_summary.json`: the session's losses, learning rates and step times, and where the weights are;
    `extra`: more sections (the evaluations' summary, the training loss by timestep range)."""
    summary = {"steps": config.steps, "final_loss": losses[-1] if losses else None, "losses": losses,
               "learning_rates": learning_rates, "step_seconds": [round(t, 4) for t in step_seconds],
               "weights": str(weights), "learned_positional_embeddings_dropped": plan.drop_learned_positions,
               **(extra or {})}
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")


def write_loss_curve(losses: list[float], path: Path, evaluations: list[Any] = ()) -> None:
    """loss.png: the training loss and its running mean; with `evaluations` (`cogtune.train.evaluation`), the
    held-out loss beside them and the LoRA's measured effect in a panel below."""
    if not losses:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    effects = [(record.step, record.effect) for record in evaluations if record.effect is not None]
    if effects:
        figure, (axis, effect_axis) = plt.subplots(2, 1, figsize=(7, 5.5), dpi=120, sharex=True,
                                                   gridspec_kw={"height_ratios": [2, 1]})
        _plot_effect(effect_axis, effects)
    else:
        figure, axis = plt.subplots(figsize=(7, 3.5), dpi=120)
    steps = range(1, len(losses) + 1)
    axis.plot(steps, losses, linewidth=1, alpha=0.5, label="loss")
    window = max(1, len(losses) // 20)
    if window > 1:
        smoothed = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                    for i in range(len(losses))]
        axis.plot(steps, smoothed, linewidth=2, label=f"mean of {window}")
    held_out = [(record.step, record.loss) for record in evaluations if record.loss is not None]
    if held_out:
        axis.plot(*zip(*held_out), marker="o", linewidth=1.5, label="held-out loss")
    base = [(record.step, record.base_loss) for record in evaluations if record.base_loss is not None]
    if base:
        axis.plot(*zip(*base), linestyle="--", color="gray", linewidth=1, label="held-out loss, LoRA off")
    positive = [value for value in losses if value > 0]
    if positive and max(positive) / min(positive) > 20:  # a log axis only when the loss spans decades
        axis.set_yscale("log")
    (effect_axis if effects else axis).set_xlabel("step")
    axis.set_ylabel("loss")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)


def _plot_effect(axis: Any, effects: list[tuple[int, float]]) -> None:
    axis.plot(*zip(*effects), marker="o", linewidth=1.5, color="tab:green")
    axis.set_ylabel("LoRA effect")
    axis.set_title("||LoRA - base|| / ||base|| of the held-out predictions", fontsize=8)
    axis.grid(alpha=0.3)


def flat_config(config: TrainConfig) -> dict[str, Any]:
    """The settings as a tracker records them: dotted names, scalar values (others as text)."""
    return {name: value if isinstance(value, (int, float, str, bool)) else str(value)
            for name, value in flatten_settings(config).items() if value is not None}


def print_run_summary(config: TrainConfig, plan: RunPlan, accelerator: Any, mixed_precision: str) -> None:
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
    if config.report_to != "none":
        rows.append(("tracker", f"{config.report_to}, logs in {RunFolder.of(config).logs}"))
    if config.push_to_hub:
        rows.append(("push to", f"{config.push_to_hub}{' (private)' if config.hub_private else ''} at the end"))
    if plan.drop_learned_positions:
        rows.append(("positions", "learned positional embeddings dropped (rotary only)"))
    placement = memory_placement(config, distributed.fsdp_checkpoints_activations(accelerator))
    library = f" ({config.memory.nf4_backend})" if placement.frozen_weights_quantized == "nf4" else ""
    options = [name for name, on in (("gradient checkpointing", placement.checkpoint_blocks),
                                     ("fp8 weights", placement.frozen_weights_in_float8),
                                     (f"{placement.frozen_weights_quantized} base weights{library}",
                                      placement.frozen_weights_quantized is not None),
                                     ("offloaded blocks", placement.frozen_weights_on_host),
                                     ("offloaded activations", placement.saved_activations_on_host),
                                     ("compiled blocks", placement.compiled_blocks)) if on]
    rows.append(("memory", ", ".join(options) or "none"))
    report.key_values("training run", rows, to_stderr=True)
