"""`bench memory --estimate`: the peak GPU memory of a training run, without a GPU or a download.

The trainer's own pieces run on the meta device under an allocation tracker (`cogtune.bench.trace`):
`load_trainable_transformer` builds the real transformer (LoRA, fp8 storage, checkpointing, as
configured), `training_step` runs two steps forward and backward, a torch optimizer steps for real
(others' state is added by its known size), and the validation pass runs the real diffusers
pipeline for one denoising step and the VAE decode. The tracker replays every allocation into a
model of the CUDA caching allocator, so the figures are *reserved* memory, what
`torch.cuda.max_memory_reserved` reports. Block offloading is applied as arithmetic: the frozen
weights leave the device except the two largest layers in flight.

The four moments are the trainer's `memory.json`: before training (weights loaded), before
validation (the training peak), after validation and after testing (the peak including the
validation pass). The CUDA context (about 0.5 GiB, outside the allocator) is not in these figures;
`fit` adds it when comparing with a GPU's size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from typing import Any

from cogtune.bench.cases import BenchCase
from cogtune.models.loading import ResolvedModel
from cogtune.models.registry import ModelSpec

# Optimizer state bytes per trainable parameter, for optimizers whose step cannot run on meta
# tensors (their kernels are compiled CUDA code); torch's optimizers are traced instead.
STATE_BYTES_PER_PARAMETER = {
    "adamw-8bit": 2 * (1 + 4 / 256),  # two uint8 states + a float32 absmax per block of 256
    "adamw-8bit-paged": 0.0,  # paged state lives in unified memory, outside the caching allocator
    "adamw-8bit-ao": 2 * (1 + 4 / 256),
    "adamw-4bit-ao": 2 * (0.5 + 4 / 128),
    "prodigy": 16.0,  # exp_avg, exp_avg_sq, s, p0 in float32
    "adamw-cpu-offload": 0.0,  # state on the CPU (tensors under 4096 elements stay: see below)
}
CPU_OFFLOAD_MIN_SIZE = 4096
CUDA_CONTEXT_GIB = 0.5


@dataclasses.dataclass(frozen=True)
class MemoryFigures:
    """GiB at the trainer's four moments, allocated and reserved (peaks so far, like max_memory_*)."""

    before_training: float
    before_validation: float
    after_validation: float
    after_testing: float
    allocated_before_training: float
    allocated_peak_training: float
    allocated_peak: float

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True)
class CaseEstimate:
    case: BenchCase
    memory: MemoryFigures
    trainable_parameters: int
    transformer_parameters: int
    teraflops_per_step: float
    seconds: float  # the estimator's own time

    def as_dict(self) -> dict[str, Any]:
        return {"case": dataclasses.asdict(self.case), "label": self.case.label, "memory_gib": self.memory.as_dict(),
                "trainable_parameters": self.trainable_parameters,
                "transformer_parameters": self.transformer_parameters,
                "teraflops_per_step": round(self.teraflops_per_step, 1), "estimator_seconds": round(self.seconds, 1)}


def _train_config(case: BenchCase):
    from cogtune.train.config import LoraConfig, MemoryConfig, OptimizerConfig, TrainConfig

    return TrainConfig(
        task="i2v" if case.spec.is_i2v else "t2v", model=case.model, data="<bench>", output_dir="<bench>",
        random_weights=True, full=case.method == "full", batch_size=case.batch_size,
        gradient_checkpointing=case.gradient_checkpointing, lora=LoraConfig(rank=case.rank),
        optimizer=OptimizerConfig(name=case.optimizer),
        # block offloading is arithmetic here (its hooks move tensors between real devices)
        memory=MemoryConfig(fp8_weights=case.fp8, offload_activations=case.offload_activations),
    )


def synthetic_batch(spec: ModelSpec, case: BenchCase) -> dict[str, Any]:
    """CPU tensors shaped as the cache loader gives them for this case (values are irrelevant)."""
    import torch

    frames, height, width = case.shape
    latent = (case.batch_size, 2 * spec.latent_channels, spec.latent_frames(frames),
              height // spec.spatial_compression, width // spec.spatial_compression)
    batch = {"latent_dist": torch.zeros(latent), "prompt_embeds": torch.zeros(case.batch_size, spec.max_text_tokens,
                                                                              spec.text_embed_dim)}
    if spec.is_i2v:
        image = (case.batch_size, 2 * spec.latent_channels, 1, latent[3], latent[4])
        batch["image_latent_dist"] = torch.zeros(image)
    return batch


def _mixed_precision(spec: ModelSpec) -> str:
    return {"float16": "fp16", "bfloat16": "bf16"}.get(spec.weight_dtype, "no")


def _offloaded_weight_bytes(transformer: Any) -> int:
    """Bytes that block offloading keeps off the device: frozen weights, minus two layers in flight."""
    import torch

    leaf_bytes = []
    for module in transformer.modules():
        own = [p for p in module.parameters(recurse=False) if not p.requires_grad]
        if own:
            leaf_bytes.append(sum(p.numel() * p.element_size() for p in own))
    frozen = sum(leaf_bytes)
    in_flight = sum(sorted(leaf_bytes, reverse=True)[:2])
    del torch
    return max(0, frozen - in_flight)


def _optimizer_state_bytes(case: BenchCase, trainable: list[Any]) -> int:
    per_parameter = STATE_BYTES_PER_PARAMETER[case.optimizer]
    total = sum(p.numel() for p in trainable) * per_parameter
    if case.optimizer == "adamw-cpu-offload":  # small tensors stay on the device, with float32 AdamW state
        total += sum(p.numel() * 8 for p in trainable if p.numel() < CPU_OFFLOAD_MIN_SIZE)
    return int(total)


def estimate_case(case: BenchCase, steps: int = 2) -> CaseEstimate:
    """Trace `steps` training steps (the second has the optimizer state in place) and a validation pass."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cogtune.bench.trace import DEVICE, AllocationTracker, activations_offloaded_on_meta, gib, gpu_semantics
    from cogtune.models.loading import load_scheduler
    from cogtune.models.positions import needs_learned_positions_dropped
    from cogtune.quiet import quiet_libraries
    from cogtune.train.loop import RunPlan, load_trainable_transformer
    from cogtune.train.step import StepSettings, training_step

    quiet_libraries()
    started = time.perf_counter()
    spec = case.spec
    model = ResolvedModel(case.model, spec, "fake", None)
    config = _train_config(case)
    frames, height, width = case.shape
    drop = needs_learned_positions_dropped(spec, [(frames, height, width)])
    plan = RunPlan(model, None, drop, [])  # type: ignore[arg-type]  # the cache is not used to build the model
    mixed = _mixed_precision(spec)
    transformer, compute_dtype = load_trainable_transformer(config, plan, DEVICE, mixed)
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    offloaded = _offloaded_weight_bytes(transformer) if case.offload_blocks else 0

    tile = config.memory.validation_tile_size
    vae = _validation_vae(model, compute_dtype, tile) if case.validation else None  # built untracked, counted when loaded
    tracker = AllocationTracker()
    # In the order a run allocates them: the loaded weights, then the LoRA layers peft adds.
    named = list(transformer.named_parameters())
    tracker.adopt([p for name, p in named if "lora_" not in name] + list(transformer.buffers()))
    tracker.adopt([p for name, p in named if "lora_" in name])
    allocator = tracker.allocator
    before_training_reserved, before_training_allocated = allocator.reserved, allocator.allocated

    traced_optimizer = case.optimizer in ("adamw", "adam")
    extra_state = 0 if traced_optimizer else _optimizer_state_bytes(case, trainable)
    scheduler = load_scheduler(model)
    batch = synthetic_batch(spec, case)
    empty = torch.zeros(spec.max_text_tokens, spec.text_embed_dim)
    settings = StepSettings(image_dropout=0.05 if spec.is_i2v else 0.0)
    optimizer = None

    def train_step(cast_cache: dict) -> None:
        generators = [torch.Generator().manual_seed(i) for i in range(case.batch_size)]
        offloading = activations_offloaded_on_meta() if case.offload_activations else contextlib.nullcontext()
        with offloading:
            loss = training_step(transformer, scheduler, spec, batch, empty, settings, generators, DEVICE,
                                 compute_dtype)
        cast_cache.clear()  # the autocast region ends with the forward; backward runs outside it
        loss.backward()
        del loss
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            for parameter in trainable:
                parameter.grad = None
        gc.collect()

    with tracker, gpu_semantics(compute_dtype) as cast_cache:
        if traced_optimizer:
            cls = torch.optim.AdamW if case.optimizer == "adamw" else torch.optim.Adam
            optimizer = cls(trainable, lr=1e-4, foreach=True)  # CUDA's default implementation
        for _ in range(steps):
            train_step(cast_cache)
        training_peak_reserved, training_peak_allocated = allocator.peak_reserved, allocator.peak_allocated
        validation_peak_reserved, validation_peak_allocated = training_peak_reserved, training_peak_allocated
        if case.validation:
            allocator.reset_peaks()
            _trace_validation(model, transformer, vae, case, compute_dtype, tracker, cast_cache)
            validation_peak_reserved = max(training_peak_reserved, allocator.peak_reserved)
            validation_peak_allocated = max(training_peak_allocated, allocator.peak_allocated)

    flops = FlopCounterMode(display=False)  # a separate step: the counter keeps tensors alive
    with flops, gpu_semantics(compute_dtype) as cast_cache:
        train_step(cast_cache)

    shift = extra_state - offloaded  # state the trace did not see; weights that would not be on the device
    memory = MemoryFigures(
        before_training=gib(before_training_reserved - offloaded),
        before_validation=gib(training_peak_reserved + shift),
        after_validation=gib(validation_peak_reserved + shift),
        after_testing=gib(validation_peak_reserved + shift),
        allocated_before_training=gib(before_training_allocated - offloaded),
        allocated_peak_training=gib(training_peak_allocated + shift),
        allocated_peak=gib(validation_peak_allocated + shift),
    )
    return CaseEstimate(
        case=case, memory=memory, trainable_parameters=sum(p.numel() for p in trainable),
        transformer_parameters=sum(p.numel() for name, p in transformer.named_parameters() if "lora_" not in name),
        teraflops_per_step=flops.get_total_flops() / 1e12, seconds=time.perf_counter() - started,
    )


def _validation_vae(model: ResolvedModel, compute_dtype: Any, tile: tuple[int, int]):
    from cogtune.bench.trace import DEVICE
    from cogtune.models.loading import load_vae

    vae = load_vae(model, dtype=compute_dtype, device=DEVICE)
    vae.enable_tiling(tile_sample_min_height=tile[0], tile_sample_min_width=tile[1])  # as the trainer's validation
    return vae


def _shape_only_scheduler(model: ResolvedModel):
    """The model's scheduler, except that a step returns its input: a step's arithmetic reads values
    (which meta tensors lack), and its memory is a few latent-sized tensors."""
    from cogtune.models.loading import load_scheduler

    base = load_scheduler(model)

    class ShapeOnlyStep(type(base)):  # type: ignore[misc, valid-type]
        def step(self, model_output, timestep, sample, *args, return_dict=True, **kwargs):
            return (sample * 1,)

    return ShapeOnlyStep.from_config(base.config)


def _trace_validation(model: ResolvedModel, transformer: Any, vae: Any, case: BenchCase, compute_dtype: Any,
                      tracker: Any, cast_cache: Any) -> None:
    """One denoising step of the real pipeline (classifier-free guidance batch, under autocast) and
    the VAE decode (outside it), as `generate_videos` runs them."""
    import torch
    from PIL import Image

    from cogtune.bench.trace import DEVICE
    from cogtune.models.loading import build_pipeline
    from cogtune.train.validation import validation_feed_forward_chunks

    spec = model.spec
    tracker.allocator.release_cached()  # the validator empties the cache before the pass
    tracker.adopt(list(vae.parameters()) + list(vae.buffers()))  # the trainer loads the VAE for the pass
    pipe = build_pipeline(model, transformer=transformer, vae=vae, text_encoder=None, tokenizer=None,
                          scheduler=_shape_only_scheduler(model))
    frames, height, width = case.shape
    embeds = torch.zeros(1, spec.max_text_tokens, spec.text_embed_dim).to(DEVICE, compute_dtype)
    kwargs: dict[str, Any] = dict(prompt_embeds=embeds, negative_prompt_embeds=embeds, num_frames=frames,
                                  height=height, width=width, num_inference_steps=1, guidance_scale=6.0,
                                  output_type="latent", max_sequence_length=spec.max_text_tokens)
    if spec.is_i2v:
        kwargs["image"] = Image.new("RGB", (width, height))
    with torch.no_grad():
        with validation_feed_forward_chunks(transformer, case.offload_blocks):  # as the validator
            latents = pipe(**kwargs).frames[:, spec.padded_latent_frames(frames) - spec.latent_frames(frames):]
        tracker.allocator.release_cached()  # generate_videos empties the cache before the decode
        with cast_cache.outside_autocast():
            pipe.decode_latents(latents.to(vae.dtype))
