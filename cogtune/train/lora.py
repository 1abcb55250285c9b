"""LoRA through peft, saved in the format diffusers' CogVideoX pipelines load.

The adapter config (rank, alpha, target modules) is stored in the safetensors metadata, so that
`pipe.load_lora_weights(OUT)` rebuilds the adapter with the trained alpha: the loaded LoRA acts at
the scale it was trained at, with no `set_adapters` call.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from cogtune.train.config import LoraConfig

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def add_lora(transformer: Any, config: LoraConfig) -> None:
    from peft import LoraConfig as PeftLoraConfig

    transformer.add_adapter(PeftLoraConfig(
        r=config.rank,
        lora_alpha=config.effective_alpha,
        lora_dropout=config.dropout,
        init_lora_weights=True,
        target_modules=list(config.target_modules),
    ))


def lora_state_dict(transformer: Any) -> dict[str, Any]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer)


def save_lora(directory: str | Path, transformer: Any) -> Path:
    """Write `directory/pytorch_lora_weights.safetensors` atomically (diffusers' format)."""
    from diffusers import CogVideoXPipeline

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(transformer).items()}
    metadata = transformer.peft_config["default"].to_dict()
    with tempfile.TemporaryDirectory(prefix=".tmp-lora-", dir=directory) as tmp:
        CogVideoXPipeline.save_lora_weights(
            tmp, transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata,
            safe_serialization=True, weight_name=LORA_WEIGHTS_NAME,
        )
        target = directory / LORA_WEIGHTS_NAME
        shutil.move(str(Path(tmp) / LORA_WEIGHTS_NAME), str(target))
    return target


def load_lora_state(transformer: Any, path: str | Path) -> None:
    """Load weights saved by `save_lora` into the transformer's existing adapter (for resuming)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(path))
    prefix = "transformer."
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    result = set_peft_model_state_dict(transformer, state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"unexpected LoRA keys in {path}: {unexpected[:3]}")
