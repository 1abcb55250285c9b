"""Float8 storage of frozen Linear weights, upcast per call: about half the memory of bf16 weights.

diffusers' layerwise casting does the same with hooks that re-create parameters on every call,
which `torch.compile` cannot trace (a graph break per layer). Here the weight stays a float8
parameter and `forward` upcasts a temporary copy, which compiles into the block's graph.
Trainable layers (LoRA), norms, embeddings and the output projection keep their precision.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

STORAGE_DTYPE = torch.float8_e4m3fn
# Layers whose names contain these keep full precision: LoRA, norms and embeddings, as diffusers'
# layerwise casting skips them too, and the small input/output projections.
SKIP_PATTERNS = ("lora_", "norm", "patch_embed", "time_embedding", "ofs_embedding", "proj_out")


class Float8StorageLinear(torch.nn.Linear):
    """A Linear with a float8 weight that computes in `compute_dtype`."""

    compute_dtype: torch.dtype

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(input.to(self.compute_dtype), weight, bias)

    @classmethod
    def convert(cls, linear: torch.nn.Linear, compute_dtype: torch.dtype) -> Float8StorageLinear:
        linear.weight.data = linear.weight.data.to(STORAGE_DTYPE)
        linear.__class__ = cls  # same parameters, same place in peft's wrappers; only forward changes
        linear.compute_dtype = compute_dtype
        return linear


def store_frozen_linears_in_float8(model: Any, compute_dtype: torch.dtype) -> int:
    """Convert every frozen Linear (outside `SKIP_PATTERNS`) to float8 storage; returns how many."""
    converted = 0
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Linear or any(pattern in name for pattern in SKIP_PATTERNS):
            continue
        if module.weight.requires_grad:
            continue
        Float8StorageLinear.convert(module, compute_dtype)
        converted += 1
    return converted
