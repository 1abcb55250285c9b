"""Resumable checkpoints through accelerate, holding only what trains: saving, verifying, finding one.

A checkpoint is `OUT/checkpoints/step-NNNNNN/` (`RunFolder.checkpoint`): accelerate's state
(optimizer, RNG), the trainable weights (a diffusers LoRA file, or a `transformer/` folder for full
fine-tuning; never the frozen base), the run's `config.toml`, and `trainer_state.json` (step, losses
and the LR schedule's state), written last. The schedule's state is JSON rather than accelerate's
custom-object pickle, which accelerate loads with `weights_only=False`: resuming runs no code from
the checkpoint. Under FSDP and DeepSpeed, accelerate's state also holds the model's own shards
(`pytorch_model_fsdp_0/`, or DeepSpeed's folder), base weights included; resuming reads those
(`cogtune.train.reshard`, which also loads a checkpoint across strategies and process counts).
It is assembled under a temporary name and renamed, so a checkpoint folder is complete or absent.
`trainer_state.json` records the number of processes and the batch (per process x processes x
accumulation) too.

`trainer_state.json` also records every other file of the checkpoint with its size and SHA-256.
Resuming verifies them (and that the step is the folder's): a truncated, replaced or missing file is
named, and `--resume latest` falls back to the newest checkpoint that verifies, with a warning. A
checkpoint whose weights are not finite is never published. Pruning renames a checkpoint away
before deleting it, so a half-deleted one never counts as complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import os
from pathlib import Path
from typing import Any

import torch

from cogtune import report
from cogtune.config import CONFIG_FILENAME, config_to_dict, read_toml, write_config
from cogtune.errors import CogtuneError, ConfigError, StorageError, TrainingError
from cogtune.fsutil import (
    DISK_FULL_PREFIX,
    TEMP_PREFIX,
    atomic_write_text,
    disk_full_error,
    is_disk_full,
    newest_file,
    remove_tree,
    sha256_file,
    sweep_temporaries,
)
from cogtune.train.config import TrainConfig
from cogtune.train.run_folder import RunFolder

TRAINER_STATE = "trainer_state.json"


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """A run's checkpoint folders (`step-NNNNNN`), oldest first, complete or not (`verify_checkpoint` tells).

    Other entries (a user's `step-backup`, a file) are not checkpoints; `stray_entries` names them.
    Temporaries (`.tmp-*`: a save or a prune in progress or killed) never count.
    """
    root = RunFolder(output_dir).checkpoints
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _folder_step(p) is not None and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def stray_entries(output_dir: Path) -> list[Path]:
    """What a run's checkpoints folder holds besides checkpoints and temporaries."""
    root = RunFolder(output_dir).checkpoints
    found = set(checkpoint_dirs(output_dir))
    return sorted(p for p in root.iterdir() if p not in found and not p.name.startswith(TEMP_PREFIX)) \
        if root.is_dir() else []


def _folder_step(checkpoint: Path) -> int | None:
    """N of a folder named `step-N` (digits only), else None."""
    match = re.fullmatch(r"step-(\d+)", checkpoint.name)
    return int(match[1]) if match else None


def record_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under `folder` except the trainer state, by relative path."""
    records = {}
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            path = Path(root) / name
            relative = path.relative_to(folder).as_posix()
            if relative != TRAINER_STATE:
                records[relative] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return dict(sorted(records.items()))


def _state_digest(state: dict[str, Any]) -> str:
    """SHA-256 of a trainer state's content (its own digest left out), as `trainer_state.json` records it."""
    content = {key: value for key, value in state.items() if key != "digest"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def verify_checkpoint(checkpoint: Path) -> str | None:
    """None if `checkpoint` is what was written; otherwise why not, naming the file at fault.

    The bytes (each file's size and SHA-256, `trainer_state.json`'s own digest) and the contents: every
    tensor of its safetensors files finite, so that a checkpoint of NaN weights is never resumed nor
    called good (`load_lora_state` checks, as the weights load, that every LoRA tensor is there).
    """
    state_path = checkpoint / TRAINER_STATE
    if not state_path.is_file():
        return f"{state_path} is missing"
    try:
        read_trainer_state(checkpoint)
    except ConfigError as error:
        return error.message
    state = json.loads(state_path.read_text())
    if "digest" in state and state["digest"] != _state_digest(state):
        return f"{state_path} was changed after it was written (its digest differs)"
    problem = _bytes_problem(checkpoint, state_path, state)
    return problem or _values_problem(checkpoint)


def _values_problem(checkpoint: Path) -> str | None:
    """The first safetensors file of `checkpoint` holding NaN or infinity, named with its tensor; one tensor at a time."""
    from safetensors import safe_open

    for path in sorted(checkpoint.rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    tensor = handle.get_tensor(name)
                    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                        return f"{path} holds NaN or infinite values ({name})"
        except Exception as error:  # safetensors' own errors for a damaged file
            return f"{path} cannot be read ({(str(error).strip().splitlines() or [type(error).__name__])[0][:120]})"
    return None


def _bytes_problem(checkpoint: Path, state_path: Path, state: dict[str, Any]) -> str | None:
    """Whether each file recorded in `state` is there with the size and SHA-256 it was written with."""
    folder_step = _folder_step(checkpoint)
    step = int(state["step"])
    if folder_step is not None and step != folder_step:
        return f"{state_path} says step {step}, but it is in the checkpoint of step {folder_step}"
    files = state.get("files")
    if files is None:  # written before cogtune recorded its files: nothing to check them against
        return None
    if not isinstance(files, dict):
        return f"{state_path}: its file records are malformed"
    for relative, record in files.items():
        path = checkpoint / relative
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{path} is missing"
        try:
            if size != record["size"]:
                return f"{path} has {size} bytes, but {record['size']} were written (truncated or replaced)"
            if sha256_file(path) != record["sha256"]:
                return f"{path} is not the file that was written (its SHA-256 differs)"
        except (TypeError, KeyError):
            return f"{state_path}: the record of {relative} is malformed"
        except OSError as error:
            return f"{path} cannot be read ({error.strerror or error})"
    return None


def last_good_checkpoint(output_dir: Path, warn: bool = False) -> Path | None:
    """The newest checkpoint of a run that verifies (with `warn`, a warning for each newer one that does not)."""
    found = checkpoint_dirs(output_dir)
    for position, candidate in enumerate(reversed(found)):
        reason = verify_checkpoint(candidate)
        if reason is None:
            return candidate
        if warn:
            older = [p.name for p in found[: len(found) - position - 1]]
            fallback = f"trying {older[-1]}" if older else "no older checkpoint is left"
            report.warn(f"checkpoint {candidate.name} is damaged: {reason}; {fallback}", shared=True)
    return None


# The settings that make a checkpoint's weights mean something; resuming with others would mix runs.
RUN_IDENTITY = ("task", "model", "full", "lora.rank", "lora.alpha", "lora.target_modules")


def _identity(values: dict[str, Any]) -> dict[str, Any]:
    found = {}
    for dotted in RUN_IDENTITY:
        value: Any = values
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        found[dotted] = list(value) if isinstance(value, (list, tuple)) else value
    if found["full"]:
        for key in [k for k in found if k.startswith("lora.")]:
            del found[key]
    elif found["lora.alpha"] is None:
        found["lora.alpha"] = found["lora.rank"]
    return found


def check_same_run(config: TrainConfig, checkpoint: Path) -> None:
    """Refuse to resume a checkpoint that another run (another model, task or LoRA shape) wrote."""
    path = checkpoint / CONFIG_FILENAME
    if not path.is_file():
        return  # older checkpoints: their weights' shapes are still checked when they load
    theirs = _identity(read_toml(path))
    ours = _identity(config_to_dict(config))
    differences = [f"{key} {theirs[key]!r} there, {ours[key]!r} now" for key in ours
                   if key in theirs and theirs[key] != ours[key] and key != "model"]
    if ours.get("model") != theirs.get("model") and not _same_architecture(ours["model"], theirs["model"]):
        differences.insert(0, f"model {theirs['model']!r} there, {ours['model']!r} now")
    if differences:
        raise ConfigError(f"{checkpoint} belongs to another run ({'; '.join(differences)})",
                          hint="resume with the settings that run used, or train without --resume")


def _same_architecture(ours: Any, theirs: Any) -> bool:
    """Two model references that name the same transformer (a preset and its local copy, say)."""
    from cogtune.models.loading import resolve_model, transformer_architecture

    try:
        return (transformer_architecture(resolve_model(str(ours)).spec)
                == transformer_architecture(resolve_model(str(theirs)).spec))
    except CogtuneError:
        return False


def find_resume_checkpoint(config: TrainConfig) -> Path | None:
    """The checkpoint `--resume` names: 'latest' in the run's folder, or an explicit folder; verified.

    'latest' is the newest checkpoint that verifies; one that is named explicitly must verify. Whether
    this launch's strategy can load it is `cogtune.train.reshard.check_loadable_here`'s to say.
    """
    if config.resume is None:
        return None
    if config.resume == "latest":
        for stray in stray_entries(Path(config.output_dir)):
            report.warn(f"ignoring {stray}: not a checkpoint (cogtune names them step-NNNNNN)", shared=True)
        found = checkpoint_dirs(Path(config.output_dir))
        if not found:
            report.warn(f"--resume latest: no checkpoint in {config.output_dir}; starting from step 0", shared=True)
            return None
        good = last_good_checkpoint(Path(config.output_dir), warn=True)
        if good is None:
            raise TrainingError(f"no checkpoint in {RunFolder.of(config).checkpoints} can be resumed; "
                                f"the newest: {verify_checkpoint(found[-1])}",
                                hint="train without --resume into a new --output-dir to start over")
        if good != found[-1]:
            report.warn(f"resuming from {good}, the newest checkpoint that verifies", shared=True)
        check_same_run(config, good)
        return good
    path = Path(config.resume)
    if not (path / TRAINER_STATE).is_file():
        raise ConfigError(f"{path} is not a complete cogtune checkpoint (no {TRAINER_STATE})")
    reason = verify_checkpoint(path)
    if reason is not None:
        in_a_run = path.parent.name == RunFolder.checkpoints.name
        others = last_good_checkpoint(path.parent.parent) if in_a_run else None
        raise TrainingError(f"cannot resume from {path}: {reason}",
                            hint=f"resume from {others} instead" if others else "train without --resume to start over")
    check_same_run(config, path)
    return path


def read_trainer_state(checkpoint: Path) -> tuple[int, list[float], dict[str, Any]]:
    """(step, losses, LR schedule state) of a checkpoint."""
    path = checkpoint / TRAINER_STATE
    try:
        state = json.loads(path.read_text())
        return int(state["step"]), [float(v) for v in state["losses"]], dict(state["lr_scheduler"])
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{path}: not a trainer state this version of cogtune can resume ({error})") from error


def check_optimizer_steps(optimizer: Any, step: int, checkpoint: Path) -> None:
    """The optimizer state loaded from `checkpoint` has taken `step` steps, as its trainer state says.

    Adam-like optimizers count their steps per parameter; an optimizer that counts none is not checked.
    """
    counts = set()
    for state in optimizer.state_dict().get("state", {}).values():
        value = state.get("step") if isinstance(state, dict) else None
        if value is not None:
            counts.add(int(float(value.item() if hasattr(value, "item") else value)))
    if counts and counts != {step}:
        raise TrainingError(f"{checkpoint / TRAINER_STATE} says step {step}, but the optimizer state in {checkpoint} "
                            f"has taken {max(counts)} steps: the checkpoint's files do not belong together",
                            hint="resume from another checkpoint, or train without --resume")


@dataclasses.dataclass
class CheckpointHooks:
    """The run's accelerate hooks (`register_hooks`) and what the save hook found in the save in progress.

    `non_finite`: the names of trainable weights that were not finite (main process); `save_checkpoint`
    empties it before it saves and reads it after.
    """

    non_finite: list[str] = dataclasses.field(default_factory=list)


def register_hooks(accelerator: Any, config: TrainConfig, save_trainable: Any, load_trainable: Any) -> CheckpointHooks:
    """Make accelerate save/load only the trainable weights, through the given functions.

    `save_trainable(model, folder, state_dict)` runs on the main process with the weights gathered
    from every process. Under FSDP and DeepSpeed accelerate saves and loads the model's sharded
    state itself (frozen weights included) and hands the hooks no weights to replace; the
    trainable weights are still written in diffusers format beside it, and resuming reads the
    sharded state.
    """
    from cogtune.distributed import gather_state_dict

    hooks = CheckpointHooks()

    def save_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        for model in models:
            state = gather_state_dict(accelerator, model, trainable_only=not config.full)  # collective when sharded
            if accelerator.is_main_process:
                hooks.non_finite = _non_finite_names(accelerator.unwrap_model(model), state)
                save_trainable(accelerator.unwrap_model(model), Path(output_dir), state)
            if weights:
                weights.pop()

    def load_hook(models: list[Any], input_dir: str) -> None:
        while models:
            load_trainable(accelerator.unwrap_model(models.pop()), Path(input_dir))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    return hooks


def _non_finite_names(model: Any, state: dict[str, Any]) -> list[str]:
    """Names of the trainable weights in `state` holding NaN or infinity."""
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    bad = []
    for name, value in state.items():
        if (name in trainable or not trainable) and torch.is_tensor(value) and value.is_floating_point():
            if not bool(torch.isfinite(value).all()):
                bad.append(name)
    return bad


def _on_any_process(accelerator: Any, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return float(accelerator.reduce(tensor, reduction="sum").item()) > 0


def _plain(value: Any) -> Any:
    """JSON-ready: tensors (torchao optimizers keep `lr` as one, so the schedule's state holds them) as numbers."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def save_checkpoint(accelerator: Any, config: TrainConfig, step: int, losses: list[float],
                    lr_scheduler_state: dict[str, Any], hooks: CheckpointHooks) -> Path:
    """Write checkpoint `step` (all processes call this) and prune old ones beyond the retention limit.

    `hooks` are the run's (`register_hooks`): accelerate's `save_state` writes the weights through them.

    A full disk is a `StorageError` naming the file that was being written (the partial checkpoint
    is removed); weights that are not finite are a `TrainingError` naming the last good checkpoint.
    """
    final = RunFolder.of(config).checkpoint(step)
    root = final.parent
    staging = root / f".tmp-{final.name}"
    main = accelerator.is_main_process
    if main:
        sweep_temporaries(root)  # leftovers of killed saves and prunes (this run holds the folder's lock)
    accelerator.wait_for_everyone()
    hooks.non_finite = []
    try:
        accelerator.save_state(str(staging))
        # accelerate pickles each process's RNG states: cogtune seeds every micro-step's draws itself, so a
        # checkpoint carries no pickle it does not need (a resume would read one, with the weights-only unpickler).
        (staging / f"random_states_{accelerator.process_index}.pkl").unlink(missing_ok=True)
        accelerator.wait_for_everyone()
        non_finite = _on_any_process(accelerator, bool(hooks.non_finite))
        if main and not non_finite:
            write_config(config, staging)
            state = {"step": step, "losses": losses, "lr_scheduler": _plain(lr_scheduler_state),
                     "processes": accelerator.num_processes,
                     "global_batch": global_batch(config.batch_size, accelerator.num_processes,
                                                  config.gradient_accumulation),
                     "files": record_files(staging)}
            atomic_write_text(staging / TRAINER_STATE, json.dumps({**state, "digest": _state_digest(state)}) + "\n")
    except Exception as error:
        if not main:
            raise
        full = isinstance(error, StorageError) and error.message.startswith(DISK_FULL_PREFIX)
        if not full and (isinstance(error, CogtuneError) or not is_disk_full(error, staging)):
            raise
        # The file being written: the one an inner atomic write named, else the newest in the staging folder.
        said = Path(error.message.removeprefix(DISK_FULL_PREFIX)) if full else None
        written = said if said is not None and staging in said.parents else \
            newest_file(staging) if staging.is_dir() else None
        remove_tree(staging)  # gives back the space it took
        named = final / written.relative_to(staging) if written is not None else final
        raise disk_full_error(named) from error
    if non_finite:
        if main:
            remove_tree(staging)
        good = last_good_checkpoint(Path(config.output_dir))
        first = f" ({hooks.non_finite[0]})" if hooks.non_finite else ""
        where = f"; the last good checkpoint is {good}" if good else "; no good checkpoint was saved"
        raise TrainingError(f"the weights became non-finite (NaN or infinity) at step {step}{first}{where}",
                            hint="lower --lr or check the data; resume with --resume latest")
    if main:
        if final.exists():
            remove_tree(final)
        staging.rename(final)
        if config.checkpointing.keep:
            for old in checkpoint_dirs(Path(config.output_dir))[: -config.checkpointing.keep]:
                remove_tree(old)
    accelerator.wait_for_everyone()
    return final


def global_batch(batch_size: int, processes: int, accumulation: int) -> dict[str, int]:
    """A run's batch as trainer_state.json records it."""
    return {"per_process": batch_size, "processes": processes, "accumulation": accumulation}

