"""Tracing the real training code on the meta device, as a GPU would run it.

The trainer's own functions run on meta tensors (shapes and dtypes, no data), under a dispatch
mode that feeds every tensor storage created on the meta device into the allocator model, and frees
it when the storage dies. Three things differ between a meta run and a GPU run, and are emulated:

- autocast: it does not engage on meta tensors, so `gpu_semantics` casts the inputs of the ops
  autocast runs in low precision (linear, conv) and upcasts those it runs in float32 (layer and
  group norms), keeping the cast copies of float32 weights for the forward as autocast's cache does;
- attention: `F.scaled_dot_product_attention` becomes the flash-attention kernel the GPU picks for
  bf16/fp16 (no sequence x sequence matrix), whose backward also takes a float32 `dq` accumulator;
- the cuBLAS workspace, taken once through the allocator at the first matmul.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cogtune.bench.allocator import CachingAllocatorModel

DEVICE = torch.device("meta")
CUBLAS_WORKSPACE_BYTES = 32 << 20  # Hopper's default cuBLAS workspace (`CUBLAS_WORKSPACE_CONFIG`)
_FLASH_BACKWARD = "aten._scaled_dot_product_flash_attention_backward"
_MATMULS = {"aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten._scaled_dot_product_flash_attention",
            "aten.convolution"}


class AllocationTracker(TorchDispatchMode):
    """Replays the meta-device allocations of the code it wraps into a `CachingAllocatorModel`."""

    def __init__(self) -> None:
        super().__init__()
        self.allocator = CachingAllocatorModel()
        self._live: set[int] = set()
        self._next_key = 1 << 48  # keys for workspaces, distinct from storage ids
        self._cublas = False

    def adopt(self, tensors: Any) -> None:
        """Count tensors that exist already (weights loaded before tracing)."""
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and tensor.device == DEVICE:
                self._track(tensor)

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._live:
            return
        self._live.add(key)
        self.allocator.malloc(key, storage.nbytes())
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self._live.discard(key)
        self.allocator.free(key)

    def workspace(self, nbytes: int) -> int:
        key = self._next_key
        self._next_key += 1
        self.allocator.malloc(key, nbytes)
        return key

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        if not self._cublas and name in _MATMULS:
            self._cublas = True
            self.workspace(CUBLAS_WORKSPACE_BYTES)  # kept for the process's life
        scratch = None
        if name == _FLASH_BACKWARD:
            query = args[1]  # grad_out, query, key, value, ...: dq accumulates in float32
            scratch = self.workspace(query.numel() * 4)
        out = func(*args, **kwargs)
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device == DEVICE:
                self._track(tensor)
        if scratch is not None:
            self.allocator.free(scratch)
        return out


class CastCache(dict):
    """Autocast's cache of float32 weights' low-precision copies, and whether autocast is on."""

    autocast = True

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
                cache[id(tensor)] = tensor.to(compute_dtype)
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
def activations_offloaded_on_meta() -> Iterator[None]:
    """What `save_on_cpu` does to GPU memory: saved tensors leave the device and come back in backward."""

    def pack(tensor: torch.Tensor) -> Any:
        if tensor.device != DEVICE:
            return tensor
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


def tensor_bytes(tensors: Any) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if id(storage) not in seen:
            seen.add(id(storage))
            total += storage.nbytes()
    return total


def ceil_div(a: int, b: int) -> int:
    return math.ceil(a / b)
