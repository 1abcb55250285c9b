"""Resumable checkpoints through accelerate, holding only what trains.

A checkpoint is `OUT/checkpoints/step-NNNNNN/`: accelerate's state (optimizer, RNG), the trainable
weights (a diffusers LoRA file, or a `transformer/` folder for full fine-tuning; never the frozen
base), the run's `config.toml`, and `trainer_state.json` (step, losses and the LR schedule's state),
written last. The schedule's state is JSON rather than accelerate's custom-object pickle, which
accelerate loads with `weights_only=False`: resuming runs no code from the checkpoint.
Under FSDP and DeepSpeed, accelerate's state also holds the model's own shards (`pytorch_model_fsdp_0/`,
or DeepSpeed's folder), base weights included; resuming reads those.
It is assembled under a temporary name and renamed, so a checkpoint folder is complete or absent.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from cogtune import report
from cogtune.config import write_config
from cogtune.errors import ConfigError
from cogtune.fsutil import atomic_write_text
from cogtune.train.config import TrainConfig

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = output_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_resume_checkpoint(config: TrainConfig) -> Path | None:
    """The checkpoint `--resume` names: 'latest' in the run's folder, or an explicit folder."""
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


def read_trainer_state(checkpoint: Path) -> tuple[int, list[float], dict[str, Any]]:
    """(step, losses, LR schedule state) of a checkpoint."""
    path = checkpoint / TRAINER_STATE
    try:
        state = json.loads(path.read_text())
        return int(state["step"]), [float(v) for v in state["losses"]], dict(state["lr_scheduler"])
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{path}: not a trainer state this version of cogtune can resume ({error})") from None


def register_hooks(accelerator: Any, config: TrainConfig, save_trainable: Any, load_trainable: Any) -> None:
    """Make accelerate save/load only the trainable weights, through the given functions.

    `save_trainable(model, folder, state_dict)` runs on the main process with the weights gathered
    from every process. Under FSDP and DeepSpeed accelerate saves and loads the model's sharded
    state itself (frozen weights included) and hands the hooks no weights to replace; the
    trainable weights are still written in diffusers format beside it, and resuming reads the
    sharded state.
    """
    from cogtune.distributed import gather_state_dict

    def save_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        for model in models:
            state = gather_state_dict(accelerator, model, trainable_only=not config.full)  # collective when sharded
            if accelerator.is_main_process:
                save_trainable(accelerator.unwrap_model(model), Path(output_dir), state)
            if weights:
                weights.pop()

    def load_hook(models: list[Any], input_dir: str) -> None:
        while models:
            load_trainable(accelerator.unwrap_model(models.pop()), Path(input_dir))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator: Any, config: TrainConfig, step: int, losses: list[float],
                    lr_scheduler_state: dict[str, Any]) -> Path:
    """Write checkpoint `step` (all processes call this) and prune old ones beyond the retention limit."""
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
        state = {"step": step, "losses": losses, "lr_scheduler": lr_scheduler_state}
        atomic_write_text(staging / TRAINER_STATE, json.dumps(state) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        if config.checkpointing.keep:
            for old in checkpoint_dirs(Path(config.output_dir))[: -config.checkpointing.keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
