"""LoRA layers through peft, added to the transformer before training.

The file format (saving, loading for resume, the recorded info) is `cogtune.lora.format`.
"""

from __future__ import annotations

from typing import Any

from cogtune.errors import ConfigError
from cogtune.models.registry import ModelSpec
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


def check_lora_targets(spec: ModelSpec, config: LoraConfig) -> None:
    """Refuse, before any weight loads, a target that names no module of the transformer.

    The transformer is built on the meta device (no memory) and each target is matched as peft
    matches it (`check_target_module_exists`): peft itself would fail only after the weights load
    when none matches, and say nothing when some targets match and others do not.
    """
    import torch
    from diffusers import CogVideoXTransformer3DModel
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    with torch.device("meta"):
        modules = dict(CogVideoXTransformer3DModel(**spec.transformer_config).named_modules())
    missing = [target for target in config.target_modules
               if not any(check_target_module_exists(PeftLoraConfig(target_modules=[target]), name)
                          for name in modules if name)]
    if missing:
        linears = [name.split(".", 2)[-1] for name, module in modules.items()
                   if name.startswith("transformer_blocks.0.") and isinstance(module, torch.nn.Linear)]
        raise ConfigError(f"--lora-target {', '.join(missing)} matches no module of {spec.name}'s transformer",
                          hint=f"each block's linear layers: {', '.join(linears)}")
