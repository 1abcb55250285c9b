"""A quantized frozen base (QLoRA): the transformer's Linear weights held by bitsandbytes or torchao.

Which library does what:

- `nf4`, the QLoRA recipe: bitsandbytes' `Linear4bit` with `Params4bit` (4-bit NormalFloat in blocks of
  64 weights, the blocks' absmax double-quantized to 8 bits in blocks of 256; compute in the autocast
  dtype), the layer diffusers' `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
  bnb_4bit_use_double_quant=True)` puts in. bitsandbytes quantizes and computes with its own kernels
  (CUDA on a GPU, its CPU backend here).
- `nf4` where bitsandbytes has no 4-bit kernel (Apple's MPS), or with `memory.nf4_backend = "torchao"`:
  torchao's `NF4Tensor` (`to_nf4`: the same NF4 code book in blocks of 64, the blocks' absmax
  double-quantized to int8 in blocks of 256, in pure PyTorch ops) as the weight of a plain Linear, whose
  `F.linear` torchao computes from the dequantized weight, as torchtune's `FrozenNF4Linear` does. A layer
  whose block count 256 does not divide (the tiny presets') double-quantizes in the largest block that does.
- `int8`: torchao's `quantize_` with `Int8WeightOnlyConfig` (int8 weights, one float32 scale per output row).

peft then wraps these layers in its LoRA layers made for them (`peft.tuners.lora.bnb.Linear4bit`,
`peft.tuners.lora.torchao.TorchaoLoraLinear`; on torchao's NF4 Linear its plain `lora.Linear`). The
layers are replaced after the transformer is built or loaded (rather than through
`from_pretrained(quantization_config=...)`), so that presets with random weights, local folders and Hub
models go the same way; each layer is quantized on the device, one at a
time, so a GPU never holds the unquantized base. Every block's Linear is quantized, the norms'
modulation Linears included (1.5 GiB of 5b's bf16 weights, which float8 storage keeps); the layers in
and out of the blocks (`KEPT_UNQUANTIZED`: the patch and text projections, the time and ofs embeddings,
the final norm and projection, under 1% of the weights) stay in the model's dtype, as the QLoRA
recipe keeps a language model's head: on the tiny model, quantizing them too multiplies the
transformer's output error by 9 (0.19 against 0.022), while quantizing the modulation Linears adds 8%.
"""

from __future__ import annotations

import importlib.metadata
import math
from typing import Any

import torch
from packaging.version import Version

from cogtune.errors import ConfigError
from cogtune.models.fp8 import SKIP_PATTERNS
from cogtune.models.loading import default_device
from cogtune.models.registry import ModelSpec

NF4_BLOCK = 64  # weights per absmax (bitsandbytes' default blocksize for 4-bit)
NESTED_BLOCK = 256  # absmax values per nested (double-quantization) absmax
NF4_CODE_VALUES = 16  # the NF4 code book, float32, per layer
NESTED_CODE_VALUES = 256  # the 8-bit dynamic code book of the nested absmax, float32, per layer

# Layers (by name) a quantized base keeps in the model's dtype: the LoRA's own, and those in and out of the blocks.
KEPT_UNQUANTIZED = ("lora_", "patch_embed", "time_embedding", "ofs_embedding", "norm_out", "proj_out")

# The library each storage needs, and the version from which it works here (bitsandbytes: its CPU
# backend and torch-op kernels; torchao: the oldest peft's torchao LoRA layers accept, which has `to_nf4`).
_LIBRARIES = {"nf4": ("bitsandbytes", "0.46.0"), "nf4-torchao": ("torchao", "0.16.0"), "int8": ("torchao", "0.16.0")}

# The device types bitsandbytes has 4-bit kernels for (CUDA and ROCm report "cuda"); elsewhere (Apple's
# MPS) `nf4_backend = "auto"` takes torchao's NF4 tensor, which is made of ordinary PyTorch ops.
BITSANDBYTES_4BIT_DEVICES = ("cuda", "cpu", "xpu")


def nf4_backend(choice: str, device: str) -> str:
    """The library that holds an NF4 base on `device` (a device type): `choice` (`memory.nf4_backend`), or
    for "auto" bitsandbytes where it has 4-bit kernels and torchao elsewhere."""
    if choice != "auto":
        return choice
    return "bitsandbytes" if device in BITSANDBYTES_4BIT_DEVICES else "torchao"


def _storage(kind: str, backend: str) -> str:
    """The key of `_LIBRARIES` and `quantized_weight_bytes` for a base stored as `kind` through `backend`."""
    return "nf4-torchao" if kind == "nf4" and backend == "torchao" else kind


def check_base_weights(kind: str, spec: ModelSpec, nf4_backend_choice: str = "auto") -> None:
    """Refuse, before any weight loads, a quantized base that cannot be made: its library missing or too
    old (or without kernels for this device), or a model whose transformer is quantized already."""
    device = default_device()
    storage = _storage(kind, nf4_backend(nf4_backend_choice, device))
    if storage not in _LIBRARIES:
        return
    package, oldest = _LIBRARIES[storage]
    named = f"--base-weights {kind}" + (" --nf4-backend torchao" if storage == "nf4-torchao" else "")
    other = "--nf4-backend torchao" if storage == "nf4" else "--base-weights bf16"
    hint = f"pip install '{package}>={oldest}', or {other}"
    try:
        found = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"{named} needs {package}, which is not installed", hint=hint) from None
    if Version(found) < Version(oldest):
        raise ConfigError(f"{named} needs {package} {oldest} or newer (found {found})", hint=hint)
    if storage == "nf4" and device not in BITSANDBYTES_4BIT_DEVICES:
        raise ConfigError(f"--nf4-backend bitsandbytes: bitsandbytes has no 4-bit kernels for {device}",
                          hint="--nf4-backend torchao (or auto): torchao's NF4 tensor runs on any device")
    quantized = spec.transformer_config.get("quantization_config")
    if quantized:
        method = quantized.get("quant_method", "a library") if isinstance(quantized, dict) else "a library"
        raise ConfigError(f"{spec.name}'s transformer is quantized already (by {method}); --base-weights {kind} "
                          "quantizes an unquantized base", hint="pass the model's bf16 folder or Hub id")


def quantizable_linears(model: Any) -> list[tuple[str, torch.nn.Linear]]:
    """The frozen Linear layers a quantized base stores quantized, by name."""
    return [(name, module) for name, module in model.named_modules()
            if type(module) is torch.nn.Linear and not any(pattern in name for pattern in KEPT_UNQUANTIZED)
            and not module.weight.requires_grad]


def quantize_frozen_linears(model: Any, kind: str, compute_dtype: torch.dtype, device: Any,
                            nf4_backend_choice: str = "auto") -> int:
    """Replace every quantizable Linear of `model` by its `kind` (nf4, int8) form on `device` (nf4 through
    `nf4_backend(nf4_backend_choice, ...)`); returns how many. The rest of the model stays where it is."""
    storage = _storage(kind, nf4_backend(nf4_backend_choice, torch.device(device).type))
    linears = quantizable_linears(model)
    for name, linear in linears:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _quantized(linear, storage, compute_dtype, device))
    if storage == "nf4":
        # What diffusers' and transformers' bitsandbytes loaders mark a 4-bit model with: peft reads it to wrap
        # each `Linear4bit` in its 4-bit LoRA layer (otherwise in its plain one, a `Linear4bit` being a Linear).
        model.is_loaded_in_4bit = True
    return len(linears)


def _quantized(linear: torch.nn.Linear, kind: str, compute_dtype: torch.dtype, device: Any) -> torch.nn.Module:
    if kind == "nf4":
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                  device="meta")
        # Params4bit quantizes when it moves to a device (bitsandbytes' kernels there)
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", blocksize=NF4_BLOCK, module=layer)
        layer.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.data, requires_grad=False)
        # On CPUs with AVX512-BF16, bitsandbytes repacks a layer's weight in place into a layout of its own the
        # first time it runs without gradients (validation): training and validation then run different kernels,
        # and layers narrower than a block (the tiny presets) fail. The layer computes one way here.
        layer.support_avx512bf16_for_cpu = False
        return layer.to(device)
    if kind == "nf4-torchao":  # computes in its input's dtype, the autocast dtype under autocast
        linear.to(device)
        linear.weight = torch.nn.Parameter(_to_nf4(linear.weight.data), requires_grad=False)
        return linear
    if kind == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        linear.to(device)
        quantize_(linear, Int8WeightOnlyConfig(), filter_fn=lambda module, _: module is linear)
        return linear
    raise ValueError(f"no quantized storage '{kind}'")


def _to_nf4(weight: torch.Tensor) -> torch.Tensor:
    try:
        from torchao.quantization import to_nf4  # torchao 0.18 and newer
    except ImportError:
        from torchao.dtypes import to_nf4
    return to_nf4(weight, block_size=NF4_BLOCK, scaler_block_size=torchao_nf4_scaler_block(weight.numel()))


def torchao_nf4_scaler_block(count: int) -> int:
    """Absmax values per double-quantization block of torchao's NF4 tensor for a weight of `count` values: 256
    (torchao's and bitsandbytes' default) where it divides the layer's block count, else the largest power of
    two that does (torchao needs whole blocks; the tiny presets' layers have 16 to 48 blocks)."""
    if count % NF4_BLOCK:
        raise ValueError(f"torchao's NF4 tensor needs whole blocks of {NF4_BLOCK} weights, got {count} weights")
    return math.gcd(count // NF4_BLOCK, NESTED_BLOCK)


def quantized_weight_bytes(kind: str, out_features: int, in_features: int, dtype_bytes: int) -> int:
    """Bytes one Linear's weight takes stored as `kind`, every quantization state included; `dtype_bytes`:
    the element size of the model's dtype (for bf16 storage).

    nf4 (bitsandbytes, double quantization): two weights per byte; a uint8 absmax per block of 64; a
    float32 absmax per 256 of those, and the float32 offset they are centred on; the layer's two code
    books (16 and 256 float32 values). nf4-torchao (torchao's `NF4Tensor`): two weights per byte; an int8
    absmax per block of 64; per double-quantization block (`torchao_nf4_scaler_block`) a factor, and the
    absmax mean and the 16-value code book, all three in the weight's dtype. int8 (torchao's `Int8Tensor`): a
    byte per weight; per output row a float32 scale and an int8 zero point (kept though the scheme is symmetric).
    """
    count = out_features * in_features
    if kind == "nf4":
        blocks = math.ceil(count / NF4_BLOCK)
        nested = math.ceil(blocks / NESTED_BLOCK)
        return math.ceil(count / 2) + blocks + 4 * nested + 4 + 4 * (NF4_CODE_VALUES + NESTED_CODE_VALUES)
    if kind == "nf4-torchao":
        blocks, scaler_block = count // NF4_BLOCK, torchao_nf4_scaler_block(count)
        nested = blocks // scaler_block
        # torchao computes the factors in a (nested, scaler_block) tensor and keeps column 0: a copy of `nested`
        # values, except that a single one is contiguous already and keeps the whole row's storage
        factors = nested if nested > 1 else scaler_block
        return count // 2 + blocks + dtype_bytes * (factors + 1 + NF4_CODE_VALUES)
    if kind == "int8":
        return count + out_features * (4 + 1)
    if kind == "fp8":
        return count
    return count * dtype_bytes


def quantized_linears_bytes(spec: ModelSpec, kind: str, nf4_backend_choice: str = "auto") -> int:
    """Bytes the quantizable Linear weights of `spec`'s transformer take stored as `kind` (built on the meta
    device: no memory), quantization state included; what the estimator counts for a quantized base (the
    difference from "fp8", as which it traces one). It sizes a GPU run: nf4's "auto" is CUDA's backend."""
    kind = _storage(kind, nf4_backend(nf4_backend_choice, "cuda"))
    from diffusers import CogVideoXTransformer3DModel

    with torch.device("meta"):
        model = CogVideoXTransformer3DModel(**spec.transformer_config).requires_grad_(False)
    dtype_bytes = torch.finfo(getattr(torch, spec.weight_dtype)).bits // 8
    total = 0
    for name, linear in quantizable_linears(model):
        # float8 storage keeps some layers in the model's dtype (`cogtune.models.fp8`)
        stored = "bf16" if kind == "fp8" and any(pattern in name for pattern in SKIP_PATTERNS) else kind
        total += quantized_weight_bytes(stored, linear.out_features, linear.in_features, dtype_bytes)
    return total
