"""Multi-process runs through accelerate: the launch's strategy, the `Accelerator`, whole state dicts.

cogtune has no distribution layer of its own. `accelerate launch --config_file FILE` (or `torchrun`)
starts the processes and names the strategy (DDP, FSDP, DeepSpeed ZeRO) in environment variables;
accelerate's `Accelerator` reads them and wraps the model. What this module adds:

- A launch without CUDA asks for the CPU explicitly; its processes then talk over gloo.
- accelerate turns FSDP on only for GPU process groups: on a CPU launch it silently trains plain
  data parallel instead. torch's FSDP2 (`fully_shard`) shards over gloo as well, so a CPU launch
  with an FSDP config gets FSDP, through the same accelerate code (`prepare`, `save_state`,
  `load_state`) as on GPUs. This is how the tests run FSDP on 2 CPU processes.
- DeepSpeed without CUDA: its CPU accelerator over gloo (without oneCCL). accelerate's `cpu=True`
  would turn DeepSpeed off, so the launch's state starts with the gloo backend named instead.
  ZeRO-2/3, with and without CPU offload, run so on CPU processes; fp16 does not (DeepSpeed's CPU
  accelerator refuses it) and is refused before any weight loads.
- Checks before any weight loads: a DeepSpeed launch needs the deepspeed package (and CUDA for
  fp16), FSDP means FSDP2.
- Sharded weights (FSDP, ZeRO) gathered into whole tensors on the main process, for saving in
  diffusers format.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, ParallelismConfig

from cogtune.errors import ConfigError
from cogtune.launch import launched_processes


def force_cpu() -> bool:
    """True for a multi-process launch on a machine without CUDA."""
    return launched_processes() > 1 and not torch.cuda.is_available()


def process_state():
    """accelerate's `PartialState` for this process (initializes the process group when launched)."""
    return PartialState(cpu=force_cpu())


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def requested_strategy() -> str:
    """What the launch asks for: 'deepspeed', 'fsdp', 'ddp' (several processes) or 'single'."""
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _env_flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "ddp" if launched_processes() > 1 else "single"


def check_launch(mixed_precision: str = "auto") -> None:
    """Refuse, before any weight loads, a launch whose strategy cannot run here (`mixed_precision`: the run's flag)."""
    strategy = requested_strategy()
    if strategy == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("this launch uses DeepSpeed (its accelerate config says DEEPSPEED), which is not installed",
                              hint="pip install 'cogtune[deepspeed]'")
        if mixed_precision == "fp16" and not torch.cuda.is_available():  # DeepSpeed: "Type fp16 is not supported"
            raise ConfigError("DeepSpeed trains in fp16 on CUDA GPUs only, and this machine has none",
                              hint="use --mixed-precision bf16 or no on the CPU")
    if strategy == "fsdp" and os.environ.get("FSDP_VERSION", "1") != "2":
        raise ConfigError("cogtune trains with FSDP2 only; this launch's accelerate config asks for FSDP1",
                          hint="set `fsdp_version: 2`, or make the file with `cogtune config accelerate --strategy fsdp`")


def make_accelerator(**kwargs: Any):
    """accelerate's `Accelerator` for this launch (FSDP and DeepSpeed included on CPU-only machines)."""
    cpu = force_cpu()
    if cpu and requested_strategy() == "deepspeed":
        # accelerate's `cpu=True` turns DeepSpeed off. Named, gloo keeps the processes counted and
        # DeepSpeed (its CPU accelerator, found by itself) talks over it: the state starts here.
        PartialState(cpu=False, backend="gloo")
        cpu = False
    if not (cpu and requested_strategy() == "fsdp"):
        accelerator = Accelerator(cpu=cpu, **kwargs)
    else:
        # accelerate checks a hybrid-shard mesh against the strategy inside `Accelerator()`, where
        # the strategy is still plain CPU data parallelism: the mesh is built once FSDP is on.
        launched = os.environ.pop("ACCELERATE_USE_PARALLELISM_CONFIG", None)
        try:
            accelerator = Accelerator(cpu=True, **kwargs)
        finally:
            if launched is not None:
                os.environ["ACCELERATE_USE_PARALLELISM_CONFIG"] = launched
        _shard_on_cpu(accelerator, hybrid=_env_flag("ACCELERATE_USE_PARALLELISM_CONFIG"))
    # A launch config's gradient_accumulation_steps would beat the caller's: the caller decides.
    accelerator.gradient_accumulation_steps = kwargs.get("gradient_accumulation_steps", 1)
    return accelerator


def _shard_on_cpu(accelerator: Any, hybrid: bool) -> None:
    """Turn on accelerate's FSDP2 path for gloo processes, as accelerate itself does for GPU ones."""
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables `accelerate launch` set
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state = accelerator.state
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if hybrid:  # PARALLELISM_CONFIG_DP_REPLICATE_SIZE x PARALLELISM_CONFIG_DP_SHARD_SIZE
        state.parallelism_config = ParallelismConfig()
        state.device_mesh = state.parallelism_config.get_device_mesh("cpu")
        state.parallelism_config._validate_accelerator(accelerator)


def strategy_name(accelerator: Any) -> str:
    """The strategy in words, for the run summary."""
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        mesh = accelerator.torch_device_mesh
        parts = [f"FSDP{plugin.fsdp_version}"]
        if mesh is not None and "dp_replicate" in (mesh.mesh_dim_names or ()):
            parts.append(f"hybrid: {mesh['dp_replicate'].size()} replicas x {mesh['dp_shard'].size()} shards")
        else:
            parts.append("full shard")
        if plugin.activation_checkpointing:
            parts.append("FSDP activation checkpointing")
        if type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy":
            parts.append("parameters offloaded to CPU")
        return ", ".join(parts)
    if kind == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        offload = [f"{what} offloaded to {device}" for what, device in
                   (("optimizer", plugin.offload_optimizer_device), ("parameters", plugin.offload_param_device))
                   if device not in (None, "none")]
        return ", ".join([f"DeepSpeed ZeRO-{plugin.zero_stage}", *offload])
    if accelerator.num_processes > 1:
        return "DDP"
    return "one process"


def is_sharded(accelerator: Any) -> bool:
    """Whether parameters are split across processes, so that every forward needs all of them."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    return accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3


def fsdp_checkpoints_activations(accelerator: Any) -> bool:
    """Whether the launch's FSDP config wraps each block in activation checkpointing itself."""
    return accelerator.distributed_type == DistributedType.FSDP and bool(accelerator.state.fsdp_plugin.activation_checkpointing)


def configure_deepspeed(accelerator: Any, batch_size: int, gradient_accumulation: int, max_grad_norm: float) -> None:
    """Write the run's batch, accumulation and clipping into the DeepSpeed config (DeepSpeed clips itself)."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    plugin = accelerator.state.deepspeed_plugin
    config = plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = batch_size
    config["gradient_accumulation_steps"] = gradient_accumulation
    config["train_batch_size"] = batch_size * gradient_accumulation * accelerator.num_processes
    config["gradient_clipping"] = max_grad_norm
    if plugin.offload_optimizer_device not in (None, "none"):
        # cogtune's optimizer (torch's AdamW, ...) steps on the CPU; DeepSpeed wants its own CPUAdam unless told.
        config["zero_force_ds_cpu_optimizer"] = False


def gather_state_dict(accelerator: Any, model: Any, trainable_only: bool) -> dict[str, Any]:
    """The prepared model's state dict as whole tensors on the main process (`{}` on the others under FSDP).

    Every process must call it: under FSDP and ZeRO-3 gathering is collective. Names are the
    model's own (no wrapper prefixes). `trainable_only` leaves out the frozen weights where the
    engine can (FSDP2); callers pick what they need from the rest.
    """
    if accelerator.is_fsdp2:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        return get_model_state_dict(model, options=options)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.get_state_dict(model) or {}  # ZeRO-3: needs stage3_gather_16bit_weights_on_model_save
    return accelerator.unwrap_model(model).state_dict()
