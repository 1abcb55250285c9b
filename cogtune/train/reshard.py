"""Loading a checkpoint under another strategy or number of processes than the one that wrote it.

A checkpoint written by N processes resumes on M (`load_state`), exactly when the batch per
micro-step across processes and the accumulation are unchanged (otherwise with one warning). Under
FSDP accelerate's state holds the model's and optimizer's shards (torch.distributed.checkpoint, which
reshards N processes' shards onto M); an FSDP checkpoint resumes without FSDP and a plain one under
FSDP too. A DeepSpeed checkpoint resumes under DeepSpeed on as many processes only, which is checked
before any weight loads (`check_loadable_here`).
"""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType

from cogtune import report
from cogtune.errors import ConfigError
from cogtune.train.checkpoint import TRAINER_STATE, global_batch
from cogtune.train.config import TrainConfig
from cogtune.train.run_folder import weights_in

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
    check_pickles(checkpoint, up_to_bytes=PRECHECKED_PICKLE_BYTES)
    try:
        _load_state(accelerator, config, checkpoint, model, optimizer, load_trainable)
    except Exception as error:
        if "weights only load failed" in str(error).lower() or isinstance(error, pickle.UnpicklingError):
            check_pickles(checkpoint)  # which file: named in one line
        raise


# Pickled files (accelerate's optimizer, scaler, RNG states) are loaded with torch's weights-only unpickler,
# which builds tensors and plain containers and runs no code. Those up to this size are tried before
# anything loads, so that a refused one is named; a larger one (a full fine-tune's optimizer) only when
# the load fails, rather than read twice.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")
PRECHECKED_PICKLE_BYTES = 256 * 1024**2


def check_pickles(checkpoint: Path, up_to_bytes: int | None = None) -> None:
    """Refuse, naming it, a pickled file that would run code: accelerate's files (torch's weights-only
    unpickler must take them) and torch.distributed.checkpoint's `.metadata` (FSDP's shards), which
    torch reads with a plain `pickle.load`, so it is parsed here first with `_DcpMetadataUnpickler`.

    DeepSpeed's own folder (`pytorch_model/`), which DeepSpeed reads with an unrestricted `torch.load`, is
    read first by torch's weights-only unpickler with DeepSpeed's few state classes allowed
    (`_check_deepspeed_pickles`), every file whatever its size: memory-mapped, its tensors are not read.
    """
    from accelerate.utils import load  # torch.load with weights_only=True and accelerate's safe globals

    for path in sorted(checkpoint.rglob(".metadata")):
        try:
            with open(path, "rb") as handle:
                _DcpMetadataUnpickler(handle).load()
        except Exception as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
            raise ConfigError(f"{path} cannot be loaded without running code from it ({reason}); cogtune loads "
                              "nothing else", hint="resume from a checkpoint you trust, or train without --resume"
                              ) from error
    own = {checkpoint / FSDP_OPTIMIZER_DIR, checkpoint / DEEPSPEED_DIR}
    files = [path for path in checkpoint.rglob("*") if path.suffix in PICKLE_SUFFIXES and path.is_file()
             and not any(folder in path.parents for folder in own)]
    for path in sorted(files, key=lambda item: item.stat().st_size):
        if up_to_bytes is not None and path.stat().st_size > up_to_bytes:
            continue
        try:
            with warnings.catch_warnings():  # torch's note on a pickle protocol it did not write: the refusal says it
                warnings.simplefilter("ignore")
                load(str(path), map_location="cpu")
        except Exception as error:
            raise _refused(path, error) from error
    if (checkpoint / DEEPSPEED_DIR).is_dir():
        _check_deepspeed_pickles(checkpoint / DEEPSPEED_DIR)


def _refused(path: Path, error: Exception) -> ConfigError:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
    return ConfigError(f"{path} cannot be loaded without running code from it (torch's weights-only unpickler "
                       f"refused it: {reason}); cogtune loads nothing else",
                       hint="resume from a checkpoint you trust, or train without --resume")


# What DeepSpeed's checkpoint files hold besides tensors and plain containers (its ZeRO optimizer's
# `state_dict` and the engine's model states, deepspeed 0.19): the loss scaler, the ZeRO stage enum and
# the parameter-slice records. Building each runs only its constructor or sets its attributes.
DEEPSPEED_STATE_CLASSES = (
    ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
    ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
    ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
)


def _check_deepspeed_pickles(folder: Path) -> None:
    import importlib

    allowed = [getattr(importlib.import_module(module), name)
               for module, names in DEEPSPEED_STATE_CLASSES for name in names]
    for path in sorted(item for item in folder.rglob("*") if item.suffix in PICKLE_SUFFIXES and item.is_file()):
        try:
            with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:
            raise _refused(path, error) from error


class _DcpMetadataUnpickler(pickle.Unpickler):
    """Unpickles what torch.distributed.checkpoint's `.metadata` holds, and nothing that could run code:
    its metadata classes, tensor sizes, dtypes and layouts, paths and plain containers."""

    _ALLOWED = {
        "torch.distributed.checkpoint.metadata": None,  # its dataclasses and enums, all of them
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.distributed.checkpoint.planner": {"LoadItemType", "WriteItemType"},
        "torch.serialization": {"_get_layout"},
        "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
        "collections": {"OrderedDict"},
        "builtins": {"set", "frozenset", "slice", "complex"},
    }

    def find_class(self, module: str, name: str) -> Any:
        allowed = self._ALLOWED.get(module, ())
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if allowed is None or (allowed and name in allowed):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which torch.distributed.checkpoint's "
                                     "metadata never holds")


def _load_state(accelerator: Any, config: TrainConfig, checkpoint: Path, model: Any, optimizer: Any,
                load_trainable: Any) -> None:
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

        folder = weights_in(checkpoint, full=True)
        loaded = CogVideoXTransformer3DModel.from_pretrained(folder, torch_dtype=torch.float32)
        found = loaded.state_dict()
        missing = [name for name in names if name not in found and name != "patch_embed.pos_embedding"]
    else:
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import load_file

        # peft names each parameter in the diffusers file (the function that wrote it), diffusers adds "transformer."
        file_key = {f"transformer.{key}": name for key, name in
                    get_peft_model_state_dict(model, state_dict={name: name for name in names}).items()}
        saved = load_file(str(weights_in(checkpoint, full=False)))
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
