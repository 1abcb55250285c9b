"""Which configurations fit a GPU, the cheapest change that makes one fit, and memory profiles.

Budgets compare with *reserved* memory and leave room for the CUDA context (which the allocator
does not count). Options are tried in order of their cost in speed, cheapest first, so the first
configuration that fits is the fastest one that does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from cogtune.bench.cases import BenchCase
from cogtune.bench.estimate import CUDA_CONTEXT_GIB, CaseEstimate, estimate_case

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
# Fraction of the peak a CogVideoX training step reaches (the target for the default run on
# an H100 is half the peak); a rough figure until measured per GPU.
ASSUMED_UTILIZATION = 0.5

PROFILES = {"12gb": 11.5, "16gb": 15.0, "24gb": 23.0, "48gb": 46.0, "80gb": 78.0}


def budget_gib(gpu_gib: float) -> float:
    """Reserved memory a GPU of `gpu_gib` can give a run: its size minus the CUDA context."""
    return gpu_gib - CUDA_CONTEXT_GIB


def fits(estimate: CaseEstimate, budget: float) -> bool:
    return estimate.memory.after_testing <= budget


def seconds_per_step(estimate: CaseEstimate, gpu: str) -> float | None:
    for name, (tflops, _) in GPUS.items():
        if name.lower() == gpu.lower():
            return estimate.teraflops_per_step / (tflops * ASSUMED_UTILIZATION)
    return None


def ladder(case: BenchCase) -> list[BenchCase]:
    """Ever more frugal versions of `case`, each a little slower than the one before."""
    steps: list[Callable[[BenchCase], BenchCase]] = [
        lambda c: dataclasses.replace(c, gradient_checkpointing=True),
    ]
    if case.method == "lora":
        steps += [
            lambda c: dataclasses.replace(c, fp8=True),
            lambda c: dataclasses.replace(c, offload_activations=True),
            lambda c: dataclasses.replace(c, offload_blocks=True, fp8=False),
            lambda c: dataclasses.replace(c, offload_blocks=True, fp8=True),
        ]
    else:
        steps += [
            lambda c: dataclasses.replace(c, optimizer="adamw-8bit") if c.optimizer in ("adamw", "adam") else c,
            lambda c: dataclasses.replace(c, optimizer="adamw-4bit-ao"),
            lambda c: dataclasses.replace(c, optimizer="adamw-cpu-offload"),
            lambda c: dataclasses.replace(c, offload_activations=True),
        ]
    cases, current = [], case
    for step in steps:
        current = step(current)
        if current != case and current not in cases:
            cases.append(current)
    if case.batch_size > 1:
        cases.append(dataclasses.replace(cases[-1] if cases else case, batch_size=1))
    return cases


@dataclasses.dataclass(frozen=True)
class Suggestion:
    case: BenchCase
    estimate: CaseEstimate
    changes: list[str]


def cheapest_fit(estimate: CaseEstimate, budget: float,
                 estimator: Callable[[BenchCase], CaseEstimate] = estimate_case) -> Suggestion | None:
    """The first rung of the ladder that fits `budget`, with what changed; None when nothing does."""
    for candidate in ladder(estimate.case):
        candidate_estimate = estimator(candidate)
        if fits(candidate_estimate, budget):
            return Suggestion(candidate, candidate_estimate, candidate.changes(estimate.case))
    return None


def choose_profile(case: BenchCase, budget: float,
                   estimator: Callable[[BenchCase], CaseEstimate] = estimate_case) -> tuple[BenchCase, CaseEstimate]:
    """The fastest configuration of `case`'s run that fits `budget` (checkpointing off first)."""
    fastest = dataclasses.replace(case, gradient_checkpointing=False, fp8=False, offload_blocks=False,
                                  offload_activations=False)
    first = estimator(fastest)
    if fits(first, budget):
        return fastest, first
    suggestion = cheapest_fit(first, budget, estimator)
    if suggestion is None:
        from cogtune.errors import ConfigError

        raise ConfigError(f"no memory configuration of {case.label} fits {budget:.1f} GiB "
                          f"(the most frugal needs more); try a smaller clip shape or batch")
    return suggestion.case, suggestion.estimate


def case_for_training(config, buckets: list[str]) -> BenchCase:
    """The bench case of a training run: its largest bucket (the memory peak) and its options."""
    shapes = [tuple(int(v) for v in bucket.split("x")) for bucket in buckets]
    frames, height, width = max(shapes, key=lambda s: s[0] * s[1] * s[2])
    memory = config.memory
    return BenchCase(
        model=config.model, method="full" if config.full else "lora", rank=config.lora.rank,
        optimizer=config.optimizer.name, gradient_checkpointing=config.gradient_checkpointing,
        batch_size=config.batch_size, frames=frames, height=height, width=width, fp8=memory.fp8_weights,
        offload_blocks=memory.offload_blocks, offload_activations=memory.offload_activations,
        validation=config.validation.every > 0 or config.validation.final,
    )


def apply_case(config, case: BenchCase):
    """`config` with the memory options of `case`."""
    return dataclasses.replace(
        config, gradient_checkpointing=case.gradient_checkpointing,
        optimizer=dataclasses.replace(config.optimizer, name=case.optimizer),
        memory=dataclasses.replace(config.memory, fp8_weights=case.fp8, offload_blocks=case.offload_blocks,
                                   offload_activations=case.offload_activations),
    )


def profile_budget(profile: str) -> float:
    """GiB of reserved memory a memory profile allows ('auto': the present GPU)."""
    if profile == "auto":
        import torch

        if not torch.cuda.is_available():
            from cogtune.errors import ConfigError

            raise ConfigError("--memory-profile auto needs a GPU to size for; name a size instead (e.g. 24gb)")
        return budget_gib(torch.cuda.get_device_properties(0).total_memory / 1024**3)
    return PROFILES[profile]
