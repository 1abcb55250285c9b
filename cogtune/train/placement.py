"""What each memory option keeps where: one description, read by the trainer and by the estimator.

The trainer (`cogtune.train.model` and the loop) applies a run's `MemoryPlacement`; the estimator
(`cogtune.train.sizing`) traces what runs on the meta device and counts the rest from this same
description, so the two cannot drift apart. Which options combine is the config's business
(`TrainConfig.__post_init__`); what an option does, once allowed, is written here.

- `--gradient-checkpointing`: a block keeps only its inputs for backward and recomputes the rest there
  (off where the launch's FSDP config checkpoints the blocks itself).
- `--base-weights fp8` (`--fp8`): the frozen Linear weights stay on the device, stored in float8, computed in
  bf16/fp16 (each layer upcasts a copy of its weight while it runs).
- `--base-weights int8|nf4`: the frozen Linear weights are quantized (torchao int8, bitsandbytes NF4) as they
  come to the device a layer at a time, and stay there; each layer dequantizes its weight into the
  autocast dtype while it computes (`cogtune.models.quantize.quantized_weight_bytes` is what they hold).
- `--offload-blocks`: the frozen weights and buffers stay in pinned host memory; each layer comes to
  the device to run, the next one prefetched on a side stream (`OFFLOADED_LAYERS_ON_DEVICE`).
- `--offload-activations`: the tensors saved for backward wait in pinned host memory.
- `--optimizer adamw-cpu-offload`: each trainable tensor of `CPU_OFFLOAD_MIN_ELEMENTS` or more has a
  pinned host copy and gradient, and AdamW's state of it in ordinary host memory; the step runs there.

`HOST_COPIES` names the host memory each keeps, as the estimate's `host_ram` reports it.

Light (no torch), like the config it reads.
"""

from __future__ import annotations

import dataclasses

from cogtune.train.config import TrainConfig
from cogtune.train.optimizers import CPU_OFFLOAD_MIN_ELEMENTS

# Block offloading moves one layer at a time to the device, prefetching the next on a side stream:
# the layer running and the one coming are on the device at once.
OFFLOADED_LAYERS_ON_DEVICE = 2


@dataclasses.dataclass(frozen=True)
class HostCopy:
    """Host memory an option keeps, under the name the estimate's `host_ram` gives it."""

    what: str
    pinned: bool  # page-locked (torch's pinned allocator, `torch.cuda.host_memory_stats`), on a GPU


# In the order the estimate's tables show them.
HOST_COPIES = {
    "offloaded_blocks": HostCopy("a copy of every frozen parameter and buffer, in the model's dtype "
                                 "(made before float8 storage)", pinned=True),
    "offloaded_activations": HostCopy("a copy of each tensor saved for backward (with checkpointing, the "
                                      "blocks' inputs), alive until backward", pinned=True),
    "cpu_optimizer": HostCopy(f"a copy of each trainable tensor of {CPU_OFFLOAD_MIN_ELEMENTS}+ elements and of "
                              "its gradient", pinned=True),
    "cpu_optimizer_state": HostCopy("AdamW's two states of those copies", pinned=False),
}


@dataclasses.dataclass(frozen=True)
class MemoryPlacement:
    """Where a run keeps its tensors, as its memory options (and its launch) decide."""

    checkpoint_blocks: bool  # the model's blocks save their inputs only and recompute the rest in backward
    frozen_weights_on_host: bool  # block offloading: each layer's frozen weights come to the device to run
    frozen_weights_in_float8: bool  # frozen Linear weights stored in float8, computed in the autocast dtype
    frozen_weights_quantized: str | None  # "int8", "nf4": frozen Linear weights quantized by a library
    saved_activations_on_host: bool  # tensors saved for backward wait in host memory
    optimizer_on_host: bool  # the optimizer's state, step and (large) gradients on the CPU
    compiled_blocks: bool  # each block compiled (regional compilation; keeps about what eager keeps)

    @property
    def chunked_validation_feed_forward(self) -> bool:
        """Validation runs the feed-forward in chunks of tokens, except with offloaded blocks, whose layers
        would be brought to the device once per chunk (their weights, not the activations, are that
        run's memory)."""
        return not self.frozen_weights_on_host


def memory_placement(config: TrainConfig, fsdp_checkpoints_activations: bool = False) -> MemoryPlacement:
    """The placement of `config`'s run; `fsdp_checkpoints_activations`: the launch's FSDP config wraps each
    block in activation checkpointing itself (`distributed.fsdp_checkpoints_activations`), and the
    model's own would recompute twice."""
    memory = config.memory
    return MemoryPlacement(
        checkpoint_blocks=config.gradient_checkpointing and not fsdp_checkpoints_activations,
        frozen_weights_on_host=memory.offload_blocks,
        frozen_weights_in_float8=memory.base_weights == "fp8",
        frozen_weights_quantized=memory.base_weights if memory.quantized_base else None,
        saved_activations_on_host=memory.offload_activations,
        optimizer_on_host=config.optimizer.name == "adamw-cpu-offload",
        compiled_blocks=memory.compile,
    )
