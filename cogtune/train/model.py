"""Setting up the model a run trains: the transformer with the right parts trainable, in the right dtypes.

Used by the recipe (`cogtune.train.loop`) and by the estimator, which builds the same transformer on
the meta device to size a run.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from cogtune import __version__
from cogtune.models.positions import drop_learned_positional_embeddings
from cogtune.models.registry import ModelSpec
from cogtune.train.config import TrainConfig
from cogtune.train.lora import add_lora
from cogtune.train.placement import HOST_COPIES, memory_placement
from cogtune.train.plan import RunPlan
from cogtune.train.step import derive_seed


def resolve_mixed_precision(config: TrainConfig, spec: ModelSpec) -> str:
    if config.mixed_precision != "auto":
        return config.mixed_precision
    if not torch.cuda.is_available():
        return "no"
    return {"float16": "fp16", "bfloat16": "bf16"}.get(spec.weight_dtype, "no")


def load_trainable_transformer(config: TrainConfig, plan: RunPlan, device: Any, mixed_precision: str,
                               fsdp_checkpoints_activations: bool = False):
    """The transformer with the right parameters trainable, in the right dtypes, and its compute dtype.

    LoRA: frozen base weights in the model's dtype (float32 on a CPU), or as `memory.base_weights` stores
    them (float8; torchao int8 or bitsandbytes NF4, `cogtune.models.quantize`), LoRA weights in float32.
    Full: float32 master weights; autocast (mixed precision) runs the matmuls in bf16/fp16. The memory options are applied as their placement
    (`cogtune.train.placement`) describes; `fsdp_checkpoints_activations`: the launch's FSDP config
    checkpoints the blocks itself. Order matters: block offloading hooks go on before the LoRA layers
    exist (so that they stay on the GPU), float8 storage after (so that peft does not create the LoRA
    layers in float8), a quantized base before (peft wraps each quantized layer in its LoRA layer for
    it), compilation last.
    """
    from diffusers.training_utils import cast_training_params

    from cogtune.models.fp8 import store_frozen_linears_in_float8
    from cogtune.models.loading import load_transformer, torch_dtype
    from cogtune.models.quantize import quantize_frozen_linears

    placement = memory_placement(config, fsdp_checkpoints_activations)
    on_cpu = torch.device(device).type == "cpu"
    base_dtype = torch.float32 if config.full or on_cpu else torch_dtype(plan.model.spec.weight_dtype)
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, base_dtype)
    # A quantized base loads on the host and comes to the device a quantized layer at a time.
    on_host = placement.frozen_weights_on_host or placement.frozen_weights_quantized is not None
    transformer = load_transformer(plan.model, dtype=base_dtype, device="cpu" if on_host else device)
    if plan.drop_learned_positions:
        drop_learned_positional_embeddings(transformer)
    if config.full:
        transformer.requires_grad_(True)
        if plan.drop_learned_positions:
            transformer.patch_embed.pos_embedding.requires_grad_(False)  # unused, so it gets no gradient
    else:
        transformer.requires_grad_(False)
        if placement.frozen_weights_on_host:  # leaf by leaf, the next one prefetched on a side stream
            transformer.enable_group_offload(onload_device=torch.device(device), offload_device=torch.device("cpu"),
                                             offload_type="leaf_level", use_stream=not on_cpu)
        if placement.frozen_weights_quantized is not None:  # before the LoRA layers: peft wraps the quantized ones
            quantize_frozen_linears(transformer, placement.frozen_weights_quantized, compute_dtype, device,
                                    config.memory.nf4_backend)
            transformer.to(device)
        torch.manual_seed(derive_seed(config.seed, "lora-init"))  # the LoRA's A matrices start random
        add_lora(transformer, config.lora)
        if placement.frozen_weights_on_host:
            for name, parameter in transformer.named_parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.to(device)  # only the frozen weights travel
        if placement.frozen_weights_in_float8:
            store_frozen_linears_in_float8(transformer, compute_dtype)
        cast_training_params(transformer, dtype=torch.float32)
    if placement.checkpoint_blocks:
        transformer.enable_gradient_checkpointing()
    if placement.compiled_blocks:
        for block in transformer.transformer_blocks:
            block.compile()
    return transformer, compute_dtype


def ignore_frozen_weights_in_ddp(transformer: Any) -> None:
    """DDP need not broadcast or reduce what does not train (and cannot broadcast float8 over some backends)."""
    frozen = [name for name, p in transformer.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in transformer.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(transformer, frozen)


def lora_info(config: TrainConfig, plan: RunPlan) -> dict[str, Any]:
    """What a LoRA file records about its training (read back by `cogtune sample`)."""
    spec = plan.model.spec
    return {
        "cogtune_version": __version__,
        "model": plan.model.reference,
        "hub_id": spec.hub_id,
        "family": spec.family,
        "task": config.task,
        "rank": config.lora.rank,
        "alpha": config.lora.effective_alpha,
        "buckets": plan.cache.buckets,
        "drop_learned_positional_embeddings": plan.drop_learned_positions,
        "base_weights": config.memory.base_weights,
        **({"nf4_backend": config.memory.nf4_backend} if config.memory.base_weights == "nf4" else {}),
    }


def activations_offloaded(enabled: bool, device: Any):
    """Keep tensors saved for backward in host memory (`memory.offload_activations`), pinned on a GPU."""
    if not enabled:
        return contextlib.nullcontext()
    pinned = HOST_COPIES["offloaded_activations"].pinned and torch.device(device).type == "cuda"
    return torch.autograd.graph.save_on_cpu(pin_memory=pinned)
