"""Ready accelerate config files for cogtune: DDP, FSDP2 (full or hybrid shard), DeepSpeed ZeRO-2/3.

`cogtune config accelerate --strategy fsdp --gpus 8 > fsdp.yaml` writes what `accelerate config`
would ask for, answered for CogVideoX: each `CogVideoXBlock` is its own FSDP unit, checkpoints are
saved sharded (every process writes its part), ZeRO-3 gathers 16-bit weights for the final save.
`accelerate launch --config_file fsdp.yaml -m cogtune train ...` then runs the training with it.

What stays cogtune's own choice, whatever the file says: the batch, gradient accumulation and
clipping (written into DeepSpeed's config at start), the autocast dtype (`--mixed-precision`,
auto: the model's dtype), and activation checkpointing (`--gradient-checkpointing`, per block; FSDP's
own `fsdp_activation_checkpointing` can replace it, and cogtune then turns its own off).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cogtune.errors import ConfigError

STRATEGIES = {
    "ddp": "DistributedDataParallel: a full copy of the model per GPU",
    "fsdp": "FSDP2, full shard: parameters, gradients and optimizer state split across all GPUs",
    "fsdp-hybrid": "FSDP2, hybrid shard: split within each machine, replicated across machines",
    "zero2": "DeepSpeed ZeRO-2: gradients and optimizer state split across GPUs",
    "zero2-offload": "DeepSpeed ZeRO-2, optimizer state and step in CPU memory",
    "zero3": "DeepSpeed ZeRO-3: parameters, gradients and optimizer state split across GPUs",
    "zero3-offload": "DeepSpeed ZeRO-3, optimizer state and parameters in CPU memory",
}
MIXED_PRECISIONS = ("bf16", "fp16", "no")
BLOCK_CLASS = "CogVideoXBlock"  # the transformer layer FSDP wraps, one unit per block


@dataclasses.dataclass(frozen=True)
class LaunchSettings:
    """Where and how `accelerate launch` starts the processes of one run."""

    strategy: str
    gpus: int = 1  # GPUs (processes) per machine
    machines: int = 1
    machine_rank: int = 0  # this machine's index; `accelerate launch --machine_rank R` overrides it
    main_process_ip: str | None = None  # address of machine 0, needed with several machines
    main_process_port: int = 29500
    mixed_precision: str = "bf16"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy '{self.strategy}' (known: {', '.join(STRATEGIES)})")
        if self.gpus < 1 or self.machines < 1:
            raise ConfigError("--gpus and --machines must be >= 1")
        if not 0 <= self.machine_rank < self.machines:
            raise ConfigError(f"--machine-rank must be in [0, {self.machines - 1}], got {self.machine_rank}")
        if self.machines > 1 and not self.main_process_ip:
            raise ConfigError("several machines need --main-process-ip (the address of machine 0)")
        if not 0 < self.main_process_port < 65536:
            raise ConfigError(f"--main-process-port must be a port number, got {self.main_process_port}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ConfigError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISIONS)}")
        if self.strategy == "ddp" and self.processes < 2:
            raise ConfigError("ddp needs 2 or more processes; on one GPU run `cogtune train` without a launcher")
        if self.strategy == "fsdp-hybrid" and (self.machines < 2 or self.gpus < 2):
            raise ConfigError("fsdp-hybrid shards within each machine and replicates across machines: it needs "
                              "--machines 2 or more and --gpus 2 or more", hint="on one machine use --strategy fsdp")

    @property
    def processes(self) -> int:
        return self.gpus * self.machines


def accelerate_config(settings: LaunchSettings) -> dict[str, Any]:
    """The accelerate config (the fields of `accelerate.commands.config.config_args.ClusterConfig`)."""
    strategy = settings.strategy
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": {"ddp": "MULTI_GPU", "fsdp": "FSDP", "fsdp-hybrid": "FSDP"}.get(strategy, "DEEPSPEED"),
        "mixed_precision": settings.mixed_precision,
        "num_machines": settings.machines,
        "num_processes": settings.processes,
        "machine_rank": settings.machine_rank,
        **({"main_process_ip": settings.main_process_ip} if settings.machines > 1 else {}),
        "main_process_port": settings.main_process_port,
        "gpu_ids": "all",
        "use_cpu": False,
        "debug": False,
        "rdzv_backend": "static",
        "same_network": True,
    }
    if strategy.startswith("fsdp"):
        config["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": BLOCK_CLASS,
            "fsdp_reshard_after_forward": True,
            "fsdp_offload_params": False,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_cpu_ram_efficient_loading": False,
            "fsdp_activation_checkpointing": False,
        }
    if strategy == "fsdp-hybrid":
        config["parallelism_config"] = {
            "parallelism_config_dp_replicate_size": settings.machines,
            "parallelism_config_dp_shard_size": settings.gpus,
        }
    if strategy.startswith("zero"):
        offload = strategy.endswith("-offload")
        stage = 3 if strategy.startswith("zero3") else 2
        config["deepspeed_config"] = {
            "zero_stage": stage,
            "offload_optimizer_device": "cpu" if offload else "none",
            "offload_param_device": "cpu" if offload and stage == 3 else "none",
            "zero3_init_flag": False,
            "zero3_save_16bit_model": True,
        }
        if settings.machines > 1:
            config["deepspeed_config"]["deepspeed_multinode_launcher"] = "standard"
    return config


def accelerate_config_yaml(settings: LaunchSettings) -> str:
    """The config as a commented YAML file for `accelerate launch --config_file`."""
    import yaml

    strategy = settings.strategy
    where = f"{settings.gpus} GPU(s) per machine x {settings.machines} machine(s) = {settings.processes} processes"
    launch = "accelerate launch --config_file FILE"
    if settings.machines > 1:
        launch += " --machine_rank R"
    lines = [
        f"# cogtune {strategy}: {STRATEGIES[strategy]}; {where}.",
        f"# Run: {launch} -m cogtune train t2v --config run.toml",
    ]
    if settings.machines > 1:
        lines.append(f"# Run the same command on every machine, R = 0 (at {settings.main_process_ip}) .. "
                     f"{settings.machines - 1}; they meet on port {settings.main_process_port}.")
    if strategy.startswith("fsdp"):
        lines.append(f"# Each {BLOCK_CLASS} is one FSDP unit. cogtune recomputes block activations itself "
                     "(--gradient-checkpointing, on by default);")
        lines.append("# with fsdp_activation_checkpointing: true FSDP does it instead (and cogtune's is turned off).")
    if strategy.startswith("zero"):
        lines.append("# Needs `pip install deepspeed` on every machine. Batch, accumulation and clipping come from "
                     "cogtune's flags.")
        lines.append("# Without GPUs DeepSpeed runs on the CPU over gloo (fp32 or bf16) and compiles its shared-memory "
                     "op at the first start (needs a C++ compiler).")
    lines.append("# The autocast dtype is cogtune's --mixed-precision (auto: the model's); keep mixed_precision "
                 "below in line with it.")
    body = yaml.safe_dump(accelerate_config(settings), sort_keys=False, default_flow_style=False)
    return "\n".join(lines) + "\n" + body
