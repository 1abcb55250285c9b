"""Resumable checkpoints through accelerate, holding only what trains.

A checkpoint is `OUT/checkpoints/step-NNNNNN/`: accelerate's state (optimizer, RNG), the trainable
weights (a diffusers LoRA file, or a `transformer/` folder for full fine-tuning; never the frozen
base), the run's `config.toml`, and `trainer_state.json` (step, losses and the LR schedule's state),
written last. The schedule's state is JSON rather than accelerate's custom-object pickle, which
accelerate loads with `weights_only=False`: resuming runs no code from the checkpoint.
Under FSDP and DeepSpeed, accelerate's state also holds the model's own shards (`pytorch_model_fsdp_0/`,
or DeepSpeed's folder), base weights included; resuming reads those.
It is assembled under a temporary name and renamed, so a checkpoint folder is complete or absent.
`trainer_state.json` records the number of processes and the batch (per process x processes x
accumulation) too: a checkpoint resumes on another number of processes (`load_state`), exactly when
the batch per micro-step across processes and the accumulation are unchanged; a DeepSpeed checkpoint
resumes under DeepSpeed on as many processes only, which is checked before any weight loads
(`check_loadable_here`).

`trainer_state.json` also records every other file of the checkpoint with its size and SHA-256.
Resuming verifies them (and that the step is the folder's): a truncated, replaced or missing file is
named, and `--resume latest` falls back to the newest checkpoint that verifies, with a warning. A
checkpoint whose weights are not finite is never published. Pruning renames a checkpoint away
before deleting it, so a half-deleted one never counts as complete.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType

from cogtune import report
from cogtune.config import CONFIG_FILENAME, config_to_dict, read_toml, write_config
from cogtune.errors import CogtuneError, ConfigError, StorageError, TrainingError
from cogtune.fsutil import (
    atomic_write_text,
    disk_full_error,
    is_disk_full,
    newest_file,
    remove_tree,
    sha256_file,
    sweep_temporaries,
)
from cogtune.train.config import TrainConfig
from cogtune.train.full import TRANSFORMER_DIR
from cogtune.lora.format import LAYOUT_FILE_NAMES, LORA_WEIGHTS_NAME

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = output_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _folder_step(checkpoint: Path) -> int | None:
    try:
        return int(checkpoint.name.split("-")[1])
    except (IndexError, ValueError):
        return None


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


def verify_checkpoint(checkpoint: Path) -> str | None:
    """None if `checkpoint` is what was written; otherwise why not, naming the file at fault."""
    state_path = checkpoint / TRAINER_STATE
    if not state_path.is_file():
        return f"{state_path} is missing"
    try:
        step, _, _ = read_trainer_state(checkpoint)
    except ConfigError as error:
        return error.message
    state = json.loads(state_path.read_text())
    folder_step = _folder_step(checkpoint)
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


# What a finished or interrupted run leaves in its output folder (the markers), and all it writes there.
RUN_MARKERS = (CONFIG_FILENAME, CHECKPOINTS_DIR, LORA_WEIGHTS_NAME, TRANSFORMER_DIR, "training_summary.json")
MODEL_CARD_GIF = "model_card.gif"  # the validation video the card shows
RUN_OUTPUTS = (*RUN_MARKERS, *LAYOUT_FILE_NAMES.values(), "memory.json", "loss.png", "validation", "logs",
               "validation_prompts.safetensors", MODEL_CARD_GIF)
MODEL_CARD_NAME = "README.md"  # the run's model card (train/model_card.py); a README of the user's is never replaced
# The settings that make a checkpoint's weights mean something; resuming with others would mix runs.
RUN_IDENTITY = ("task", "model", "full", "lora.rank", "lora.alpha", "lora.target_modules")


def is_model_card(path: Path) -> bool:
    """Whether `path` is a model card cogtune wrote: YAML front matter whose tags include `cogtune`."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")[:8192]
    except OSError:
        return False
    parts = text.split("---", 2)
    return text.startswith("---") and len(parts) == 3 and any(
        line.strip() == "- cogtune" for line in parts[1].splitlines())


def check_new_run_folder(config: TrainConfig) -> None:
    """A run without `--resume` never writes into a folder that holds another run's outputs, unless
    `--overwrite` says to start over: then the old run's outputs (and only those) are deleted first."""
    output_dir = Path(config.output_dir)
    card = output_dir / MODEL_CARD_NAME
    if card.exists() and not is_model_card(card):
        raise ConfigError(f"{card} is not a model card cogtune wrote, and the run writes its model card there; "
                          "refusing to replace it", hint="move that file, or train into another --output-dir")
    if config.resume is not None or not output_dir.is_dir():
        return
    found = [name for name in RUN_MARKERS if (output_dir / name).exists()]
    if not found:
        return
    if not config.overwrite:
        raise ConfigError(f"{output_dir} already holds a training run ({', '.join(found)}); refusing to write over it",
                          hint="continue it with --resume latest, start over with --overwrite, or train into a new "
                               "--output-dir")
    for name in RUN_OUTPUTS:
        path = output_dir / name
        if path.is_dir() and not path.is_symlink():
            remove_tree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    if card.exists():
        card.unlink()  # a cogtune card: checked above
    report.warn(f"--overwrite: deleted the previous run's outputs in {output_dir} ({', '.join(found)}, ...)")


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

    'latest' is the newest checkpoint that verifies; one that is named explicitly must verify.
    """
    if config.resume is None:
        return None
    if config.resume == "latest":
        found = checkpoint_dirs(Path(config.output_dir))
        if not found:
            report.warn(f"--resume latest: no checkpoint in {config.output_dir}; starting from step 0", shared=True)
            return None
        good = last_good_checkpoint(Path(config.output_dir), warn=True)
        if good is None:
            raise TrainingError(f"no checkpoint in {Path(config.output_dir) / CHECKPOINTS_DIR} can be resumed; "
                                f"the newest: {verify_checkpoint(found[-1])}",
                                hint="train without --resume into a new --output-dir to start over")
        if good != found[-1]:
            report.warn(f"resuming from {good}, the newest checkpoint that verifies", shared=True)
        check_same_run(config, good)
        check_loadable_here(good)
        return good
    path = Path(config.resume)
    if not (path / TRAINER_STATE).is_file():
        raise ConfigError(f"{path} is not a complete cogtune checkpoint (no {TRAINER_STATE})")
    reason = verify_checkpoint(path)
    if reason is not None:
        others = last_good_checkpoint(path.parent.parent) if path.parent.name == CHECKPOINTS_DIR else None
        raise TrainingError(f"cannot resume from {path}: {reason}",
                            hint=f"resume from {others} instead" if others else "train without --resume to start over")
    check_same_run(config, path)
    check_loadable_here(path)
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
                _NON_FINITE[:] = _non_finite_names(accelerator.unwrap_model(model), state)
                save_trainable(accelerator.unwrap_model(model), Path(output_dir), state)
            if weights:
                weights.pop()

    def load_hook(models: list[Any], input_dir: str) -> None:
        while models:
            load_trainable(accelerator.unwrap_model(models.pop()), Path(input_dir))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


_NON_FINITE: list[str] = []  # trainable weights that were not finite at the last save (main process)


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
                    lr_scheduler_state: dict[str, Any]) -> Path:
    """Write checkpoint `step` (all processes call this) and prune old ones beyond the retention limit.

    A full disk is a `StorageError` naming the file that was being written (the partial checkpoint
    is removed); weights that are not finite are a `TrainingError` naming the last good checkpoint.
    """
    root = Path(config.output_dir) / CHECKPOINTS_DIR
    final = root / f"step-{step:06d}"
    staging = root / f".tmp-step-{step:06d}"
    main = accelerator.is_main_process
    if main:
        sweep_temporaries(root)  # leftovers of killed saves and prunes (this run holds the folder's lock)
    accelerator.wait_for_everyone()
    _NON_FINITE.clear()
    try:
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()
        non_finite = _on_any_process(accelerator, bool(_NON_FINITE))
        if main and not non_finite:
            write_config(config, staging)
            state = {"step": step, "losses": losses, "lr_scheduler": _plain(lr_scheduler_state),
                     "processes": accelerator.num_processes,
                     "global_batch": global_batch(config.batch_size, accelerator.num_processes,
                                                  config.gradient_accumulation),
                     "files": record_files(staging)}
            atomic_write_text(staging / TRAINER_STATE, json.dumps(state) + "\n")
    except Exception as error:
        if not main:
            raise
        full = isinstance(error, StorageError) and error.message.startswith("no space left")
        if not full and (isinstance(error, CogtuneError) or not is_disk_full(error, staging)):
            raise
        written = newest_file(staging) if staging.is_dir() else None
        remove_tree(staging)  # gives back the space it took
        named = final / written.relative_to(staging) if written is not None else final
        raise disk_full_error(named) from error
    if non_finite:
        if main:
            remove_tree(staging)
        good = last_good_checkpoint(Path(config.output_dir))
        first = f" ({_NON_FINITE[0]})" if _NON_FINITE else ""
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


FSDP_OPTIMIZER_DIR = "optimizer_0"  # accelerate's torch.distributed.checkpoint folder of an FSDP optimizer
DEEPSPEED_DIR = "pytorch_model"  # accelerate's folder of DeepSpeed's own checkpoint (one ZeRO partition per process)


def check_loadable_here(checkpoint: Path) -> None:
    """Refuse, before any weight loads, a checkpoint that this launch's strategy cannot load.

    DeepSpeed's checkpoint holds the ZeRO optimizer state as one partition per process, and DeepSpeed
    loads it on as many processes only ("automatic adjustment of ZeRO's optimizer state partitioning
    with a new world size is not currently supported"), and only under DeepSpeed; nor does it load a
    checkpoint it did not write. Other strategies resume across process counts (`load_state`).
    """
    from cogtune.distributed import launched_processes, requested_strategy

    deepspeed_then = (checkpoint / DEEPSPEED_DIR).is_dir()
    deepspeed_now = requested_strategy() == "deepspeed"
    if not (deepspeed_then or deepspeed_now):
        return
    written = json.loads((checkpoint / TRAINER_STATE).read_text()).get("processes")
    if written is None and deepspeed_then:  # written before cogtune recorded it: count DeepSpeed's partitions
        written = len(list((checkpoint / DEEPSPEED_DIR).glob("zero_pp_rank_*_optim_states.pt"))) or None
    now = launched_processes()
    if deepspeed_then and deepspeed_now and written in (None, now):
        return
    if deepspeed_then:
        count = report.plural(written, "process", "processes") if written else "another number of processes"
        here = (f"DeepSpeed on {report.plural(now, 'process', 'processes')}" if deepspeed_now
                else f"{requested_strategy().upper() if now > 1 else 'one process'} without DeepSpeed")
        raise ConfigError(f"{checkpoint} holds DeepSpeed's ZeRO state split over {count}, which only DeepSpeed on "
                          f"{count} can resume; this launch is {here}",
                          hint=f"resume it with a DeepSpeed launch of {count}, or train without --resume", shared=True)
    raise ConfigError(f"{checkpoint} was written without DeepSpeed, and DeepSpeed resumes only its own checkpoints",
                      hint="resume it without DeepSpeed (one process, DDP or FSDP), or train without --resume",
                      shared=True)


def load_state(accelerator: Any, config: TrainConfig, checkpoint: Path, model: Any, optimizer: Any,
               load_trainable: Any) -> None:
    """Load `checkpoint` into the prepared model and optimizer, whatever number of processes wrote it.

    The same layout (FSDP then and now, or neither) is accelerate's `load_state`: under FSDP that is
    torch.distributed.checkpoint, which reshards N processes' shards onto M. An FSDP checkpoint
    resumed without FSDP (one process, DDP) reads the trainable weights from their diffusers files
    and the optimizer's shards through torch.distributed.checkpoint. A plain checkpoint (one process,
    DDP) resumed under FSDP: see `_load_whole_into_fsdp`.
    """
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    _warn_about_batch(config, accelerator.num_processes, state, checkpoint)
    sharded_then = (checkpoint / FSDP_OPTIMIZER_DIR).is_dir()
    sharded_now = accelerator.distributed_type == DistributedType.FSDP
    if sharded_then == sharded_now:
        accelerator.load_state(str(checkpoint))
        return
    if sharded_now:
        _load_whole_into_fsdp(accelerator, config, checkpoint, model, optimizer)
        return
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp  # 1.5 s to import; only FSDP checkpoints need it
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    load_trainable(accelerator.unwrap_model(model), checkpoint)
    optimizer_state = {"optimizer": get_optimizer_state_dict(model, optimizer)}  # the keys to read
    # Every DDP process reads the whole optimizer; one process reads it without a process group.
    with warnings.catch_warnings():  # DCP's note that it reads in one process, which is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(optimizer_state, checkpoint_id=str(checkpoint / FSDP_OPTIMIZER_DIR),
                 no_dist=not (dist.is_available() and dist.is_initialized()))
    set_optimizer_state_dict(model, optimizer, optimizer_state["optimizer"])


OPTIMIZER_FILE = "optimizer.bin"  # accelerate's file of a whole optimizer's state (`Optimizer.state_dict()`)


def _load_whole_into_fsdp(accelerator: Any, config: TrainConfig, checkpoint: Path, model: Any, optimizer: Any) -> None:
    """A checkpoint written without FSDP (whole weights and optimizer) into an FSDP2 model and optimizer.

    The main process reads the trainable weights (their diffusers files) and the optimizer's state, and
    names both by the parameters' names; torch's `set_model_state_dict` and `set_optimizer_state_dict`
    broadcast them and keep each process's shard. The RNG states are not needed: every micro-step
    seeds its own draws.
    """
    from accelerate.utils import broadcast_object_list
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    # The trained parameters by name, in the optimizer's order: what the checkpoint's numbered entries are.
    names = [name for group in get_optimizer_state_dict(model, optimizer)["param_groups"] for name in group["params"]]
    weights: dict[str, Any] = {}
    optimizer_state: dict[str, Any] = {}
    problem = None
    if accelerator.is_main_process:
        try:
            weights = _trainable_weights_by_name(accelerator.unwrap_model(model), config, checkpoint, names)
            optimizer_state = _optimizer_state_by_name(checkpoint / OPTIMIZER_FILE, names)
        except Exception as error:  # told to every process: the others would wait for the weights
            problem = (str(error).strip().splitlines() or [type(error).__name__])[0]
    [problem] = broadcast_object_list([problem])
    if problem:
        raise RuntimeError(problem)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def _trainable_weights_by_name(model: Any, config: TrainConfig, checkpoint: Path, names: list[str]) -> dict[str, Any]:
    """The checkpoint's trainable weights, keyed by the names of the parameters they are."""
    if config.full:
        from diffusers import CogVideoXTransformer3DModel

        loaded = CogVideoXTransformer3DModel.from_pretrained(checkpoint / TRANSFORMER_DIR, torch_dtype=torch.float32)
        found = loaded.state_dict()
        missing = [name for name in names if name not in found and name != "patch_embed.pos_embedding"]
    else:
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import load_file

        # peft names each parameter in the diffusers file (the function that wrote it), diffusers adds "transformer."
        file_key = {f"transformer.{key}": name for key, name in
                    get_peft_model_state_dict(model, state_dict={name: name for name in names}).items()}
        saved = load_file(str(checkpoint / LORA_WEIGHTS_NAME))
        found = {file_key[key]: value for key, value in saved.items() if key in file_key}
        missing = [key for key in file_key if key not in saved] + [key for key in saved if key not in file_key]
    if missing:
        raise RuntimeError(f"its trainable weights do not match the model's: {missing[:3]}")
    return {name: found[name] for name in names if name in found}


def _optimizer_state_by_name(path: Path, names: list[str]) -> dict[str, Any]:
    """A whole optimizer's saved state (parameters numbered in its order) with each parameter's name instead."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    numbers = [number for group in saved["param_groups"] for number in group["params"]]
    if len(numbers) != len(names):
        raise RuntimeError(f"{path.name} holds the state of {len(numbers)} parameters; the model trains {len(names)}")
    name_of = dict(zip(numbers, names))
    return {"state": {name_of[number]: value for number, value in saved["state"].items()},
            "param_groups": [{**group, "params": [name_of[number] for number in group["params"]]}
                             for group in saved["param_groups"]]}


def _warn_about_batch(config: TrainConfig, processes: int, state: dict[str, Any], checkpoint: Path) -> None:
    """One warning when the run resumes with another batch per micro-step than the checkpoint's run.

    The data schedule is a function of (seed, batch per micro-step across processes): with the same
    one (N processes x B = M processes x B'), the resumed run trains exactly the samples, in the same
    order and with the same random draws, that the uninterrupted run would have. With another one,
    it continues by optimizer step: step S starts at micro-step S x accumulation of the new schedule,
    which shuffles the epoch's samples into batches of the new size (the epoch's position is kept,
    not the exact samples).
    """
    then = state.get("global_batch")
    if not isinstance(then, dict):
        return
    now = global_batch(config.batch_size, processes, config.gradient_accumulation)
    if then == now:
        return
    micro_then = then.get("per_process", 0) * then.get("processes", 0)
    micro_now = now["per_process"] * now["processes"]
    what = (f"{then.get('per_process')} per process x {then.get('processes')} processes x "
            f"{then.get('accumulation')} accumulation then, {now['per_process']} x {now['processes']} x "
            f"{now['accumulation']} now")
    if micro_then == micro_now and then.get("accumulation") == now["accumulation"]:
        report.info(f"resuming on {processes} process(es) a checkpoint of {then.get('processes')}: the same global "
                    f"batch ({what}), so the data continues exactly")
        return
    report.warn(f"{checkpoint.name} was trained with another batch ({what}): the run continues at step "
                f"{state.get('step')} of a schedule cut into the new batches, so its samples and random draws "
                "are not the ones the uninterrupted run would have used", shared=True)
