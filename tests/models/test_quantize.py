"""A quantized frozen base, checked against the libraries that quantize it (bitsandbytes, torchao) and peft.

Oracles: a quantized layer computes `F.linear(x, W')` with `W'` the library's own dequantization of
its weight (bitsandbytes' `dequantize_4bit`, torchao's `dequantize`, and for torchao's NF4 tensor its
`get_original_weight`); peft's LoRA on the quantized layer
has the gradients of a LoRA on a plain Linear holding `W'`; the bytes the quantized transformer holds
(every parameter, buffer and quantization-state tensor, by storage) are the estimator's frozen-weights
figure.

Tolerances (float32, unit roundoff u = 2^-24): a dot product of K terms computed in any order is within
gamma_K = K u / (1 - K u) of the exact one, relative to the sum of the terms' magnitudes; two such
computations are within twice that of each other (and a bias adds one rounding). The gradients
of the LoRA (a loss quadratic in the output) pass through three such products over at most K terms each:
they are compared within 3 * 2 * gamma_K times their largest magnitude.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

import pytest
import torch
import torch.nn.functional as F

from cogtune.models.quantize import quantize_frozen_linears

U = 2.0**-24
IN, OUT, RANK = 128, 96, 4


def _gamma(terms: int) -> float:
    return terms * U / (1 - terms * U)


# Storages by test id: (memory.base_weights, memory.nf4_backend); "nf4" is bitsandbytes' (the CPU's "auto").
STORAGES = {"nf4": ("nf4", "bitsandbytes"), "nf4-torchao": ("nf4", "torchao"), "int8": ("int8", "auto")}


def _quantized_linear(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(IN, OUT)).requires_grad_(False)
    quantize_frozen_linears(model, *STORAGES[kind][:1], torch.float32, "cpu", STORAGES[kind][1])
    return model


def _dequantized(layer: torch.nn.Module, kind: str) -> torch.Tensor:
    """The library's own dequantization of a quantized layer's weight."""
    if kind == "nf4":
        import bitsandbytes.functional

        return bitsandbytes.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    if kind == "nf4-torchao":
        return layer.weight.get_original_weight()
    return layer.weight.dequantize()


@pytest.mark.parametrize("kind", ["nf4", "nf4-torchao", "int8"])
def test_a_quantized_linear_computes_with_the_librarys_dequantized_weight(kind):
    model = _quantized_linear(kind)
    layer = model[0]
    assert type(layer).__module__.split(".")[0] == ("bitsandbytes" if kind == "nf4" else "torch")
    assert type(layer.weight).__module__.split(".")[0] == ("bitsandbytes" if kind == "nf4" else "torchao")
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(1))
    weight = _dequantized(layer, kind)
    with torch.no_grad():
        ours = model(x)
        reference = F.linear(x, weight, layer.bias)
    bound = 2 * _gamma(IN + 1) * (x.abs() @ weight.abs().T + layer.bias.abs())
    assert ((ours - reference).abs() <= bound).all()
    assert not torch.equal(weight, torch.zeros_like(weight))


@pytest.mark.parametrize("kind", ["nf4", "nf4-torchao", "int8"])
def test_lora_gradients_on_a_quantized_base_equal_those_on_its_dequantized_weight(kind):
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import Linear
    from peft.tuners.lora.bnb import Linear4bit
    from peft.tuners.lora.torchao import TorchaoLoraLinear

    quantized = _quantized_linear(kind)
    plain = torch.nn.Sequential(torch.nn.Linear(IN, OUT)).requires_grad_(False)
    with torch.no_grad():
        plain[0].weight.copy_(_dequantized(quantized[0], kind))
        plain[0].bias.copy_(quantized[0].bias)
    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["0"])
    inject_adapter_in_model(config, quantized)
    inject_adapter_in_model(config, plain)
    # peft's layer for it (for torchao's NF4 Linear its plain one: torchao computes `F.linear` on an NF4 weight)
    assert type(quantized[0]) is {"nf4": Linear4bit, "nf4-torchao": Linear, "int8": TorchaoLoraLinear}[kind]
    generator = torch.Generator().manual_seed(2)
    for name in ("lora_A", "lora_B"):  # the same LoRA on both, B non-zero so that A gets a gradient
        value = torch.randn(getattr(plain[0], name)["default"].weight.shape, generator=generator) * 0.1
        for model in (quantized, plain):
            getattr(model[0], name)["default"].weight.data.copy_(value)
    x = torch.randn(6, IN, generator=generator)
    gradients = []
    for model in (quantized, plain):
        (model(x) ** 2).sum().backward()
        gradients.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) == 2
    for name, ours in gradients[0].items():
        reference = gradients[1][name]
        assert (ours - reference).abs().max() <= 3 * 2 * _gamma(IN + 1) * reference.abs().max(), name


def _held_bytes(model: torch.nn.Module) -> int:
    """Bytes of every storage the model holds: parameters, buffers and the libraries' quantization state
    (bitsandbytes' QuantState tensors; a torchao tensor's inner tensors), each storage once."""
    storages: dict[int, int] = {}

    def add(tensor):
        if tensor is None:
            return
        if hasattr(tensor, "__tensor_flatten__") and type(tensor) is not torch.nn.Parameter:
            names, _ = tensor.__tensor_flatten__()
            for inner in names:
                add(getattr(tensor, inner))
            return
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()

    def add_quant_state(state):
        for value in vars(state).values():
            if isinstance(value, torch.Tensor):
                add(value)
            elif type(value).__name__ == "QuantState":
                add_quant_state(value)

    for tensor in [*model.parameters(), *model.buffers()]:
        data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
        add(data)
        if getattr(tensor, "quant_state", None) is not None:
            add_quant_state(tensor.quant_state)
    return sum(storages.values())


def _shrunk(model: str, **transformer):
    from cogtune.models.registry import ALL_PRESETS

    spec = ALL_PRESETS[model]
    return dataclasses.replace(spec, transformer_config=MappingProxyType({**spec.transformer_config, **transformer}))


@pytest.mark.parametrize(("model", "kind"), [("tiny", "nf4"), ("tiny", "int8"), ("tiny-1.5-i2v", "nf4"),
                                             ("5b-cut", "nf4"), ("5b-cut", "int8"), ("tiny", "nf4-torchao"),
                                             ("5b-cut", "nf4-torchao")])
def test_the_bytes_a_quantized_transformer_holds_are_the_estimates(model, kind, monkeypatch):
    """Real tensors (random weights in the model's dtype, quantized as a run quantizes them) against the
    estimator's frozen-weights figure, for tiny presets and a 5b cut to 2 blocks and 2 heads."""
    from diffusers import CogVideoXTransformer3DModel

    import cogtune.train.sizing.estimate as estimate_module
    from cogtune.config import replace_settings
    from cogtune.models.registry import ALL_PRESETS
    from cogtune.train.config import TrainConfig

    specs = {"5b-cut": _shrunk("cogvideox-5b", num_layers=2, num_attention_heads=2)}
    spec = specs.get(model) or ALL_PRESETS[model]
    real = estimate_module.model_spec
    monkeypatch.setattr(estimate_module, "model_spec", lambda reference: specs.get(reference) or real(reference))
    config = TrainConfig(task="i2v" if spec.is_i2v else "t2v", model=model, data="<bench>", output_dir="<bench>",
                         random_weights=True)
    base_weights, backend = STORAGES[kind]
    config = replace_settings(config, {"memory.base_weights": base_weights, "memory.nf4_backend": backend,
                                       "validation.final": False})
    estimate = estimate_module.estimate_run(config, [(9, 64, 64)], steps=1)

    dtype = getattr(torch, spec.weight_dtype)
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(**spec.transformer_config).to(dtype).requires_grad_(False)
    quantize_frozen_linears(transformer, base_weights, dtype, "cpu", backend)
    assert _held_bytes(transformer) == estimate.frozen_weight_bytes
