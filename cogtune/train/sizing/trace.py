"""Tracing the real training code on the meta device, as a GPU would run it.

The trainer's own functions run on meta tensors (shapes and dtypes, no data), under a dispatch
mode that feeds every tensor storage created on the meta device into the allocator model, and frees
it when the storage dies. Three things differ between a meta run and a GPU run, and are emulated:

- autocast: it does not engage on meta tensors, so `gpu_semantics` casts the inputs of the ops
  autocast runs in low precision (linear, conv) and upcasts those it runs in float32 (layer and
  group norms), keeping the cast copies of float32 weights for the forward as autocast's cache does
  (and, in backward, for one checkpointed block's recompute: its own autocast region, the outermost);
- attention: `F.scaled_dot_product_attention` becomes the flash-attention kernel the GPU picks for
  bf16/fp16 (no sequence x sequence matrix), whose backward also takes a float32 `dq` accumulator;
- the cuBLAS workspace, taken once through the allocator at the first matmul.

The tracker also says what the memory is: every allocation carries a kind (the tracker's current
`kind`, or one given when adopting or re-tagging a tensor: frozen or trainable weights, gradients,
optimizer state, workspaces, ...), running totals per kind are kept, and each time allocated memory
reaches a new high the totals are copied (a dict of a dozen ints). Reserved memory only grows during
a phase (segments are cached, not returned), so what its peak holds is told at the fullest instant:
`peak_breakdown()` is the bytes allocated by kind at the instant allocated memory peaks, the
allocator's slack at that instant (reserved minus allocated: cached free blocks, rounding), and the
segments the allocator reserves after it (small ones, for the optimizer step's temporaries), summing
to the peak reserved figure exactly. Snapshotting when reserved memory last grows instead would tell
the instant of the last segment added (say, in the optimizer step, when the activations are freed):
their memory would then read as slack.
"""

from __future__ import annotations

import contextlib
import functools
import re
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.flop_counter import FlopCounterMode

from cogtune.train.sizing.allocator import CachingAllocatorModel, pinned_block

DEVICE = torch.device("meta")
CUBLAS_WORKSPACE_BYTES = 32 << 20  # Hopper's default cuBLAS workspace (`CUBLAS_WORKSPACE_CONFIG`)
_FLASH_BACKWARD = "aten._scaled_dot_product_flash_attention_backward"
_MATMULS = {"aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten._scaled_dot_product_flash_attention",
            "aten.convolution"}


class AllocationTracker(TorchDispatchMode):
    """Replays the meta-device allocations of the code it wraps into a `CachingAllocatorModel`."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """No torch.compile runs under the trace: `__torch_dispatch__` is not wrapped in Dynamo's off switch
        (torch's documented opt-out; the wrapper costs about half a microsecond on every op)."""
        return False

    def __init__(self, memoize: bool = True) -> None:
        super().__init__()
        self.memoize = memoize
        self.allocator = CachingAllocatorModel()
        self._live: set[int] = set()
        self._watch: dict[int, weakref.ref] = {}
        self._next_key = 1 << 48  # keys for workspaces, distinct from storage ids
        self._cublas = False
        self.flops: int | None = None  # FLOPs of the ops traced while an int (torch's FlopCounterMode's count)
        self.kind = "other"  # the kind of what is allocated now (set by the code driving the trace)
        self.parts: dict[str, int] = {}  # allocated bytes live now, by kind (blocks, as the allocator keeps them)
        self.requested: dict[str, int] = {}  # the tensors' own bytes live now, by kind (what torch's MemTracker counts)
        self._kinds: dict[int, str] = {}
        self._sizes: dict[int, tuple[int, int]] = {}  # block and requested bytes
        self._peak_parts: dict[str, int] = {}  # at the fullest instant: bytes allocated by kind,
        self._peak_requested: dict[str, int] = {}
        self._recording: _Recording | None = None  # the allocations of a call being recorded (`ReplayedCalls`)
        self._held: dict[int, int] = {}  # id of a storage made by a replay -> its replayed block's key
        self._peak_allocated = 0  # their sum,
        self._reserved_at_peak = 0  # and the reserved bytes then
        self.share: Any = None  # an `FsdpShare` (one GPU of a sharded run), fed every allocation and free
        # while a list: every allocation, free and re-tag, as (0 | 1 | 2, key, bytes, kind) (`replay_log`)
        self.log: list[tuple[int, int, int, str]] | None = None

    def adopt(self, tensors: Any, kind: str | None = None) -> None:
        """Count tensors that exist already (weights loaded before tracing); by default of kind
        `trainable_weights` or `frozen_weights`, as they require gradients or not."""
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and tensor.device == DEVICE:
                self._track(tensor, kind or ("trainable_weights" if tensor.requires_grad else "frozen_weights"))

    def _track(self, tensor: torch.Tensor, kind: str | None = None) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._live:
            return
        self._live.add(key)
        self._malloc(key, storage.nbytes(), kind or self.kind)
        # freed when the storage dies (a weak reference's callback: `weakref.finalize` costs more)
        self._watch[key] = weakref.ref(storage, lambda _, key=key: self._release(key))

    def _malloc(self, key: int, nbytes: int, kind: str) -> None:
        allocator = self.allocator
        before = allocator.allocated
        allocator.malloc(key, nbytes)
        size = allocator.allocated - before  # the block, rounded (and unsplit remainders) as the allocator keeps it
        self._kinds[key] = kind
        self._sizes[key] = (size, nbytes)
        parts, requested = self.parts, self.requested
        parts[kind] = parts.get(kind, 0) + size
        requested[kind] = requested.get(kind, 0) + nbytes
        if self._recording is not None:
            self._recording.malloc(key, nbytes, kind)
        if self.log is not None:
            self.log.append((0, key, nbytes, kind))
        if allocator.allocated > self._peak_allocated:
            self._snapshot()
        if self.share is not None:
            self.share.malloc(key, nbytes, kind, self.kind)

    def replay(self, events: list[tuple[bool, int, int, str]]) -> dict[int, int]:
        """Allocate and free as `events` say ((malloc?, the call's own index, bytes, kind), a `_Recording`'s);
        returns the keys of the blocks left allocated, by index. The same as `_malloc` and `_free` event by
        event, in one loop (a decode replays hundreds of thousands of events)."""
        keys: dict[int, int] = {}
        if self.share is not None or self._recording is not None:
            for is_malloc, index, nbytes, kind in events:
                if is_malloc:
                    keys[index] = key = self._next_key
                    self._next_key += 1
                    self._malloc(key, nbytes, kind)
                else:
                    self._free(keys.pop(index))
            return keys
        allocator, parts, requested = self.allocator, self.parts, self.requested
        malloc, free = allocator.malloc, allocator.free
        blocks: dict[int, tuple[int, str, int, int]] = {}  # index -> key, kind, block and requested bytes
        key = self._next_key
        for is_malloc, index, nbytes, kind in events:
            if is_malloc:
                before = allocator.allocated
                malloc(key, nbytes)
                size = allocator.allocated - before
                blocks[index] = (key, kind, size, nbytes)
                key += 1
                parts[kind] = parts.get(kind, 0) + size
                requested[kind] = requested.get(kind, 0) + nbytes
                if allocator.allocated > self._peak_allocated:
                    self._snapshot()
            else:
                freed, kind, size, nbytes = blocks.pop(index)
                free(freed)
                parts[kind] -= size
                requested[kind] -= nbytes
        self._next_key = key
        for index, (key, kind, size, nbytes) in blocks.items():  # left allocated: tracked as `_malloc` does
            self._kinds[key] = kind
            self._sizes[key] = (size, nbytes)
            keys[index] = key
        return keys

    def replay_log(self, events: list[tuple[int, int, int, str]]) -> dict[int, int]:
        """Allocate, free and re-tag as a `log` says, under new keys, as `_malloc`, `_free` and `retag` do; the
        events must be self-contained (each free and re-tag of a block allocated among them). Returns the
        logged key -> new key of the blocks left allocated."""
        keys: dict[int, int] = {}
        for op, key, nbytes, kind in events:
            if op == 0:
                keys[key] = self._next_key
                self._next_key += 1
                self._malloc(keys[key], nbytes, kind)
            elif op == 1:
                self._free(keys.pop(key))
            else:
                self._retag_key(keys[key], kind)
        return keys

    def hold(self, tensor: torch.Tensor, key: int) -> None:
        """`tensor` (made with dispatch off: not allocated in the model) is the replayed block `key`'s."""
        self._hold(tensor.untyped_storage(), key)

    def _snapshot(self) -> None:
        self._peak_parts = dict(self.parts)
        self._peak_requested = dict(self.requested)
        self._peak_allocated = self.allocator.allocated
        self._reserved_at_peak = self.allocator.reserved

    def _hold(self, storage: Any, key: int) -> None:
        """A replayed block (`key`) is now `storage`'s: freed when the storage dies."""
        handle = id(storage)
        self._held[handle] = key
        self._live.add(handle)
        self._watch[handle] = weakref.ref(storage, lambda _, handle=handle, key=key: self._release_held(handle, key))

    def _release_held(self, handle: int, key: int) -> None:
        self._held.pop(handle, None)
        self._live.discard(handle)
        self._watch.pop(handle, None)
        self._free(key)

    def _release(self, key: int) -> None:
        self._live.discard(key)
        self._watch.pop(key, None)
        self._free(key)

    def _free(self, key: int) -> None:
        if self._recording is not None:
            self._recording.free(key)
        if self.log is not None:
            self.log.append((1, key, 0, ""))
        self.allocator.free(key)
        if self.share is not None:
            self.share.free(key)
        kind = self._kinds.pop(key, None)
        if kind is not None:
            size, nbytes = self._sizes.pop(key)
            self.parts[kind] -= size
            self.requested[kind] -= nbytes

    def retag(self, tensor: Any, kind: str) -> None:
        """Say what a tracked tensor's storage is (a parameter's `.grad`, autocast's weight copy)."""
        if not isinstance(tensor, torch.Tensor) or tensor.device != DEVICE:
            return
        self._retag_key(id(tensor.untyped_storage()), kind)

    def _retag_key(self, key: int, kind: str) -> None:
        old = self._kinds.get(key)
        if old is None or old == kind:
            return
        if self._recording is not None:
            self._recording.retag()
        if self.log is not None:
            self.log.append((2, key, 0, kind))
        size, nbytes = self._sizes[key]
        self.parts[old] -= size
        self.parts[kind] = self.parts.get(kind, 0) + size
        self.requested[old] -= nbytes
        self.requested[kind] = self.requested.get(kind, 0) + nbytes
        self._kinds[key] = kind
        if self.share is not None:
            self.share.retag(key, nbytes, kind, self.kind)

    def reset_peaks(self) -> None:
        """The allocator's `reset_peaks`, and the breakdown of the peak starts from now."""
        self.allocator.reset_peaks()
        self._snapshot()
        if self.share is not None:
            self.share.reset_peaks()

    def release_cached(self) -> None:
        """`torch.cuda.empty_cache()`, in the allocator's model (and the sharded GPU's)."""
        self.allocator.release_cached()
        if self.share is not None:
            self.share.release_cached()

    def peak_breakdown(self) -> dict[str, int]:
        """Bytes by kind at the instant allocated memory peaked (since `reset_peaks`), with `allocator_slack`
        (reserved minus allocated at that instant) and `reserved_after_peak` (segments added later, where
        any); sums to the allocator's `peak_reserved`."""
        parts = {kind: size for kind, size in self._peak_parts.items() if size}
        parts["allocator_slack"] = self._reserved_at_peak - self._peak_allocated
        later = self.allocator.peak_reserved - self._reserved_at_peak
        if later:
            parts["reserved_after_peak"] = later
        return parts

    def peak_requested(self) -> dict[str, int]:
        """The tensors' own bytes by kind at the same instant as `peak_breakdown` (before the allocator's rounding)."""
        return {kind: size for kind, size in self._peak_requested.items() if size}

    def current_breakdown(self) -> dict[str, int]:
        """Bytes by kind live now, with `allocator_slack`; sums to the allocator's `reserved`."""
        parts = {kind: size for kind, size in self.parts.items() if size}
        parts["allocator_slack"] = self.allocator.reserved - self.allocator.allocated
        return parts

    def workspace(self, nbytes: int) -> int:
        key = self._next_key
        self._next_key += 1
        self._malloc(key, nbytes, "workspaces")
        return key

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _names.get(func)
        if name is None:
            name = _names[func] = str(func.overloadpacket)
        if not self._cublas and name in _MATMULS:
            self._cublas = True
            self.workspace(CUBLAS_WORKSPACE_BYTES)  # kept for the process's life
        scratch = None
        if name == _FLASH_BACKWARD:
            query = args[1]  # grad_out, query, key, value, ...: dq accumulates in float32
            scratch = self.workspace(query.numel() * 4)
        out = _run_meta(func, args, kwargs) if self.memoize else func(*args, **kwargs)
        kind = type(out)
        for tensor in (out,) if kind in _TENSOR_TYPES else out if kind in (tuple, list) else tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device == DEVICE:
                self._track(tensor)
        if self.flops is not None:
            self.flops += _flops(func, args, kwargs, out)
        if scratch is not None:
            self._free(scratch)
        return out


# --- calls replayed ---------------------------------------------------------------------------
# The validation pass decodes the video in tiles: the VAE's decoder runs on tiles of a few shapes, dozens
# of times, without autograd. A call that only allocates its own tensors and returns some of them (no
# module state, no cache kept, nothing it was given freed) makes the same allocations and frees, in the
# same order, whenever its arguments have the same metadata: the first call's are recorded, and later
# ones replay them into the allocator's model and return fresh tensors of the outputs' description. The
# allocator decides as it would have (the same requests in the same order, from its present state).
#
# Calls nest: the decoder's resnet blocks are wrapped too, and share their recordings (keyed by the block's
# tensors), so that recording a decoder call on a new tile shape replays the resnet calls it repeats. A call
# recorded inside another's recording is recorded in both (`parent`); a replay inside one is recorded there.
class _Recording:
    def __init__(self, parent: _Recording | None = None) -> None:
        self.events: list[tuple[bool, int, int, str]] = []  # (malloc?, the call's own index, bytes, kind)
        self.own: dict[int, int] = {}  # tracker key -> the call's own index
        self.broken = False
        self.parent = parent

    def malloc(self, key: int, nbytes: int, kind: str) -> None:
        self.own[key] = index = len(self.events)
        self.events.append((True, index, nbytes, kind))
        if self.parent is not None:
            self.parent.malloc(key, nbytes, kind)

    def free(self, key: int) -> None:
        index = self.own.pop(key, None)
        if index is None:
            self.broken = True  # frees what it was given (or what lived before it)
        else:
            self.events.append((False, index, 0, ""))
        if self.parent is not None:
            self.parent.free(key)

    def retag(self) -> None:
        self.broken = True  # a tensor's kind changed: not a call's own allocations
        if self.parent is not None:
            self.parent.retag()


def _unplaced(value: Any) -> Any:
    """A tensor argument as a call's allocations depend on it: where its view starts in its storage does not
    matter (a tile is a slice of the latents), so it is described as if at the start."""
    if type(value) in _TENSOR_TYPES and value.device == DEVICE and value.storage_offset():
        return value.as_strided(value.shape, value.stride(), 0)
    return value


class ReplayedCalls:
    """Wraps a function (a module's `forward`, the VAE's blending of tiles) so that its calls without autograd
    are recorded once per description of their arguments and replayed after; other calls run as they are.

    Identical modules (a transformer's blocks) share their recordings: `recorded` is a dict common to their
    wrappers, and `state()` describes what else a call's allocations depend on (the module's tensors).
    """

    def __init__(self, tracker: AllocationTracker, function: Any, recorded: dict[Any, Any] | None = None,
                 state: Any = None) -> None:
        self.tracker, self.function, self.state = tracker, function, state
        self.recorded: dict[Any, Any] = {} if recorded is None else recorded

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tracker = self.tracker
        if torch.is_grad_enabled() or tracker.flops is not None:
            return self.function(*args, **kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        described = _describe([_unplaced(leaf) for leaf in leaves])
        if described is None:
            return self.function(*args, **kwargs)
        key = (spec, described, tracker.kind, torch.get_default_dtype(), self.state() if self.state else None)
        recorded = self.recorded.get(key)
        if recorded is None:
            out, self.recorded[key] = self._record(args, kwargs, leaves)
            return out
        if recorded is _UNCACHEABLE:
            return self.function(*args, **kwargs)
        return self._replay(*recorded, leaves)

    def _record(self, args: Any, kwargs: Any, arguments: list[Any]) -> tuple[Any, Any]:
        tracker = self.tracker
        recording = tracker._recording = _Recording(tracker._recording)
        try:
            out = self.function(*args, **kwargs)
        finally:
            tracker._recording = recording.parent
        leaves, spec = tree_flatten(out)
        outputs, kept = [], set()
        for leaf in leaves:
            position = next((i for i, argument in enumerate(arguments) if argument is leaf), None)
            if position is not None:  # returns an argument (written in place: a blend of tiles)
                outputs.append(("argument", position))
            elif isinstance(leaf, torch.Tensor):
                storage = id(leaf.untyped_storage())
                index = recording.own.get(tracker._held.get(storage, storage))  # a replayed block's, or its own
                if index is None or type(leaf) is not torch.Tensor or leaf.requires_grad:
                    return out, _UNCACHEABLE  # an argument, or a tensor that was not made here
                kept.add(index)
                outputs.append((index, leaf.untyped_storage().nbytes(), tuple(leaf.shape), leaf.stride(),
                                leaf.storage_offset(), leaf.dtype))
            elif leaf is None or type(leaf) in (bool, int, float):
                outputs.append(leaf)
            else:
                return out, _UNCACHEABLE
        if recording.broken or kept != set(recording.own.values()):  # something it made outlives it elsewhere
            return out, _UNCACHEABLE
        return out, (recording.events, outputs, spec)

    def _replay(self, events: list[tuple[bool, int, int, str]], outputs: list[Any], spec: Any,
                arguments: list[Any]) -> Any:
        tracker = self.tracker
        keys = tracker.replay(events)
        storages: dict[int, Any] = {}
        leaves = []
        with torch._C._DisableTorchDispatch():  # the outputs' blocks are replayed above: no allocation of theirs
            for output in outputs:
                if not isinstance(output, tuple):
                    leaves.append(output)
                    continue
                if len(output) == 2:
                    leaves.append(arguments[output[1]])
                    continue
                index, nbytes, shape, stride, offset, dtype = output
                storage = storages.get(index)
                if storage is None:
                    storage = storages[index] = torch.UntypedStorage(nbytes, device=DEVICE)
                    tracker._hold(storage, keys[index])
                leaves.append(torch.empty(0, dtype=dtype, device=DEVICE).set_(storage, offset, shape, stride))
        return tree_unflatten(leaves, spec)


def describe_tensors(tensors: list[torch.Tensor], cast_cache: CastCache) -> Any:
    """A module's tensors as its calls' allocations depend on them (a `ReplayedCalls` state): their metadata,
    whether they require gradients, and whether autocast's cache holds a copy of each."""
    return cast_cache.autocast, tuple((t.dtype, t.shape, t.stride(), t.requires_grad, id(t) in cast_cache)
                                      for t in tensors)


# --- the meta kernels, memoized ---------------------------------------------------------------
# Most of a trace's time is in the meta kernels (Python reference implementations that compute an
# output's shape, strides and dtype), and a transformer's identical blocks, or a VAE's identical
# tiles, call the same ops on tensors of the same metadata over and over. An op that neither mutates
# nor aliases its inputs returns fresh tensors whose metadata depends only on its inputs' metadata
# (not on where a view starts in its storage) and its other arguments (meta tensors have no values; an
# elementwise op's scalars count by their type: a tile blend's weights change column by column), so the
# first call's outputs are described and later calls make fresh tensors of that description: the same
# tensors, so the same allocations.
_names: dict[Any, str] = {}
_UNCACHEABLE = object()
_op_kinds: dict[Any, int] = {}
_meta_cache: dict[Any, Any] = {}
# An in-place op writes into its first argument: it allocates nothing and, on the meta device, changes no
# metadata unless it is a view-like one (`unsqueeze_`): the first call with a description of the arguments
# runs, and where it changed no argument's metadata and returned its first argument (or nothing), later calls
# with that description return the same without running. Float scalars are described by their type alone
# (an optimizer's step sizes change every step, and an in-place op's effect on metadata cannot depend on them),
# views by their metadata without their storage offset (no op memoized as in-place moves a view).
_in_place_cache: dict[Any, Any] = {}
_MAX_CACHED = 200_000  # a few tens of MB; a 5b estimate adds about 2,000


def clear_meta_cache() -> None:
    """Forget the memoized meta kernels' outputs (each estimate then pays for them again)."""
    _meta_cache.clear()
    _in_place_cache.clear()
    _flop_cache.clear()


_OTHER, _FUNCTIONAL, _POINTWISE, _IN_PLACE = 0, 1, 2, 3


def _op_kind(func: Any) -> int:
    """`_FUNCTIONAL`: neither mutates nor aliases its inputs (`_POINTWISE`: and is elementwise, so that its
    output's metadata depends on its scalars' types, not their values); `_IN_PLACE`: writes its first argument
    only and returns it or nothing (`add_`, `copy_`, `_foreach_mul_`; not `set_`, which swaps the storage, nor
    `as_strided_`, which moves the view)."""
    known = _op_kinds.get(func)
    if known is None:
        schema = getattr(func, "_schema", None)
        known = _OTHER
        if schema is not None and not schema.is_mutable and all(a.alias_info is None for a in schema.arguments) \
                and all(r.alias_info is None for r in schema.returns):
            known = _POINTWISE if torch.Tag.pointwise in func.tags else _FUNCTIONAL
        elif schema is not None and schema.arguments and _IN_PLACE_NAME.match(schema.name) \
                and all((a.alias_info is not None and a.alias_info.is_write) == (i == 0)
                        for i, a in enumerate(schema.arguments)):
            known = _IN_PLACE
        _op_kinds[func] = known
    return known


_IN_PLACE_NAME = re.compile(r"aten::(?!.*(set_|swap|resize|as_strided))\w+_$")


_PLAIN = frozenset((bool, int, float, str, torch.dtype, torch.device, torch.layout, torch.memory_format))
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _describe(value: Any, values: bool = True, offsets: bool = True) -> Any:
    """A hashable description of an argument's metadata (None: not describable, do not memoize);
    `values=False`: floats by their type alone; `offsets=False`: where a view starts in its storage left out
    (a meta kernel's output does not depend on it)."""
    kind = type(value)
    if kind in _TENSOR_TYPES:
        if value.device != DEVICE:
            return None
        return (value.dtype, value.shape, value.stride(), value.storage_offset() if offsets else 0, value.is_conj(),
                value.is_neg(), value.layout)
    if kind is float and not values:
        return float
    if value is None or kind in _PLAIN:
        return (kind, value)
    if kind is tuple or kind is list:
        described = []
        for item in value:
            description = _describe(item, values, offsets)
            if description is None:
                return None
            described.append(description)
        return (kind, tuple(described))
    return None


def _cache_key(func: Any, args: Any, kwargs: Any, values: bool = True) -> Any:
    described = _describe(args, values, False)
    if described is None:
        return None
    if kwargs:
        items = []
        for name, value in kwargs.items():
            description = _describe(value, values, False)
            if description is None:
                return None
            items.append((name, description))
        return func, torch.get_default_dtype(), described, tuple(items)
    return func, torch.get_default_dtype(), described  # factory ops without a dtype take the default


def _outputs_description(args: Any, kwargs: Any, out: Any) -> Any:
    """How to remake `out` (fresh meta tensors and plain values), or `_UNCACHEABLE`."""
    leaves, spec = tree_flatten(out)
    inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
    seen, described = set(), []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if leaf.device != DEVICE or type(leaf) is not torch.Tensor or leaf.storage_offset() != 0:
                return _UNCACHEABLE
            storage = leaf.untyped_storage()
            if id(storage) in inputs or id(storage) in seen:
                return _UNCACHEABLE  # aliases an input or another output
            seen.add(id(storage))
            fresh = torch.empty_strided(leaf.shape, leaf.stride(), dtype=leaf.dtype, device=DEVICE)
            if fresh.untyped_storage().nbytes() != storage.nbytes() or leaf.requires_grad:
                return _UNCACHEABLE
            described.append((True, (tuple(leaf.shape), leaf.stride(), leaf.dtype)))
        elif leaf is None or isinstance(leaf, (bool, int, float)):
            described.append((False, leaf))
        else:
            return _UNCACHEABLE
    container = type(out) if type(out) in (tuple, list) and len(out) == len(leaves) else None
    if isinstance(out, torch.Tensor):
        container = torch.Tensor
    return spec, container, described


def _remake(described: Any) -> list[Any]:
    return [torch.empty_strided(*value[:2], dtype=value[2], device=DEVICE) if is_tensor else value
            for is_tensor, value in described]


def _run_in_place(func: Any, args: Any, kwargs: Any) -> Any:
    key = _cache_key(func, args, kwargs, values=False)
    if key is None:
        return func(*args, **kwargs)
    cached = _in_place_cache.get(key)
    if cached is None:
        if len(_in_place_cache) >= _MAX_CACHED:
            _in_place_cache.clear()
        out = func(*args, **kwargs)
        returns_first = out is args[0]
        unchanged = _cache_key(func, args, kwargs, values=False) == key
        _in_place_cache[key] = returns_first if unchanged and (returns_first or out is None) else _UNCACHEABLE
        return out
    if cached is _UNCACHEABLE:
        return func(*args, **kwargs)
    return args[0] if cached else None


def _run_meta(func: Any, args: Any, kwargs: Any) -> Any:
    kind = _op_kinds.get(func)
    if kind is None:
        kind = _op_kind(func)
    if kind == _IN_PLACE:
        return _run_in_place(func, args, kwargs)
    if kind == _OTHER:
        return func(*args, **kwargs)
    key = _cache_key(func, args, kwargs, values=kind != _POINTWISE)
    if key is None:
        return func(*args, **kwargs)
    cached = _meta_cache.get(key)
    if cached is None:
        if len(_meta_cache) >= _MAX_CACHED:
            _meta_cache.clear()
        out = func(*args, **kwargs)
        _meta_cache[key] = _outputs_description(args, kwargs, out)
        return out
    if cached is _UNCACHEABLE:
        return func(*args, **kwargs)
    spec, container, described = cached
    if container is torch.Tensor:
        shape, stride, dtype = described[0][1]
        return torch.empty_strided(shape, stride, dtype=dtype, device=DEVICE)
    leaves = _remake(described)
    if container is tuple:
        return tuple(leaves)
    if container is list:
        return leaves
    return tree_unflatten(leaves, spec)


@functools.lru_cache(maxsize=1)
def _flop_registry() -> dict[Any, Any]:
    return FlopCounterMode().flop_registry


_flop_cache: dict[Any, int] = {}


def _flops(func: Any, args: Any, kwargs: Any, out: Any) -> int:
    """torch's FLOP formula for the op (0 where it has none), memoized by the arguments' description (a
    formula reads shapes, and flags such as a convolution's `transposed`)."""
    counter = _flop_registry().get(func._overloadpacket)
    if counter is None:
        return 0
    key = _cache_key(func, args, kwargs)
    flops = _flop_cache.get(key) if key is not None else None
    if flops is None:
        flops = counter(*args, **kwargs, out_val=out)
        if key is not None:
            if len(_flop_cache) >= _MAX_CACHED:
                _flop_cache.clear()
            _flop_cache[key] = flops
    return flops


class CastCache(dict):
    """Autocast's cache of float32 weights' low-precision copies, and whether autocast is on."""

    autocast = True
    tag: Any = None  # called with each weight copy the cache keeps (the tracker's `retag`, to count them)

    @contextlib.contextmanager
    def outside_autocast(self) -> Iterator[None]:
        """Code that runs without autocast (the VAE decode): ops keep their inputs' dtypes."""
        self.clear()  # leaving an autocast region drops its cache
        self.autocast = False
        try:
            yield
        finally:
            self.autocast = True


@contextlib.contextmanager
def gpu_semantics(compute_dtype: torch.dtype) -> Iterator[CastCache]:
    """Make meta tensors take the dtypes and kernels they would take on a GPU under autocast.

    Yields the cast cache; clear it where autocast's cache would be cleared (when the forward's
    autocast region ends), and use its `outside_autocast` for code that runs without autocast.
    """
    cache = CastCache()
    original = {name: getattr(F, name) for name in ("linear", "conv2d", "conv3d", "layer_norm", "group_norm",
                                                     "scaled_dot_product_attention")}

    def low(tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None or not cache.autocast or not tensor.is_floating_point() or tensor.dtype == compute_dtype:
            return tensor
        if tensor.is_leaf and tensor.requires_grad:  # autocast caches casts of such weights
            if id(tensor) not in cache:
                cache[id(tensor)] = copy = tensor.to(compute_dtype)
                if cache.tag is not None:
                    cache.tag(copy)
            return cache[id(tensor)]
        return tensor.to(compute_dtype)

    def high(tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None or not cache.autocast:
            return tensor
        return tensor.float()

    def linear(input, weight, bias=None):
        return original["linear"](low(input), low(weight), low(bias))

    def conv2d(input, weight, bias=None, *args, **kwargs):
        return original["conv2d"](low(input), low(weight), low(bias), *args, **kwargs)

    def conv3d(input, weight, bias=None, *args, **kwargs):
        return original["conv3d"](low(input), low(weight), low(bias), *args, **kwargs)

    def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
        return original["layer_norm"](high(input), normalized_shape, high(weight), high(bias), eps)

    def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
        return original["group_norm"](high(input), num_groups, high(weight), high(bias), eps)

    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     scale=None, enable_gqa=False):
        if attn_mask is not None:
            raise NotImplementedError("the estimator models mask-free attention (CogVideoX's)")
        return torch.ops.aten._scaled_dot_product_flash_attention(
            low(query), low(key), low(value), dropout_p, is_causal, False, scale=scale)[0]

    patched = dict(linear=linear, conv2d=conv2d, conv3d=conv3d, layer_norm=layer_norm, group_norm=group_norm,
                   scaled_dot_product_attention=scaled_dot_product_attention)
    for name, function in patched.items():
        setattr(F, name, function)
    try:
        yield cache
    finally:
        for name, function in original.items():
            setattr(F, name, function)


@contextlib.contextmanager
def activations_offloaded_on_meta(host_bytes: list[int] | None = None) -> Iterator[None]:
    """What `save_on_cpu` does to GPU memory: saved tensors leave the device and come back in backward.

    `host_bytes[0]` grows by the host bytes of each pinned copy `save_on_cpu` makes (one per packed
    tensor, of its size rounded up to a power of two by the pinned allocator, so a view or a tensor
    saved twice is copied whole each time), all alive until backward.
    """

    def pack(tensor: torch.Tensor) -> Any:
        if tensor.device != DEVICE:
            return tensor
        if host_bytes is not None:
            host_bytes[0] += pinned_block(tensor.numel() * tensor.element_size())
        return ("offloaded", tuple(tensor.shape), tensor.stride(), tensor.dtype)

    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, tuple) and packed and packed[0] == "offloaded":
            _, shape, stride, dtype = packed
            return torch.empty_strided(shape, stride, dtype=dtype, device=DEVICE)
        return packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def gib(nbytes: float) -> float:
    return nbytes / 1024**3
