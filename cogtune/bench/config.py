"""`cogtune bench memory`'s settings: a grid of training runs to size or measure.

Each setting is declared once, here: its name, flag, help, default, completion and checks
(`cogtune.cli.settings` builds the command's options from the fields). The grid's axes are
comma lists on the command line (`--rank 16,64`, `--base-weights bf16,nf4`) and lists in a TOML file.
Light to import: the CLI reads this module while it builds its options.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from cogtune.bench import METHODS
from cogtune.config import BASE_WEIGHTS, check_settings, setting
from cogtune.errors import ConfigError, DataError
from cogtune.models.registry import ALL_PRESETS
from cogtune.train.optimizers import OPTIMIZERS


def _axis(help: str, flag: str, **declared) -> tuple:
    """A grid axis: a comma list on the command line, empty (the base run's value) by default."""
    return setting((), help, flag=flag, comma_list=True, **declared)


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """A base run (the defaults, or a run's TOML) and the axes that vary it; how to size and report each."""

    models: tuple[str, ...] = _axis("Models to size: presets, Hub ids or local folders; default: the run's, else "
                                    "cogvideox-5b.", "--model", short="-m", metavar="MODEL",
                                    offers=tuple(ALL_PRESETS))
    methods: tuple[str, ...] = _axis("lora and/or full; default: the run's (lora).", "--method", choices=METHODS)
    ranks: tuple[int, ...] = _axis("LoRA ranks; default: the run's (64).", "--rank")
    gradient_checkpointing: tuple[bool, ...] = _axis("Gradient checkpointing on and/or off; default: the run's (on).",
                                                     "--gradient-checkpointing")
    optimizers: tuple[str, ...] = _axis("Optimizers; default: the run's (adamw).", "--optimizer", metavar="NAME",
                                        choices=OPTIMIZERS)
    batch_sizes: tuple[int, ...] = _axis("Batch sizes; default: the run's (1).", "--batch-size")
    shapes: tuple[str, ...] = _axis("Clip shapes, one row each (a resolution grid); default: the cache's buckets, "
                                    "else the model's default clip.", "--shape", metavar="FxHxW")
    base_weights: tuple[str, ...] = _axis("How the frozen base is stored (LoRA): bf16, fp8, int8, nf4; default: the "
                                          "run's (bf16).", "--base-weights", choices=BASE_WEIGHTS)
    offload_blocks: tuple[bool, ...] = _axis("Frozen weights offloaded to the CPU (LoRA) on and/or off; default: the "
                                             "run's (off).", "--offload-blocks")
    offload_activations: tuple[bool, ...] = _axis("Saved activations offloaded to the CPU on and/or off; default: the "
                                                  "run's (off).", "--offload-activations")
    fsdp_gpus: int = setting(1, "Size one GPU of an FSDP2 full-shard run over this many GPUs (the strategy of "
                                "`cogtune config accelerate --strategy fsdp`): weights, gradients and optimizer "
                                "state split, activations per GPU (--batch-size is per GPU; for fsdp-hybrid: the "
                                "GPUs of one machine); estimates only.",
                             flag="--fsdp-gpus", low=1)
    validation: bool = setting(True, "Include the validation pass (with a run's TOML: as that run validates).",
                               flag="--validation")
    mode: Literal["estimate", "measure"] = setting("estimate", "Estimate without a GPU or a download, or measure "
                                                               "real steps on the present GPU (--estimate, --measure).")
    gpu_memory: float | None = setting(None, "GPU size in GiB: which configurations fit, and how to fit the others; "
                                             "default: the present GPU's, if any.",
                                       flag="--gpu-memory", low=0, low_open=True)
    host_memory: float | None = setting(None, "Host RAM in GiB that one GPU's offloading may fill (checked with "
                                              "--gpu-memory; with several GPUs on a machine, each one's share); "
                                              "default: this machine's.", flag="--host-memory", low=0, low_open=True)
    gpu: str | None = setting(None, "GPU name for rough step times of estimates (H100, A100, RTX 4090, ...).",
                              flag="--gpu")
    steps: int = setting(4, "Training steps per measured configuration (the first is warm-up).", flag="--steps",
                         low=2)
    breakdown: bool = setting(False, "Show each peak in its parts (weights, gradients, optimizer state, activations, "
                                     "workspaces, allocator slack, the validation pass's parts) and the host RAM "
                                     "offloading needs.", flag="--breakdown")
    cache: bool = setting(True, "Reuse estimates kept under $COGTUNE_HOME/estimates (keyed by every setting that "
                                "changes memory, the shapes, the model's configs and the code's versions); "
                                "--no-cache estimates afresh.", flag="--cache")
    run_config: str | None = setting(None, "A run's TOML, as `cogtune train --config` reads it: size exactly that "
                                           "run; grid options then vary it (and fill in what it leaves out).",
                                     flag="--config", path=True, metavar="FILE")
    data: str | None = setting(None, "The run's cache: its buckets (the largest decides the peak) and validation "
                                     "prompts; default: the run's data.", flag="--data", short="-d", path=True)

    def __post_init__(self) -> None:
        check_settings(self)
        from cogtune.data.clips import Bucket  # numpy: kept out of the command line's start

        for shape in self.shapes:
            try:
                Bucket.parse(shape)
            except DataError as exc:
                raise ConfigError(exc.message) from exc
