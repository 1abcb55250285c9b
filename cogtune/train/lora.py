"""LoRA layers through peft, added to the transformer before training.

The file format (saving, loading for resume, the recorded info) is `cogtune.lora.format`.
"""

from __future__ import annotations

from typing import Any

from cogtune.train.config import LoraConfig


def add_lora(transformer: Any, config: LoraConfig) -> None:
    from peft import LoraConfig as PeftLoraConfig

    transformer.add_adapter(PeftLoraConfig(
        r=config.rank,
        lora_alpha=config.effective_alpha,
        lora_dropout=config.dropout,
        init_lora_weights=True,
        target_modules=list(config.target_modules),
    ))
