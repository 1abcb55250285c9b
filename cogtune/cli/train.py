"""`cogtune train t2v` and `cogtune train i2v`: one engine, one set of options, two tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from cogtune.cli.common import as_tuple, examples
from cogtune.cli.options import ConfigFileOpt, OptionalModelOpt, RandomWeightsOpt, SeedOpt, number

app = typer.Typer(help="Train a LoRA or a full fine-tune on a latent cache.", no_args_is_help=True)

_TASK_HELP = {
    "t2v": "Text-to-video: train on a cache from `cogtune encode`.",
    "i2v": "Image-to-video: train an I2V model on a cache with condition-image latents.",
}
_EXAMPLES = {
    "t2v": examples(
        "cogtune train t2v --model cogvideox-5b --data cache/disney --output-dir runs/disney --rank 64 --steps 2000 "
        "--validation-prompt 'A panda playing a guitar' --validation-every 500",
        "cogtune train t2v --model tiny --data demo/cache --output-dir demo/run --steps 20",
        "torchrun --nproc_per_node 2 -m cogtune train t2v --config run.toml",
    ),
    "i2v": examples(
        "cogtune train i2v --model cogvideox-5b-i2v --data cache/disney-i2v --output-dir runs/i2v --rank 64",
        "cogtune train i2v --model tiny-i2v --data demo/cache-i2v --output-dir demo/run-i2v --steps 20",
    ),
}


def _make_command(task: Literal["t2v", "i2v"]):
    def command(
        model: OptionalModelOpt = None,
        data: Annotated[Optional[Path], typer.Option("--data", "-d", help="Latent cache from `cogtune encode`.")] = None,
        output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Run output folder.")] = None,
        config_file: ConfigFileOpt = None,
        rank: Annotated[Optional[int], typer.Option("--rank", "-r", help="LoRA rank. [default: 64]", min=1)] = None,
        lora_alpha: Annotated[Optional[float], typer.Option("--lora-alpha", help="LoRA alpha. [default: the rank]",
                                                                 callback=number(low=0, low_open=True))] = None,
        full: Annotated[bool, typer.Option("--full", help="Full fine-tuning instead of LoRA.")] = False,
        steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps. [default: 1000]", min=1)] = None,
        batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Clips per process. [default: 1]", min=1)] = None,
        gradient_accumulation: Annotated[
            Optional[int], typer.Option("--gradient-accumulation", help="Micro-steps per step. [default: 1]", min=1)
        ] = None,
        lr: Annotated[Optional[float], typer.Option("--lr", help="Learning rate. [default: 1e-4]",
                                                        callback=number(low=0, low_open=True))] = None,
        optimizer: Annotated[
            Optional[str],
            typer.Option("--optimizer", help="adamw, adam, adamw-8bit, adamw-8bit-paged, adamw-8bit-ao, adamw-4bit-ao, "
                                             "adamw-cpu-offload or prodigy. [default: adamw]"),
        ] = None,
        lr_schedule: Annotated[
            Optional[str], typer.Option("--lr-schedule", help="constant, constant_with_warmup, linear, cosine, ...")
        ] = None,
        warmup_steps: Annotated[Optional[int], typer.Option("--warmup-steps", help="Warm-up steps. [default: 0]")] = None,
        max_grad_norm: Annotated[Optional[float], typer.Option("--max-grad-norm", help="Gradient clipping; 0 off.",
                                                                   callback=number(low=0))] = None,
        mixed_precision: Annotated[
            Optional[str], typer.Option("--mixed-precision", help="auto, no, fp16 or bf16. [default: auto]")
        ] = None,
        gradient_checkpointing: Annotated[
            Optional[bool],
            typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations. [default: on]"),
        ] = None,
        caption_dropout: Annotated[
            Optional[float], typer.Option("--caption-dropout", help="Empty-caption probability. [default: 0, i2v 0.05]",
                                     callback=number(low=0, high=1))
        ] = None,
        image_dropout: Annotated[
            Optional[float], typer.Option("--image-dropout", help="I2V: probability of dropping the image. [default: 0.05]",
                                     callback=number(low=0, high=1))
        ] = None,
        learned_positional_embeddings: Annotated[
            Optional[str],
            typer.Option("--learned-positional-embeddings",
                         help="5b-I2V: auto, keep or drop (drop trains other resolutions). [default: auto]"),
        ] = None,
        checkpoint_every: Annotated[
            Optional[int], typer.Option("--checkpoint-every", help="Resumable checkpoint every N steps.", min=0)
        ] = None,
        keep_checkpoints: Annotated[
            Optional[int], typer.Option("--keep-checkpoints", help="Keep the newest N checkpoints. [default: 3]", min=0)
        ] = None,
        resume: Annotated[Optional[str], typer.Option("--resume", help="'latest' or a checkpoint folder.")] = None,
        seed: SeedOpt = None,
        validation_prompt: Annotated[
            Optional[list[str]], typer.Option("--validation-prompt", help="Validation prompt (repeatable).")
        ] = None,
        validation_image: Annotated[
            Optional[list[str]], typer.Option("--validation-image", help="I2V: condition image per prompt (repeatable).")
        ] = None,
        validation_every: Annotated[
            Optional[int], typer.Option("--validation-every", help="Validate every N steps (0: only at the end).", min=0)
        ] = None,
        validation_steps: Annotated[
            Optional[int], typer.Option("--validation-steps", help="Denoising steps of validation videos.", min=1)
        ] = None,
        report_to: Annotated[Optional[str], typer.Option("--report-to", help="none, tensorboard or wandb.")] = None,
        fp8: Annotated[
            Optional[bool], typer.Option("--fp8", help="LoRA: frozen weights stored in float8, computed in bf16.")
        ] = None,
        offload_blocks: Annotated[
            Optional[bool], typer.Option("--offload-blocks", help="LoRA: frozen weights in CPU memory, streamed in.")
        ] = None,
        offload_activations: Annotated[
            Optional[bool], typer.Option("--offload-activations", help="Saved activations in pinned CPU memory.")
        ] = None,
        memory_profile: Annotated[
            Optional[str],
            typer.Option("--memory-profile", help="12gb, 16gb, 24gb, 48gb, 80gb or auto: the fastest options that fit "
                                                  "(estimated). [default: none]"),
        ] = None,
        compile_blocks: Annotated[
            Optional[bool], typer.Option("--compile", help="torch.compile each transformer block.")
        ] = None,
        random_weights: RandomWeightsOpt = False,
    ) -> None:
        from cogtune.config import load_config
        from cogtune.train import TrainConfig, run_training

        overrides = {
            "task": task,
            "model": model,
            "data": str(data) if data is not None else None,
            "output_dir": str(output_dir) if output_dir is not None else None,
            "random_weights": random_weights or None,
            "full": full or None,
            "steps": steps,
            "batch_size": batch_size,
            "gradient_accumulation": gradient_accumulation,
            "mixed_precision": mixed_precision,
            "gradient_checkpointing": gradient_checkpointing,
            "seed": seed,
            "caption_dropout": caption_dropout,
            "image_dropout": image_dropout,
            "learned_positional_embeddings": learned_positional_embeddings,
            "resume": resume,
            "report_to": report_to,
            "lora.rank": rank,
            "lora.alpha": lora_alpha,
            "optimizer.name": optimizer,
            "optimizer.lr": lr,
            "optimizer.lr_schedule": lr_schedule,
            "optimizer.warmup_steps": warmup_steps,
            "optimizer.max_grad_norm": max_grad_norm,
            "validation.prompts": as_tuple(validation_prompt),
            "validation.images": as_tuple(validation_image),
            "validation.every": validation_every,
            "validation.steps": validation_steps,
            "memory.fp8_weights": fp8,
            "memory.offload_blocks": offload_blocks,
            "memory.offload_activations": offload_activations,
            "memory.compile": compile_blocks,
            "memory.profile": memory_profile,
            "checkpointing.every": checkpoint_every,
            "checkpointing.keep": keep_checkpoints,
        }
        config = load_config(TrainConfig, config_file, overrides)
        run_training(config)

    command.__doc__ = _TASK_HELP[task]
    command.__name__ = f"train_{task}"
    return command


app.command("t2v", epilog=_EXAMPLES["t2v"])(_make_command("t2v"))
app.command("i2v", epilog=_EXAMPLES["i2v"])(_make_command("i2v"))
