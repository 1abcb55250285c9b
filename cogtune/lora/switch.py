"""Turning a model's LoRA off for a while, through peft's own switch: the base model, same weights in memory.

Used to compare the base and the LoRA with the same inputs: training's evaluation (the LoRA's effect on
the held-out predictions), validation's and `sample --compare-base`'s side-by-side videos.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


def lora_layers(model: Any) -> list[Any]:
    """The model's peft layers (`BaseTunerLayer`): empty for a model without a LoRA."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


@contextlib.contextmanager
def lora_disabled(model: Any) -> Iterator[None]:
    """Inside, `model` computes as its base (peft's `enable_adapters(False)` on each LoRA layer); after, as before.

    peft's switch also changes the adapters' `requires_grad`: the flags are put back as they were, so a
    trainer's parameters stay trainable.
    """
    layers = lora_layers(model)
    trainable = [(parameter, parameter.requires_grad) for layer in layers for parameter in layer.parameters()]
    enabled = [not layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, was_enabled in zip(layers, enabled, strict=True):
            layer.enable_adapters(was_enabled)
        for parameter, flag in trainable:
            parameter.requires_grad_(flag)
