"""Which configurations fit a GPU, the cheapest change that makes one fit, and memory profiles.

Budgets compare with *reserved* memory and leave room for the CUDA context (which the allocator
does not count). Options are tried in order of their cost in speed, cheapest first, so the first
configuration that fits is the fastest one that does.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from typing import Any

import torch

from cogtune import distributed, launch, report
from cogtune.config import flatten_settings, replace_settings
from cogtune.errors import ConfigError
from cogtune.train.config import TrainConfig
from cogtune.train.plan import RunPlan
from cogtune.train.validation import validation_shape
from cogtune.train.sizing.cache import cached_estimate
from cogtune.train.sizing.estimate import CUDA_CONTEXT_GIB, RunEstimate, shardable

# Peak dense bf16 tensor throughput (TFLOP/s) and memory (GiB) of common GPUs, for rough step times.
GPUS = {
    "H200": (989.0, 141.0),
    "H100": (989.0, 80.0),
    "A100": (312.0, 80.0),
    "L40S": (362.0, 48.0),
    "A6000": (155.0, 48.0),
    "RTX 4090": (165.0, 24.0),
    "RTX 3090": (71.0, 24.0),
    "A10G": (125.0, 24.0),
    "RTX 4080": (97.0, 16.0),
    "T4": (65.0, 16.0),
}
# Fraction of the peak a CogVideoX training step reaches (half the peak is what the default run is
# expected to reach on an H100); a rough figure until measured per GPU.
ASSUMED_UTILIZATION = 0.5

PROFILES = {"12gb": 11.5, "16gb": 15.0, "24gb": 23.0, "48gb": 46.0, "80gb": 78.0}


def budget_gib(gpu_gib: float) -> float:
    """Reserved memory a GPU of `gpu_gib` can give a run: its size minus the CUDA context."""
    return gpu_gib - CUDA_CONTEXT_GIB


def host_memory_gib() -> float | None:
    """The machine's RAM in GiB (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    except (ValueError, OSError, AttributeError):
        return None


def host_share_gib() -> float | None:
    """The RAM one process may keep: the machine's, split between the processes launched on it (each keeps
    its own offloaded blocks, activations and CPU optimizer state)."""
    total = host_memory_gib()
    return None if total is None else total / launch.processes_on_this_machine()


def fits_host(estimate: RunEstimate, host_budget: float | None = None) -> bool:
    """Whether the host RAM the run's offloading keeps per process (pinned blocks and activations, CPU
    optimizer state) fits `host_budget` GiB (None: this process's share of this machine's RAM,
    `host_share_gib`; unknown RAM fits)."""
    host_budget = host_share_gib() if host_budget is None else host_budget
    return host_budget is None or estimate.host_ram_gib <= host_budget


def fits(estimate: RunEstimate, budget: float, host_budget: float | None = None) -> bool:
    """The run's peak fits the GPU's `budget` and its offloading fits the host's RAM (`fits_host`)."""
    return estimate.memory.after_testing <= budget and fits_host(estimate, host_budget)


def gpu_from_device_name(device_name: str) -> str | None:
    """The `GPUS` entry a torch device name is (`torch.cuda.get_device_name()`), or None.

    Device names are vendor, product line and variant in varying order ("NVIDIA GeForce RTX 4090",
    "Tesla T4", "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"): an entry matches when its words
    appear in the name, in a row, as whole words ("A100" is not "A10G", "L40" is not "L40S").
    """
    words = re.findall(r"[a-z0-9]+", device_name.lower())
    for name in sorted(GPUS, key=len, reverse=True):
        wanted = name.lower().split()
        if any(words[i:i + len(wanted)] == wanted for i in range(len(words) - len(wanted) + 1)):
            return name
    return None


def seconds_per_step(estimate: RunEstimate, gpu: str) -> float | None:
    for name, (tflops, _) in GPUS.items():
        if name.lower() == gpu.lower():
            return estimate.teraflops_per_step / (tflops * ASSUMED_UTILIZATION)
    return None


# Ever more frugal settings, each a little slower than the one before (LoRA, then full fine-tuning).
_LORA_LADDER: list[dict[str, Any]] = [
    {"gradient_checkpointing": True},
    {"memory.base_weights": "fp8"},
    {"memory.offload_activations": True},
    {"memory.base_weights": "nf4"},  # a quarter of bf16's bytes, no transfer; each layer dequantizes as it runs
    {"memory.offload_blocks": True, "memory.base_weights": "bf16"},
    {"memory.offload_blocks": True, "memory.base_weights": "fp8"},
]
_FULL_LADDER: list[dict[str, Any]] = [
    {"gradient_checkpointing": True},
    {"optimizer.name": "adamw-8bit"},
    {"optimizer.name": "adamw-4bit-ao"},
    {"optimizer.name": "adamw-cpu-offload"},
    {"memory.offload_activations": True},
]


def ladder(config: TrainConfig) -> list[TrainConfig]:
    """Ever more frugal versions of `config` (combinations its own rules refuse are skipped)."""
    rungs = _FULL_LADDER if config.full else _LORA_LADDER
    configs: list[TrainConfig] = []
    current = config
    for changes in rungs:
        if changes == {"optimizer.name": "adamw-8bit"} and current.optimizer.name not in ("adamw", "adam"):
            continue  # already a frugal optimizer
        try:
            current = replace_settings(current, changes)
        except ConfigError:
            continue
        if current != config and current not in configs:
            configs.append(current)
    if config.batch_size > 1:
        configs.append(replace_settings(configs[-1] if configs else config, {"batch_size": 1}))
    return configs


def changes_between(new: TrainConfig, old: TrainConfig) -> list[str]:
    """What differs, in words (`gradient checkpointing on`, `optimizer adamw-8bit`)."""
    said = []
    before = flatten_settings(old)
    for name, value in flatten_settings(new).items():
        if before.get(name) != value:
            words = "optimizer" if name == "optimizer.name" else name.rsplit(".", 1)[-1].replace("_", " ")
            shown = {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
            said.append(f"{words} {shown}")
    return said


@dataclasses.dataclass(frozen=True)
class Suggestion:
    config: TrainConfig
    estimate: RunEstimate
    changes: list[str]


Estimator = Callable[[TrainConfig], RunEstimate]


def _same_shapes(estimate: RunEstimate) -> Estimator:
    return lambda config: cached_estimate(config, estimate.shapes, estimate.validation_shape,
                                          fsdp_gpus=estimate.fsdp_gpus)


def cheapest_fit(estimate: RunEstimate, budget: float, estimator: Estimator | None = None,
                 host_budget: float | None = None) -> Suggestion | None:
    """The first rung of the ladder that fits `budget` (and the host's RAM), with what changed; None when
    nothing does."""
    estimator = estimator or _same_shapes(estimate)
    for candidate in ladder(estimate.config):
        if estimate.fsdp_gpus > 1 and not shardable(candidate):
            continue  # a rung whose FSDP share is not modelled (offloading)
        candidate_estimate = estimator(candidate)
        if fits(candidate_estimate, budget, host_budget):
            return Suggestion(candidate, candidate_estimate, changes_between(candidate, estimate.config))
    return None


def choose_profile(config: TrainConfig, shapes: Any, validation_shape: Any, budget: float,
                   estimator: Estimator | None = None) -> tuple[TrainConfig, RunEstimate]:
    """The fastest memory settings of `config`'s run that fit `budget` (checkpointing off first)."""
    estimator = estimator or (lambda c: cached_estimate(c, shapes, validation_shape))
    fastest = replace_settings(config, {"gradient_checkpointing": False, "memory.base_weights": "bf16",
                                        "memory.offload_blocks": False, "memory.offload_activations": False})
    first = estimator(fastest)
    if fits(first, budget):
        return fastest, first
    suggestion = cheapest_fit(first, budget, estimator)
    if suggestion is None:
        raise ConfigError(f"no memory configuration of {first.label} fits {budget:.1f} GiB "
                          f"(the most frugal needs more); try a smaller clip shape or batch")
    return suggestion.config, suggestion.estimate


def profile_budget(profile: str) -> float:
    """GiB of reserved memory a memory profile allows ('auto': the present GPU)."""
    if profile == "auto":
        if not torch.cuda.is_available():
            raise ConfigError("--memory-profile auto needs a GPU to size for; name a size instead (e.g. 24gb)")
        return budget_gib(torch.cuda.get_device_properties(0).total_memory / 1024**3)
    return PROFILES[profile]


def fit_memory(config: TrainConfig, plan: RunPlan) -> TrainConfig:
    """The pre-flight of `run_training`: apply `--memory-profile`, or warn on a GPU the run will not fit.

    Advice only: a failure inside the estimator is one warning line and the run goes on with the
    configured settings. Every process of a DDP launch computes the same choice (the estimate is
    deterministic); other strategies shard memory themselves, so profiles do not apply to them. The check
    sizes one GPU's share of an FSDP launch (`shard`) where that share is modelled; DeepSpeed's is not.
    """
    strategy = distributed.requested_strategy()
    shapes = plan.cache.bucket_shapes
    validation = validation_shape(config, plan.cache) if plan.validation_prompts else None
    profile = config.memory.profile
    if profile != "none":
        if strategy not in ("single", "ddp"):
            raise ConfigError(f"memory profiles size one GPU's run; under {strategy} choose the options yourself")
        budget = profile_budget(profile)
        try:
            chosen, estimate = choose_profile(config, shapes, validation, budget)
        except ConfigError as exc:
            report.warn(f"memory profile {profile}: {exc.message}; training with the configured settings")
            return config
        except Exception as exc:  # the estimate is advice: it never stops a run
            report.warn(f"memory profile {profile} not applied (the estimate failed: {_first_line(exc)}); "
                        "training with the configured settings")
            return config
        report.info(f"memory profile {profile}: {', '.join(changes_between(chosen, config)) or 'no change'} "
                    f"(estimated peak {estimate.memory.after_testing:.1f} GiB of {budget:.1f} GiB, "
                    f"bucket {'x'.join(map(str, estimate.shape))})")
        return chosen
    # an FSDP launch: one GPU's share over its processes, where that share is modelled (`shardable`)
    sharded = strategy == "fsdp" and shardable(config)
    if (config.memory.check and torch.cuda.is_available() and (strategy in ("single", "ddp") or sharded)
            and launch.is_main_launch_process()):
        budget = budget_gib(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1024**3)
        try:
            estimate = cached_estimate(config, shapes, validation,
                                       fsdp_gpus=launch.launched_processes() if sharded else 1)
            suggestion = None if fits(estimate, budget) else cheapest_fit(estimate, budget)
        except Exception as exc:  # the estimate is advice: it never stops a run
            report.warn(f"memory check skipped: the estimate failed ({_first_line(exc)})")
            return config
        if estimate.memory.after_testing <= budget and not fits_host(estimate):
            report.warn(_host_shortfall(estimate))
        elif not fits(estimate, budget):
            advice = ", ".join(suggestion.changes) if suggestion else "a smaller clip shape or batch"
            share = f" per GPU (FSDP over {estimate.fsdp_gpus})" if sharded else ""
            advice += "" if sharded else ", or --memory-profile auto"  # profiles size one GPU's whole run
            report.warn(f"this run is estimated to peak at {estimate.memory.after_testing:.1f} GiB{share} (bucket "
                        f"{'x'.join(map(str, estimate.shape))}); this GPU gives {budget:.1f} GiB: it will likely run "
                        f"out of memory (try {advice})")
    return config


def _host_shortfall(estimate: RunEstimate) -> str:
    """The warning for a run whose offloading does not fit this machine's RAM."""
    processes = launch.processes_on_this_machine()
    kept = f"{estimate.host_ram_gib:.1f} GiB in host memory"
    if processes > 1:
        kept += f" per process ({processes * estimate.host_ram_gib:.1f} GiB for the {processes} on this machine)"
    return (f"this run's offloading is estimated to keep {kept}; this machine has {host_memory_gib():.1f} GiB: "
            "it will likely run out of host memory")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
