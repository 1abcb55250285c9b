"""One GPU's share of an FSDP2 full-shard run, sized from the one-process trace.

cogtune's FSDP launches (`cogtune config accelerate --strategy fsdp`) shard with FSDP2's
`fully_shard`: each `CogVideoXBlock` is one unit and the transformer (its embeddings, final norm and
projection) is the root unit; parameters are gathered in the autocast dtype and gradients reduced in it
(accelerate's `MixedPrecisionPolicy(param_dtype=..., reduce_dtype=...)`), blocks reshard after their
forward, the root does not. The trace stays a one-process trace (FSDP2 cannot run on the meta device,
where the estimator traces), of the module FSDP2 computes with: its trainable parameters in the gather
dtype, as FSDP2's unsharded parameters are (`gather_trainable`), so that gradients are accumulated as
the backward makes them, with no float32 master copy or autocast cast in between. One GPU's share is
arithmetic over what it allocates: every allocation and free of the trace is replayed, at one GPU's
size, into a model of that GPU's caching allocator of its own (`FsdpShare`), with FSDP2's buffers
allocated and freed as the blocks compute, so that the instant one GPU's memory peaks is found (not
the one-process peak's: with the gradients divided, the instant with the most activations alive
wins) and its reserved memory is that allocator's. What each traced tensor is on one GPU:

- trainable and frozen weights, gradients and optimizer state: each GPU holds its shard of each
  parameter in the parameter's own dtype (FSDP2 splits dim 0 into N chunks of ceil(rows / N) rows,
  padded; the first GPU holds full chunks, so its share is the largest): float32 for the trainable
  ones, whose traced bytes are in the gather dtype; buffers are not sharded;
- autocast's weight copies: none (the gathered parameters are in the autocast dtype already);
- `gathered_weights`: from the forward until the backward ends, the root's gathered parameters; while a
  block computes, its own and those of the block after it (in the backward, before it), whose
  all-gather FSDP2 issues ahead to overlap it, where there is one (`follow_blocks` tells which block
  computes);
- `gradient_buffers`: in the backward, the unsharded gradients: the computing block's (as the trace
  accumulates them) and the root's (reduced at the end), and the reduce-scatter input of the block
  computed before it (kept until the next reduce-scatter is issued); a block's gradients become its
  shard (`gradients`) once its backward is done;
- activations, workspaces and everything else: per GPU as traced (the per-process batch).

A traced tensor's share is its bytes times its kind's share of the whole (not its own rows' padding:
exact where every parameter's rows divide by N, as CogVideoX's base weights' do for N a power of
two up to 16; a LoRA's A matrices have as many rows as its rank). Left
out: NCCL's own buffers (outside the caching allocator), the all-gather input copies (a shard each,
briefly), and that the optimizer step's temporaries are traced in the gather dtype (scaled as float32
state). FSDP's gathered parameters and buffers are each one block of the allocator (as FSDP2's flat
all-gather output is); its per-parameter views and copies are not modelled apart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from cogtune.train.sizing.allocator import CachingAllocatorModel

# The parts a sharded GPU has that a one-process run has not.
SHARDED_PARTS = ("gathered_weights", "gradient_buffers")
_FORWARD_KINDS = ("saved_activations", "validation_denoise")
_BACKWARD_KINDS = ("backward_transients", "recomputed_activations")


def shard_bytes(tensor: Any, gpus: int) -> int:
    """Bytes of the first GPU's shard of a parameter: ceil(rows / gpus) rows (FSDP2's padded dim-0 chunk)."""
    if tensor.dim() == 0:
        return tensor.element_size()
    rows = tensor.shape[0]
    return -(-rows // gpus) * (tensor.numel() // max(rows, 1)) * tensor.element_size()


def gathered_bytes(parameters: list[Any], gpus: int, dtype: torch.dtype | None) -> int:
    """Bytes of a unit's all-gather output: every parameter padded to `gpus` chunks, in the gather dtype."""
    total = 0
    for parameter in parameters:
        size = dtype.itemsize if dtype is not None and parameter.is_floating_point() else parameter.element_size()
        rows = parameter.shape[0] if parameter.dim() else 1
        total += -(-rows // gpus) * gpus * (parameter.numel() // max(rows, 1)) * size
    return total


class FsdpShare:
    """One GPU of a model sharded over `gpus` GPUs: its own model of the caching allocator, fed with the
    trace's allocations at their share (`scale`) and with FSDP2's buffers in flight, and its parts."""

    def __init__(self, gpus: int, scale: dict[str, float], element_share: float, root_bytes: int,
                 block_bytes: int, block_gradient_bytes: int, blocks: int) -> None:
        self.gpus = gpus
        self.scale = scale  # per traced kind: one GPU's bytes per traced byte
        self.element_share = element_share  # the share of the trainable elements (optimizer state by arithmetic)
        self.root_bytes = root_bytes  # the root unit's gathered parameters
        self.block_bytes = block_bytes  # the largest block's gathered parameters
        self.block_gradient_bytes = block_gradient_bytes  # its reduce-scatter input (the trainable ones' gradients)
        self.blocks = blocks
        self.forward_block: int | None = None  # the block the forward computes (None: the root's own layers)
        self.backward_block: int | None = None  # the block whose gradients the backward computes
        self.allocator = CachingAllocatorModel()
        self.parts: dict[str, int] = {}  # allocated bytes by kind, as this GPU's allocator keeps them
        self.requested: dict[str, int] = {}  # the tensors' own bytes by kind (what torch's trackers count)
        self._blocks: dict[int, tuple[str, int, int]] = {}  # key -> (kind, block bytes, requested bytes)
        self._flight: dict[str, int] = {}  # in-flight kind -> bytes
        self._peak_parts: dict[str, int] = {}
        self._peak_requested: dict[str, int] = {}
        self._peak_allocated = 0
        self._reserved_at_peak = 0

    @classmethod
    def of(cls, transformer: Any, gpus: int, gather_dtype: torch.dtype | None) -> FsdpShare:
        blocks = list(transformer.transformer_blocks)
        in_blocks = {id(p) for block in blocks for p in block.parameters()}
        parameters = list(transformer.parameters())
        trainable = [p for p in parameters if p.requires_grad]
        frozen = [p for p in parameters if not p.requires_grad]
        buffers = sum(b.numel() * b.element_size() for b in transformer.buffers())

        def share(tensors: list[Any], whole: int = 0, traced_itemsize: int | None = None) -> float:
            traced = sum(t.numel() * (traced_itemsize or t.element_size()) for t in tensors) + whole
            return (sum(shard_bytes(t, gpus) for t in tensors) + whole) / traced if traced else 1.0

        trainable_share = share(trainable, traced_itemsize=gather_dtype.itemsize if gather_dtype else None)
        scale = {"trainable_weights": trainable_share, "gradients": trainable_share,
                 "optimizer_state": trainable_share, "frozen_weights": share(frozen, buffers),
                 "autocast_weight_copies": 0.0}
        root = [p for p in parameters if id(p) not in in_blocks]
        block = max((gathered_bytes(list(b.parameters()), gpus, gather_dtype) for b in blocks), default=0)
        gradients = max((gathered_bytes([p for p in b.parameters() if p.requires_grad], gpus, gather_dtype)
                         for b in blocks), default=0)
        return cls(gpus, scale, share(trainable), gathered_bytes(root, gpus, gather_dtype), block, gradients,
                   len(blocks))

    # --- the trace's allocations, at their share ---------------------------------------------------
    def malloc(self, key: int, nbytes: int, kind: str, phase: str) -> None:
        self._follow_flight(phase)
        self._malloc(key, round(nbytes * self.scale.get(kind, 1.0)), kind)

    def free(self, key: int) -> None:
        found = self._blocks.pop(key, None)
        if found is not None:
            self.allocator.free(key)
            self.parts[found[0]] -= found[1]
            self.requested[found[0]] -= found[2]

    def retag(self, key: int, nbytes: int, kind: str, phase: str) -> None:
        """A traced tensor is now of `kind`: its share is another (a reduced gradient is a new, sharded one)."""
        self.free(key)
        self.malloc(key, nbytes, kind, phase)

    def _malloc(self, key: int, size: int, kind: str) -> None:
        if size <= 0:
            return
        allocator = self.allocator
        before = allocator.allocated
        allocator.malloc(key, size)
        block = allocator.allocated - before
        self._blocks[key] = (kind, block, size)
        self.parts[kind] = self.parts.get(kind, 0) + block
        self.requested[kind] = self.requested.get(kind, 0) + size
        if allocator.allocated > self._peak_allocated:
            self._snapshot()

    def _snapshot(self) -> None:
        self._peak_parts, self._peak_requested = dict(self.parts), dict(self.requested)
        self._peak_allocated, self._reserved_at_peak = self.allocator.allocated, self.allocator.reserved

    def _follow_flight(self, phase: str) -> None:
        """FSDP2's buffers for the block computing now: freed and allocated as they change."""
        flight = self.in_flight(phase)
        if flight == self._flight:
            return
        for number, kind in enumerate(SHARDED_PARTS):
            key = -1 - number  # apart from the trace's keys (storage ids, positive)
            if flight.get(kind, 0) != self._flight.get(kind, 0):
                self.free(key)
                self._malloc(key, flight.get(kind, 0), kind)
        self._flight = flight

    def reset_peaks(self) -> None:
        self.allocator.reset_peaks()
        self._snapshot()

    def release_cached(self) -> None:
        self.allocator.release_cached()

    def peak(self, current: bool = False) -> tuple[int, int, dict[str, int]]:
        """(reserved, allocated, parts) at the peak since `reset_peaks` (`current`: now); the parts sum to
        the reserved bytes, with `allocator_slack` and `reserved_after_peak` as the tracker's."""
        allocator = self.allocator
        if current:
            parts = {kind: size for kind, size in self.parts.items() if size}
            parts["allocator_slack"] = allocator.reserved - allocator.allocated
            return allocator.reserved, allocator.allocated, parts
        parts = {kind: size for kind, size in self._peak_parts.items() if size}
        parts["allocator_slack"] = self._reserved_at_peak - self._peak_allocated
        later = allocator.peak_reserved - self._reserved_at_peak
        if later:
            parts["reserved_after_peak"] = later
        return allocator.peak_reserved, self._peak_allocated, parts

    def peak_requested(self) -> dict[str, int]:
        """The tensors' own bytes by kind at the same instant as `peak` (before the allocator's rounding)."""
        return {kind: size for kind, size in self._peak_requested.items() if size}

    def in_flight(self, phase: str) -> dict[str, int]:
        """What FSDP2 holds besides the shards while the trace is in `phase` (the tracker's kind)."""
        block = self.block_bytes
        if phase in _FORWARD_KINDS:
            index = self.forward_block
            blocks = 0 if index is None else 1 + (index + 1 < self.blocks)
            return {"gathered_weights": self.root_bytes + blocks * block}
        if phase in _BACKWARD_KINDS:
            index = self.backward_block
            blocks = 0 if index is None else 1 + (index > 0)
            reducing = int(index is not None and index + 1 < self.blocks)
            return {"gathered_weights": self.root_bytes + blocks * block,
                    "gradient_buffers": reducing * self.block_gradient_bytes}
        return {}

    def follow_blocks(self, transformer: Any, tracker: Any) -> Callable[[], None]:
        """Hooks that keep `forward_block` and `backward_block` up to date, and tag each gradient the
        trace accumulates as an unsharded one (`gradient_buffers`) until its block's backward is done.
        Returns what to call when the backward ends (the root's gradients are reduced then)."""
        unsharded: list[Any] = []

        def backward_started() -> bool:  # a block's forward in the backward is a checkpoint's recompute
            return tracker.kind in _BACKWARD_KINDS

        def accumulated(parameter: Any) -> None:
            tracker.retag(parameter.grad, "gradient_buffers")
            unsharded.append(parameter)

        def reduced(block: int | None) -> None:  # the gradients so far are sharded, but for the root's
            kept = [p for p in unsharded if id(p) in root]
            for parameter in unsharded:
                if id(parameter) not in root:
                    tracker.retag(parameter.grad, "gradients")
            unsharded[:] = [] if block is None else kept
            self.backward_block = block

        blocks = list(transformer.transformer_blocks)
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        root = {id(p) for p in transformer.parameters() if id(p) not in in_blocks}
        for parameter in transformer.parameters():
            if parameter.requires_grad:
                parameter.register_post_accumulate_grad_hook(accumulated)

        def before(index: int) -> None:
            if not backward_started():
                self.forward_block = index
                self.backward_block = None

        def after(index: int, output: Any) -> None:
            if backward_started():
                return
            self.forward_block = None if index + 1 == self.blocks else index
            hidden = output[0] if isinstance(output, tuple) else output
            if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(lambda _: reduced(index))

        for index, block in enumerate(transformer.transformer_blocks):
            block.register_forward_pre_hook(lambda *_, index=index: before(index))
            block.register_forward_hook(lambda _, __, output, index=index: after(index, output))
        return lambda: reduced(None)


def gather_trainable(transformer: Any, gather_dtype: torch.dtype | None) -> None:
    """The trainable parameters in the gather dtype, as FSDP2's unsharded parameters compute (the master
    weights are the shards, `FsdpShare.scale`)."""
    if gather_dtype is None:
        return
    for parameter in transformer.parameters():
        if parameter.requires_grad and parameter.is_floating_point():
            parameter.data = parameter.data.to(gather_dtype)
