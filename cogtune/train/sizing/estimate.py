"""The peak GPU memory of a training run, without a GPU or a download.

`estimate_run(config, shapes)` sizes exactly the run a `TrainConfig` describes, at its buckets
(the largest decides the peak, and the estimate says which) and its validation shape. The
trainer's own pieces run on the meta device under an allocation tracker (`trace`):
`load_trainable_transformer` builds the real transformer (LoRA with its rank and target modules,
full fine-tuning, fp8 storage, checkpointing, mixed precision, as configured), `training_step`
runs two steps forward and backward, a torch optimizer steps for real
(others' state is added by its known size), and the validation pass runs the real diffusers
pipeline for one denoising step and the VAE decode. The tracker replays every allocation into a
model of the CUDA caching allocator, so the figures are *reserved* memory, what
`torch.cuda.max_memory_reserved` reports. What the memory options keep where comes from the
trainer's own description (`cogtune.train.placement`): block offloading is applied as arithmetic
(the frozen weights leave the device except the largest layers in flight), and the host memory the
options keep is counted by its `HOST_COPIES`.

The four moments are the trainer's `memory.json`: before training (weights loaded), before
validation (the training peak), after validation and after testing (the peak including the
validation pass). The CUDA context (about 0.5 GiB, outside the allocator) is not in these figures;
`fit` adds it when comparing with a GPU's size. Two settings are not traced: `memory.compile`
(torch.compile's kernels cannot run on the meta device; compiled blocks keep about what eager ones
keep) and the values of settings that change no tensor's size (learning rate, dropout rates, seeds).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from cogtune import startup
from cogtune.errors import ConfigError, ModelError
from cogtune.models.loading import ResolvedModel
from cogtune.models.registry import ALL_PRESETS, ModelSpec
from cogtune.train.config import TrainConfig
from cogtune.train.optimizers import CPU_OFFLOAD_MIN_ELEMENTS
from cogtune.train.placement import HOST_COPIES, OFFLOADED_LAYERS_ON_DEVICE, memory_placement
from cogtune.train.sizing.allocator import pinned_block, round_request

Shape = tuple[int, int, int]
Observer = Callable[[Any, Any], contextlib.AbstractContextManager]

# Optimizer state bytes per trainable parameter, for optimizers whose step cannot run on meta
# tensors (their kernels are compiled CUDA code); torch's optimizers are traced instead.
# (bitsandbytes' `adamw-8bit` is sized tensor by tensor, as it keeps its state: `_bitsandbytes_8bit_state_bytes`.)
STATE_BYTES_PER_PARAMETER = {
    "adamw-8bit-paged": 0.0,  # paged state lives in unified memory, outside the caching allocator
    "adamw-8bit-ao": 2 * (1 + 4 / 256),
    "adamw-4bit-ao": 2 * (0.5 + 4 / 128),
    "prodigy": 16.0,  # exp_avg, exp_avg_sq, s, p0 in float32
    "adamw-cpu-offload": 0.0,  # state on the CPU (small tensors' stays: see `_optimizer_state_bytes`)
}
TRACED_OPTIMIZERS = ("adamw", "adam")
CUDA_CONTEXT_GIB = 0.5

# What a peak is made of, in the order the table and the chart show the parts.
# Each part is what is allocated at the instant allocated memory peaks (`AllocationTracker.peak_breakdown`):
# `saved_activations` what the forward keeps for backward (with checkpointing, the blocks' inputs),
# `recomputed_activations` those of the checkpointed block that backward is recomputing, `backward_transients`
# backward's own tensors (activation gradients, gradients not yet accumulated); `allocator_slack` is reserved
# minus allocated at that instant, `reserved_after_peak` the segments reserved after it.
BREAKDOWN_PARTS = ("frozen_weights", "trainable_weights", "gradients", "optimizer_state", "autocast_weight_copies",
                   "gathered_weights", "gradient_buffers", "saved_activations", "recomputed_activations", "backward_transients", "workspaces", "vae_weights",
                   "validation_denoise", "validation_decode", "other", "allocator_slack", "reserved_after_peak")
HOST_PARTS = tuple(HOST_COPIES)
# The parts held in pinned (page-locked) memory, which torch's pinned allocator counts
# (`torch.cuda.host_memory_stats`).
PINNED_HOST_PARTS = tuple(part for part, copy in HOST_COPIES.items() if copy.pinned)


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
    validation_denoise: float = 0.0  # allocated peak while the validation pass denoises (0: no validation)
    validation_decode: float = 0.0  # allocated peak while it decodes

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True)
class RunEstimate:
    config: TrainConfig
    shapes: tuple[Shape, ...]  # the run's buckets
    shape: Shape  # the bucket that decides the training peak
    validation_shape: Shape | None  # None: the run renders no validation videos
    memory: MemoryFigures
    trainable_parameters: int
    transformer_parameters: int
    teraflops_per_step: float
    seconds: float  # the estimator's own time
    # bytes of the frozen transformer's storage (parameters, buffers, quantization state), before allocator rounding
    frozen_weight_bytes: int = 0
    # bytes by part at each of the four moments (`BREAKDOWN_PARTS`), summing to its reserved figure
    breakdown: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    # bytes the run keeps in host memory for its offloading, by what they are (`HOST_PARTS`)
    host_ram: dict[str, int] = dataclasses.field(default_factory=dict)
    fsdp_gpus: int = 1  # > 1: the figures are one GPU's of an FSDP2 full-shard run over this many (`shard`)

    @property
    def host_ram_gib(self) -> float:
        return gib_of(sum(self.host_ram.values()))

    @property
    def pinned_host_gib(self) -> float:
        return gib_of(sum(self.host_ram.get(part, 0) for part in PINNED_HOST_PARTS))

    @property
    def label(self) -> str:
        return run_label(self.config, self.shape, self.fsdp_gpus)

    def as_dict(self) -> dict[str, Any]:
        figures = self.memory.as_dict()
        return {"case": {**run_summary(self.config, self.shape, self.validation_shape), "fsdp_gpus": self.fsdp_gpus},
                "label": self.label,
                "bucket": "x".join(map(str, self.shape)), "memory_gib": figures,
                "trainable_parameters": self.trainable_parameters,
                "transformer_parameters": self.transformer_parameters,
                "teraflops_per_step": round(self.teraflops_per_step, 1), "estimator_seconds": round(self.seconds, 1),
                "breakdown_gib": {moment: rounded_parts(parts, figures[moment])
                                  for moment, parts in self.breakdown.items()},
                "host_ram_gib": round(self.host_ram_gib, 3), "pinned_host_gib": round(self.pinned_host_gib, 3),
                "host_ram_breakdown_gib": rounded_parts(self.host_ram, round(self.host_ram_gib, 3))}


def gib_of(nbytes: float) -> float:
    return nbytes / 1024**3


def rounded_parts(parts: dict[str, int], total_gib: float) -> dict[str, float]:
    """Parts in GiB to three decimals that sum to `total_gib` (itself rounded to three decimals): each part
    is rounded down in MiB-thousandths, and the units left go to the largest remainders."""
    ordered = [kind for kind in BREAKDOWN_PARTS + HOST_PARTS if kind in parts] + \
        sorted(kind for kind in parts if kind not in BREAKDOWN_PARTS + HOST_PARTS)
    exact = {kind: parts[kind] / 1024**3 * 1000 for kind in ordered}
    floors = {kind: int(value // 1) for kind, value in exact.items()}
    left = round(total_gib * 1000) - sum(floors.values())
    by_remainder = sorted(ordered, key=lambda kind: exact[kind] - floors[kind], reverse=True)
    for index in range(left):  # `left` is within [0, len(parts)] (the parts sum to the total before rounding)
        floors[by_remainder[index % len(by_remainder)]] += 1
    return {kind: floors[kind] / 1000 for kind in ordered}


@functools.lru_cache(maxsize=32)
def model_spec(reference: str) -> ModelSpec:
    """The spec of a preset, or of a model known by its configs (a local folder or Hub id)."""
    if reference in ALL_PRESETS:
        return ALL_PRESETS[reference]
    from cogtune.models.loading import resolve_model

    return resolve_model(reference, random_weights=True).spec


def run_summary(config: TrainConfig, shape: Shape, validation_shape: Shape | None) -> dict[str, Any]:
    """The memory-relevant settings of a run, as a table row shows them."""
    frames, height, width = shape
    memory = config.memory
    return {"model": config.model, "method": "full" if config.full else "lora", "rank": config.lora.rank,
            "target_modules": list(config.lora.target_modules), "optimizer": config.optimizer.name,
            "gradient_checkpointing": config.gradient_checkpointing, "batch_size": config.batch_size,
            "mixed_precision": config.mixed_precision, "frames": frames, "height": height, "width": width,
            "fp8": memory.base_weights == "fp8", "base_weights": memory.base_weights, "offload_blocks": memory.offload_blocks,
            "offload_activations": memory.offload_activations, "validation": validation_shape is not None,
            "validation_shape": list(validation_shape) if validation_shape else None}


def run_label(config: TrainConfig, shape: Shape, fsdp_gpus: int = 1) -> str:
    method = f"LoRA r{config.lora.rank}" if not config.full else "full"
    if fsdp_gpus > 1:
        method += f" (FSDP, {fsdp_gpus} GPUs)"
    memory = config.memory
    options = [config.optimizer.name, "ckpt" if config.gradient_checkpointing else "no ckpt"]
    options += [name for name, on in ((memory.base_weights, memory.base_weights != "bf16"),
                                      ("offload blocks", memory.offload_blocks),
                                      ("offload act.", memory.offload_activations)) if on]
    frames, height, width = shape
    return f"{config.model} {method}, {', '.join(options)}, b{config.batch_size}, {frames}x{height}x{width}"


def largest_shape(spec: ModelSpec, shapes: Sequence[Shape]) -> Shape:
    """The bucket with the most transformer tokens (then frames): the one whose step peaks highest."""
    def tokens(shape: Shape) -> tuple[int, int]:
        grid = spec.transformer_grid(*shape)
        return grid[0] * grid[1] * grid[2], shape[0]

    return max(shapes, key=tokens)


def traced_mixed_precision(config: TrainConfig, spec: ModelSpec) -> str:
    """What `--mixed-precision` resolves to on a GPU (the estimate sizes a GPU run from anywhere)."""
    if config.mixed_precision != "auto":
        return config.mixed_precision
    return {"float16": "fp16", "bfloat16": "bf16"}.get(spec.weight_dtype, "no")


def synthetic_batch(spec: ModelSpec, batch_size: int, shape: Shape) -> dict[str, Any]:
    """CPU tensors shaped as the cache loader gives them for this shape (values are irrelevant)."""
    frames, height, width = shape
    latent = (batch_size, 2 * spec.latent_channels, spec.latent_frames(frames),
              height // spec.spatial_compression, width // spec.spatial_compression)
    batch = {"latent_dist": torch.zeros(latent), "prompt_embeds": torch.zeros(batch_size, spec.max_text_tokens,
                                                                              spec.text_embed_dim)}
    if spec.is_i2v:
        image = (batch_size, 2 * spec.latent_channels, 1, latent[3], latent[4])
        batch["image_latent_dist"] = torch.zeros(image)
    return batch


def _offloaded_weight_bytes(transformer: Any) -> int:
    """Bytes that block offloading keeps off the device: frozen weights, minus the layers in flight."""
    leaf_bytes = []
    for module in transformer.modules():
        own = [p for p in module.parameters(recurse=False) if not p.requires_grad]
        if own:
            leaf_bytes.append(sum(p.numel() * p.element_size() for p in own))
    frozen = sum(leaf_bytes)
    in_flight = sum(sorted(leaf_bytes, reverse=True)[:OFFLOADED_LAYERS_ON_DEVICE])
    return max(0, frozen - in_flight)


BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes' `min_8bit_size` default: smaller tensors keep float32 state
BNB_BLOCK = 256  # elements per float32 absmax in its blockwise quantization
BNB_QMAP_BYTES = 256 * 4  # its quantization maps (signed, unsigned): float32 x 256, one of each per optimizer


def _bitsandbytes_8bit_state_bytes(trainable: list[Any]) -> int:
    """bitsandbytes' AdamW8bit state (`Optimizer2State.init_state`), each tensor a block of the CUDA allocator:
    per parameter of `BNB_MIN_8BIT_SIZE` elements or more two uint8 states and two float32 absmax vectors (one
    per block of 256), with the two shared quantization maps; per smaller parameter two float32 states."""
    total = 0
    for parameter in trainable:
        count = parameter.numel()
        if count < BNB_MIN_8BIT_SIZE:
            total += 2 * round_request(4 * count)
        else:
            total += 2 * round_request(count) + 2 * round_request(4 * -(-count // BNB_BLOCK))
    if any(p.numel() >= BNB_MIN_8BIT_SIZE for p in trainable):
        total += 2 * round_request(BNB_QMAP_BYTES)
    return total


def _optimizer_state_bytes(optimizer: str, trainable: list[Any]) -> int:
    if optimizer == "adamw-8bit":
        return _bitsandbytes_8bit_state_bytes(trainable)
    per_parameter = STATE_BYTES_PER_PARAMETER[optimizer]
    total = sum(p.numel() for p in trainable) * per_parameter
    if optimizer == "adamw-cpu-offload":  # small tensors stay on the device, with float32 AdamW state
        total += sum(p.numel() * 8 for p in trainable if p.numel() < CPU_OFFLOAD_MIN_ELEMENTS)
    return int(total)


def estimate_run(config: TrainConfig, shapes: Sequence[Shape], validation_shape: Shape | None = None,
                 steps: int = 2, exact: bool = False, observe: Observer | None = None,
                 fsdp_gpus: int = 1) -> RunEstimate:
    """Trace `steps` training steps of `config` at its largest bucket (the second step has the optimizer
    state in place) and, when `validation_shape` is given, a validation pass at that shape.

    The trace memoizes the meta kernels (see `trace`), counts FLOPs in its last step and builds the
    LoRA layers on the meta device; `exact=True` runs the full trace without these shortcuts (its own
    FLOP-counting step under torch's `FlopCounterMode`), which gives the same figures, only slower.
    `observe(transformer, tracker)`, where given, returns a context (a dispatch mode: torch's `MemTracker`
    in the tests) entered above the tracker for the training steps, so that it sees the same ops.
    `fsdp_gpus` > 1: the figures are one GPU's of an FSDP2 full-shard run over that many GPUs
    (`cogtune.train.sizing.shard`); the per-GPU batch is `config.batch_size`.
    """
    from cogtune.quiet import quiet_libraries

    _check_shardable(config, fsdp_gpus)

    quiet_libraries()
    started = time.perf_counter()
    startup.load_libraries()  # the diffusers code the trace runs (cogtune.startup: in a command, a sixth faster)
    shape, plan = _sized_run(config, shapes, validation_shape)
    transformer, compute_dtype = _traced_transformer(config, plan, exact)
    vae = None
    if validation_shape is not None:  # built untracked, counted when loaded
        memory = config.memory
        vae = _validation_vae(plan.model, compute_dtype,
                              memory.validation_tile_size if memory.validation_vae_tiling else None)
    share = None
    if fsdp_gpus > 1:
        from cogtune.train.sizing.shard import FsdpShare, gather_trainable

        gather_dtype = compute_dtype if traced_mixed_precision(config, plan.model.spec) != "no" else None
        share = FsdpShare.of(transformer, fsdp_gpus, gather_dtype)
        gather_trainable(transformer, gather_dtype)
    traced = _trace(config, plan.model, transformer, vae, shape, validation_shape, compute_dtype, steps, exact,
                    observe, share)
    return _estimate(config, tuple(shapes), shape, validation_shape, transformer, traced,
                     time.perf_counter() - started, fsdp_gpus)


def shardable(config: TrainConfig) -> bool:
    """Whether one GPU's share of `config` under FSDP is modelled (`shard`): not where weights or optimizer
    state leave the GPU another way (block or optimizer offloading), nor for a float8 or quantized base."""
    memory = config.memory
    return not (memory.offload_blocks or memory.base_weights != "bf16" or config.optimizer.name == "adamw-cpu-offload")


def _check_shardable(config: TrainConfig, fsdp_gpus: int) -> None:
    if fsdp_gpus < 1:
        raise ConfigError(f"the number of GPUs to shard over must be >= 1, got {fsdp_gpus}")
    if fsdp_gpus > 1 and not shardable(config):
        raise ConfigError("FSDP sizing covers bf16 base weights without block or optimizer offloading",
                          hint="drop --offload-blocks, --base-weights other than bf16 and adamw-cpu-offload, "
                               "or size one GPU (--fsdp-gpus 1)")


def _sized_run(config: TrainConfig, shapes: Sequence[Shape], validation_shape: Shape | None) -> tuple[Shape, Any]:
    """The bucket that decides the peak, and the run's plan (its shapes checked first)."""
    from cogtune.models.positions import needs_learned_positions_dropped
    from cogtune.train.plan import RunPlan, drops_learned_positions

    if not shapes:
        raise ModelError("no clip shape to size")
    spec = model_spec(config.model)
    named = {f"bucket {'x'.join(map(str, s))}": s for s in shapes}
    if validation_shape is not None:
        named["validation"] = validation_shape
    spec.check_clip_shapes(named)
    model = ResolvedModel(config.model, spec, "fake", None)
    drop = drops_learned_positions(config, spec, needs_learned_positions_dropped(spec, list(named.values())))
    plan = RunPlan(model, None, drop, [])  # type: ignore[arg-type]  # the cache is not used to build the model
    return largest_shape(spec, shapes), plan


def _traced_transformer(config: TrainConfig, plan: Any, exact: bool) -> tuple[Any, Any]:
    """The trainer's transformer on the meta device, and its compute dtype."""
    from cogtune.train.model import load_trainable_transformer
    from cogtune.train.sizing.trace import DEVICE

    # Block offloading is arithmetic here (its hooks move tensors between real devices); compiled kernels
    # cannot run on the meta device.
    # A quantized base is traced as float8 storage, whose layers also compute from a dequantized copy of their
    # weight (bitsandbytes' and torchao's kernels cannot run on the meta device); `_estimate` then counts the
    # quantized bytes in the place of the float8 ones (`_quantized_base_bytes`).
    base_weights = "fp8" if config.memory.quantized_base else config.memory.base_weights
    traced = dataclasses.replace(config, memory=dataclasses.replace(config.memory, offload_blocks=False,
                                                                    compile=False, base_weights=base_weights))
    # The fast path builds every tensor on the meta device from the start (peft would initialize the LoRA
    # layers on the CPU, then move them); only the finished parameters are counted, so nothing changes.
    with contextlib.nullcontext() if exact else torch.device(DEVICE):
        return load_trainable_transformer(traced, plan, DEVICE, traced_mixed_precision(config, plan.model.spec))


@dataclasses.dataclass(frozen=True)
class _Peak:
    reserved: int
    allocated: int
    parts: dict[str, int]  # what the bytes are, by `BREAKDOWN_PARTS`


@dataclasses.dataclass(frozen=True)
class _Trace:
    """What the trace saw, before the arithmetic (offloaded weights, untraced optimizer state)."""

    before_training: _Peak  # the weights loaded (current, not peak)
    training: _Peak
    with_validation: _Peak  # the training peak, or the validation pass's where it is higher
    validation_denoise_allocated: int
    validation_decode_allocated: int
    flops: float
    host_activations: int  # bytes `save_on_cpu` would copy to the host in a step
    state_share: float = 1.0  # the share of the optimizer state one GPU holds (FSDP)


class _TracedSteps:
    """The trainer's step on the meta device, its allocations tagged by what they are: `training_step`,
    its backward, the optimizer (torch's steps for real; others' state is added by its known size)."""

    def __init__(self, config: TrainConfig, model: ResolvedModel, transformer: Any, shape: Shape,
                 compute_dtype: Any, tracker: Any):
        from cogtune.models.loading import load_scheduler
        from cogtune.train.step import StepSettings

        spec = model.spec
        self.config, self.spec, self.transformer, self.tracker = config, spec, transformer, tracker
        self.compute_dtype = compute_dtype
        self.trainable = [p for p in transformer.parameters() if p.requires_grad]
        self.scheduler = load_scheduler(model)
        self.batch = synthetic_batch(spec, config.batch_size, shape)
        self.empty = torch.zeros(spec.max_text_tokens, spec.text_embed_dim)
        self.settings = StepSettings(caption_dropout=config.effective_caption_dropout,
                                     image_dropout=config.image_dropout if spec.is_i2v else 0.0)
        self.offload_activations = memory_placement(config).saved_activations_on_host
        self.optimizer = None
        self.after_backward: Callable[[], None] | None = None  # called when the backward ends (FSDP's reduction)
        self.host_activations = 0  # bytes save_on_cpu copies to the host in a traced step (all alive until backward)
        self.cast_cache: Any = None  # the step's emulated autocast cache (`gpu_semantics`)
        for block in transformer.transformer_blocks:  # a block's forward inside backward is a checkpoint's recompute
            block.register_forward_pre_hook(self._recompute_starts)
            block.register_forward_hook(self._recompute_ends, always_call=True)  # also when stopped early

    def _recompute_starts(self, *_: Any) -> None:
        if self.tracker.kind == "backward_transients":
            self.tracker.kind = "recomputed_activations"

    def _recompute_ends(self, *_: Any) -> None:
        if self.tracker.kind == "recomputed_activations":
            self.tracker.kind = "backward_transients"
            # torch.utils.checkpoint recomputes a block inside an autocast region of its own; backward runs
            # outside the forward's, so that region is the outermost, and leaving it drops autocast's cache:
            # the block's weight copies live on only as long as its backward keeps them.
            if self.cast_cache is not None:
                self.cast_cache.clear()

    def start_optimizer(self) -> None:
        """torch's optimizers step on meta tensors: their state is traced (others' is arithmetic)."""
        name = self.config.optimizer.name
        if name in TRACED_OPTIMIZERS:
            cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
            self.optimizer = cls(self.trainable, lr=1e-4, foreach=True)  # CUDA's default implementation

    def __call__(self, cast_cache: Any, traced: bool = True) -> None:
        self.forward_backward(cast_cache, traced)
        self.optimizer_step()

    def forward_backward(self, cast_cache: Any, traced: bool = True) -> None:
        from cogtune.train.sizing.trace import DEVICE, activations_offloaded_on_meta
        from cogtune.train.step import training_step

        tracker = self.tracker
        self.cast_cache = cast_cache
        generators = [torch.Generator().manual_seed(i) for i in range(self.config.batch_size)]
        host_bytes = [0] if traced else None
        offloading = activations_offloaded_on_meta(host_bytes) if self.offload_activations else contextlib.nullcontext()
        tracker.kind = "saved_activations"  # what the forward keeps (or still holds) for backward
        with offloading:
            loss = training_step(self.transformer, self.scheduler, self.spec, self.batch, self.empty, self.settings,
                                 generators, DEVICE, self.compute_dtype)
        if host_bytes is not None:
            self.host_activations = host_bytes[0]
        cast_cache.clear()  # the autocast region ends with the forward; backward runs outside it
        tracker.kind = "backward_transients"  # a checkpointed block's recompute, activation gradients
        loss.backward()
        del loss
        if self.after_backward is not None:
            self.after_backward()

    def optimizer_step(self) -> None:
        tracker = self.tracker
        tracker.kind = "optimizer_state"  # the state, and the step's own temporaries
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        else:
            for parameter in self.trainable:
                parameter.grad = None
        gc.collect()
        tracker.kind = "other"


@dataclasses.dataclass(frozen=True)
class _RecordedStep:
    """A training step's forward and backward as the tracker logged them, to replay in the next step."""

    events: list[tuple[int, int, int, str]]  # self-contained, without what the first step makes for the run
    gradients: list[tuple[Any, int, tuple[int, ...], tuple[int, ...], Any]]  # parameter, logged key, its grad's
    flops: int  # shape, stride and dtype


def _record_forward_backward(steps: _TracedSteps, cast_cache: Any) -> _RecordedStep | None:
    """The first step's forward and backward, traced and logged. The next step's make the same allocations in
    the same order (the same code on the same shapes; each starts with no gradient and no autocast copy), but
    for what the first one makes for the whole run: what it leaves allocated besides the gradients (cuBLAS's
    workspace; the scheduler's `alphas_cumprod`, which diffusers' `add_noise` moves to the device and keeps).
    None where the log is not self-contained (something allocated before is freed or re-tagged) or a
    parameter that trains has no gradient of its own."""
    tracker = steps.tracker
    tracker.log, tracker.flops = [], 0
    try:
        steps.forward_backward(cast_cache)
        events, flops = tracker.log, tracker.flops
    finally:
        tracker.log, tracker.flops = None, None
    left: dict[int, tuple[str, list[int]]] = {}  # key -> kind, and the positions of its events, of what is alive
    for position, (op, key, _, kind) in enumerate(events):
        if op == 0:
            left[key] = (kind, [position])  # (a storage's key is its id: a later one may reuse it)
        elif key not in left:
            return None
        elif op == 1:
            del left[key]
        else:
            left[key] = (kind, [*left[key][1], position])
    gradients = []
    for parameter in steps.trainable:
        grad = parameter.grad
        key = id(grad.untyped_storage()) if grad is not None else None
        if left.pop(key, ("", []))[0] != "gradients":
            return None
        gradients.append((parameter, key, tuple(grad.shape), grad.stride(), grad.dtype))
    once = {position for _, positions in left.values() for position in positions}  # made for the run: kept
    return _RecordedStep([event for position, event in enumerate(events) if position not in once], gradients, flops)


def _replay_forward_backward(steps: _TracedSteps, recorded: _RecordedStep) -> None:
    """The next step's forward and backward: the recorded allocations replayed into the allocator's model, and
    each parameter given a gradient (meta, untracked) that holds its replayed block."""
    from cogtune.train.sizing.trace import DEVICE

    tracker = steps.tracker
    keys = tracker.replay_log(recorded.events)
    for parameter, key, shape, stride, dtype in recorded.gradients:
        with torch._C._DisableTorchDispatch():
            grad = torch.empty_strided(shape, stride, dtype=dtype, device=DEVICE)
        tracker.hold(grad, keys[key])
        parameter.grad = grad
    tracker.flops = recorded.flops if tracker.flops is None else tracker.flops + recorded.flops


def _peak_of(tracker: Any, current: bool = False) -> _Peak:
    """The tracker's peak since its last reset (`current`: what is live now); with a `share`, one sharded
    GPU's (its own allocator's)."""
    if tracker.share is not None:
        return _Peak(*tracker.share.peak(current))
    allocator = tracker.allocator
    if current:
        return _Peak(allocator.reserved, allocator.allocated, tracker.current_breakdown())
    return _Peak(allocator.peak_reserved, allocator.peak_allocated, tracker.peak_breakdown())


def _trace(config: TrainConfig, model: ResolvedModel, transformer: Any, vae: Any, shape: Shape,
           validation_shape: Shape | None, compute_dtype: Any, steps: int, exact: bool,
           observe: Observer | None = None, share: Any = None) -> _Trace:
    """The allocations of loading, `steps` training steps and the validation pass, replayed into the
    caching allocator's model (`share`: as one GPU of an FSDP run holds them)."""
    from cogtune.train.sizing.trace import AllocationTracker, gpu_semantics

    tracker = AllocationTracker(memoize=not exact)
    tracker.share = share
    # In the order a run allocates them: the loaded weights, then the LoRA layers peft adds.
    parameters = list(transformer.named_parameters())
    tracker.adopt([p for name, p in parameters if "lora_" not in name] + list(transformer.buffers()))
    tracker.adopt([p for name, p in parameters if "lora_" in name])
    before_training = _peak_of(tracker, current=True)
    train_step = _TracedSteps(config, model, transformer, shape, compute_dtype, tracker)
    for parameter in train_step.trainable:  # a gradient is one once accumulated into `.grad`
        parameter.register_post_accumulate_grad_hook(lambda p: tracker.retag(p.grad, "gradients"))
    if share is not None:  # after the hook above: FSDP holds a gradient unsharded until its block is done
        train_step.after_backward = share.follow_blocks(transformer, tracker)

    with _young_garbage_only(not exact), tracker, gpu_semantics(compute_dtype) as cast_cache:
        cast_cache.tag = lambda copy: tracker.retag(copy, "autocast_weight_copies")
        with observe(transformer, tracker) if observe is not None else contextlib.nullcontext():
            train_step.start_optimizer()
            # The fast path traces the first step's forward and backward and replays them in later steps (an
            # observer watches every op; a sharded GPU's model is fed as blocks compute: both trace each step).
            recorded = None
            for index in range(steps):
                if not exact and index == steps - 1:
                    tracker.flops = 0  # the last step, with the optimizer state in place, is counted
                if recorded is not None:
                    _replay_forward_backward(train_step, recorded)
                elif not exact and index == 0 and steps > 1 and observe is None and share is None:
                    recorded = _record_forward_backward(train_step, cast_cache)
                else:
                    train_step.forward_backward(cast_cache)
                train_step.optimizer_step()
        flop_count = tracker.flops
        tracker.flops = None
        training = with_validation = _peak_of(tracker)
        denoise = decode = _Peak(0, 0, {})
        if validation_shape is not None:
            tracker.reset_peaks()
            denoise, decode = _trace_validation(model, transformer, vae, config, validation_shape, compute_dtype,
                                                tracker, cast_cache, replay=not exact)
            highest = max(training, denoise, decode, key=lambda peak: peak.reserved)
            with_validation = _Peak(max(training.reserved, denoise.reserved, decode.reserved),
                                    max(training.allocated, denoise.allocated, decode.allocated), highest.parts)
        cast_cache.tag = None

    if exact:  # torch's own counter, in a step of its own (it keeps tensors alive)
        counter = FlopCounterMode(display=False)
        with counter, gpu_semantics(compute_dtype) as cast_cache:
            train_step(cast_cache, traced=False)
        flop_count = counter.get_total_flops()
    return _Trace(before_training, training, with_validation, denoise.allocated, decode.allocated, flop_count,
                  train_step.host_activations, share.element_share if share is not None else 1.0)


def _estimate(config: TrainConfig, shapes: tuple[Shape, ...], shape: Shape, validation_shape: Shape | None,
              transformer: Any, traced: _Trace, seconds: float, fsdp_gpus: int = 1) -> RunEstimate:
    """The estimate: the trace with the arithmetic applied (`memory_placement`'s offloaded weights off the
    device, the state of optimizers whose step is not traced added) and the host memory it keeps."""
    from cogtune.train.sizing.trace import gib

    placement = memory_placement(config)
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    offloaded = _offloaded_weight_bytes(transformer) if placement.frozen_weights_on_host else 0
    requantized = _quantized_base_bytes(config)
    offloaded -= requantized  # from here on: frozen weight bytes the trace counted that are not on the device
    optimizer_name = config.optimizer.name
    extra_state = 0 if optimizer_name in TRACED_OPTIMIZERS else _optimizer_state_bytes(optimizer_name, trainable)
    extra_state = round(extra_state * traced.state_share)
    shift = extra_state - offloaded  # state the trace did not see; weights that would not be on the device
    validated = validation_shape is not None
    figures = MemoryFigures(
        before_training=gib(traced.before_training.reserved - offloaded),
        before_validation=gib(traced.training.reserved + shift),
        after_validation=gib(traced.with_validation.reserved + shift),
        after_testing=gib(traced.with_validation.reserved + shift),
        allocated_before_training=gib(traced.before_training.allocated - offloaded),
        allocated_peak_training=gib(traced.training.allocated + shift),
        allocated_peak=gib(traced.with_validation.allocated + shift),
        validation_denoise=gib(traced.validation_denoise_allocated + shift) if validated else 0.0,
        validation_decode=gib(traced.validation_decode_allocated + shift) if validated else 0.0,
    )
    training_breakdown = _shifted(traced.training.parts, offloaded, extra_state)
    validation_breakdown = _shifted(traced.with_validation.parts, offloaded, extra_state)
    breakdown = {"before_training": _shifted(traced.before_training.parts, offloaded, 0),
                 "before_validation": training_breakdown, "after_validation": validation_breakdown,
                 "after_testing": validation_breakdown}
    blocks = _pinned_block_bytes(transformer, model_spec(config.model)) if placement.frozen_weights_on_host else 0
    host = {"offloaded_blocks": blocks,
            "offloaded_activations": traced.host_activations if placement.saved_activations_on_host else 0,
            **_cpu_optimizer_host_bytes(trainable, placement.optimizer_on_host)}
    storages = [t.untyped_storage() for t in [*transformer.parameters(), *transformer.buffers()] if not t.requires_grad]
    frozen = {id(storage): storage.nbytes() for storage in storages}  # each once (all alive: ids are distinct)
    return RunEstimate(
        config=config, shapes=shapes, shape=shape, validation_shape=validation_shape, memory=figures,
        frozen_weight_bytes=sum(frozen.values()) + requantized,
        trainable_parameters=sum(p.numel() for p in trainable),
        transformer_parameters=sum(p.numel() for name, p in transformer.named_parameters() if "lora_" not in name),
        teraflops_per_step=traced.flops / 1e12, seconds=seconds, breakdown=breakdown, host_ram=host,
        fsdp_gpus=fsdp_gpus,
    )


def _quantized_base_bytes(config: TrainConfig) -> int:
    """What a quantized base holds more than the float8 storage it was traced as (negative: less)."""
    from cogtune.models.quantize import quantized_linears_bytes

    kind = config.memory.base_weights
    if not config.memory.quantized_base:
        return 0
    spec = model_spec(config.model)
    return quantized_linears_bytes(spec, kind, config.memory.nf4_backend) - quantized_linears_bytes(spec, "fp8")


def _shifted(parts: dict[str, int], offloaded: int, extra_state: int) -> dict[str, int]:
    """A traced breakdown with the arithmetic applied: block offloading's weights off the device, the state
    of optimizers whose step is not traced added."""
    parts = dict(parts)
    if offloaded:
        parts["frozen_weights"] = parts.get("frozen_weights", 0) - offloaded
    if extra_state:
        parts["optimizer_state"] = parts.get("optimizer_state", 0) + extra_state
    return {kind: size for kind, size in parts.items() if size or kind == "allocator_slack"}


def _pinned_block_bytes(transformer: Any, spec: ModelSpec) -> int:
    """Host bytes of block offloading: diffusers' group offloading pins a copy of every frozen parameter
    and every buffer of the transformer, one request each (made when the hooks go on: in the model's
    dtype, before float8 storage), the two layers in flight included."""
    from cogtune.models.loading import torch_dtype

    base = torch_dtype(spec.weight_dtype).itemsize
    tensors = [p for p in transformer.parameters() if not p.requires_grad] + list(transformer.buffers())
    return sum(pinned_block(t.numel() * (base if t.is_floating_point() else t.element_size())) for t in tensors)


def _cpu_optimizer_host_bytes(trainable: list[Any], on_host: bool) -> dict[str, int]:
    """torchao's `CPUOffloadOptimizer` pins, for each trainable tensor of `CPU_OFFLOAD_MIN_ELEMENTS` or
    more, a host copy of the parameter and one of its gradient (`cpu_optimizer`); AdamW keeps its two
    states (exp_avg, exp_avg_sq) of those copies in ordinary host memory (`cpu_optimizer_state`)."""
    offloaded = [p.numel() * p.element_size() for p in trainable if p.numel() >= CPU_OFFLOAD_MIN_ELEMENTS]
    if not on_host:
        offloaded = []
    return {"cpu_optimizer": sum(2 * pinned_block(size) for size in offloaded),
            "cpu_optimizer_state": sum(2 * size for size in offloaded)}


@contextlib.contextmanager
def _young_garbage_only(enabled: bool):
    """Exempt the objects that exist now from the garbage collector while tracing: the steps' own
    `gc.collect()` then only visits what the trace creates (the same garbage, found far faster).

    The garbage there is now is exempted with the rest, and collected once the trace ends: no storage the
    tracker counts is in it (it counts the live model's weights, and what the trace creates), so the figures
    are the same, without a full collection first (about half a second: every object of torch, diffusers and
    transformers is visited). Where the caller froze objects already (`cogtune.startup` freezes what a
    command's imports made), those stay exempt and nothing more is frozen: the collector cannot unfreeze
    a part, and what the caller made since is little."""
    if not enabled or gc.get_freeze_count() > 0:
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _validation_vae(model: ResolvedModel, compute_dtype: Any, tile: tuple[int, int] | None):
    from cogtune.models.loading import load_vae
    from cogtune.train.sizing.trace import DEVICE

    vae = load_vae(model, dtype=compute_dtype, device=DEVICE)
    if tile is not None:  # as the trainer's validation
        vae.enable_tiling(tile_sample_min_height=tile[0], tile_sample_min_width=tile[1])
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


def _replay_blocks(blocks: Any, tracker: Any, cast_cache: Any) -> None:
    """Calls of identical blocks (the transformer's, the VAE decoder's resnets) without autograd replay the
    first one's allocations (`trace.ReplayedCalls`, one recording for all blocks): keyed by the block's
    tensors' description, each with whether autocast's cache holds a copy of it (a block that casts a
    weight afresh keeps the copy in the cache: such a call is not replayed)."""
    from cogtune.train.sizing.trace import ReplayedCalls, describe_tensors

    recorded: dict[Any, Any] = {}
    for block in blocks:
        tensors = [*block.parameters(), *block.buffers()]
        state = functools.partial(describe_tensors, tensors, cast_cache)
        block.forward = ReplayedCalls(tracker, block.forward, recorded, state)


def _trace_validation(model: ResolvedModel, transformer: Any, vae: Any, config: TrainConfig, shape: Shape,
                      compute_dtype: Any, tracker: Any, cast_cache: Any, replay: bool = True) -> tuple[_Peak, _Peak]:
    """One denoising step of the real pipeline (under autocast; a classifier-free guidance batch when the
    guidance is above 1) and the VAE decode (outside it), as `generate_videos` runs them. `replay`: the
    decoder's calls on tiles (and frame batches) of a shape already decoded replay its allocations
    (`trace.ReplayedCalls`), the same figures in a fraction of the time.

    Returns the peaks of the denoising step and of the decode.
    """
    from cogtune.models.loading import build_pipeline
    from cogtune.train.sizing.trace import DEVICE, ReplayedCalls
    from cogtune.train.validation import validation_feed_forward_chunks

    spec = model.spec
    tracker.release_cached()  # the validator empties the cache before the pass
    tracker.adopt(list(vae.parameters()) + list(vae.buffers()), "vae_weights")  # loaded for the pass
    if replay:
        vae.decoder.forward = ReplayedCalls(tracker, vae.decoder.forward)
        vae.blend_h, vae.blend_v = ReplayedCalls(tracker, vae.blend_h), ReplayedCalls(tracker, vae.blend_v)
        _replay_blocks(transformer.transformer_blocks, tracker, cast_cache)
        _replay_blocks([module for module in vae.decoder.modules() if type(module).__name__ == "CogVideoXResnetBlock3D"],
                       tracker, cast_cache)
    pipe = build_pipeline(model, transformer=transformer, vae=vae, text_encoder=None, tokenizer=None,
                          scheduler=_shape_only_scheduler(model))
    frames, height, width = shape
    tracker.kind = "validation_denoise"
    embeds = torch.zeros(1, spec.max_text_tokens, spec.text_embed_dim).to(DEVICE, compute_dtype)
    kwargs: dict[str, Any] = dict(prompt_embeds=embeds, negative_prompt_embeds=embeds, num_frames=frames,
                                  height=height, width=width, num_inference_steps=1,
                                  guidance_scale=config.validation.guidance, output_type="latent",
                                  max_sequence_length=spec.max_text_tokens)
    if spec.is_i2v:
        kwargs["image"] = Image.new("RGB", (width, height))
    with torch.no_grad():
        tracker.kind = "validation_denoise"
        with validation_feed_forward_chunks(transformer, config):  # as the validator
            latents = pipe(**kwargs).frames[:, spec.padded_latent_frames(frames) - spec.latent_frames(frames):]
        denoise = _peak_of(tracker)
        tracker.release_cached()  # generate_videos empties the cache before the decode
        tracker.reset_peaks()
        tracker.kind = "validation_decode"
        with cast_cache.outside_autocast():
            pipe.decode_latents(latents.to(vae.dtype))
        tracker.kind = "other"
        return denoise, _peak_of(tracker)
