"""The LoRA file: saved in the format diffusers' CogVideoX pipelines load, read back by cogtune.

The adapter config (rank, alpha, target modules) is stored in the safetensors metadata under the
key diffusers reads (`lora_adapter_metadata`, read by diffusers 0.34 and later), so
`pipe.load_lora_weights(OUT)` rebuilds the adapter with the trained alpha and the LoRA acts at its
trained scale, with no `set_adapters` call. A second key, `cogtune`, records what it was trained
for (model family, buckets, whether 5b-I2V's learned positional embeddings were dropped); diffusers
ignores it, `cogtune sample` reads it.

This module sits below both training (which writes LoRAs) and sampling (which reads them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cogtune.fsutil import atomic_path

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
# The other layouts a run can also write (`--save-format`), beside LORA_WEIGHTS_NAME.
LAYOUT_FILE_NAMES = {"comfyui": "lora_comfyui.safetensors", "kohya": "lora_kohya.safetensors"}
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key
COGTUNE_METADATA_KEY = "cogtune"


def lora_state_dict(transformer: Any, state_dict: dict[str, Any] | None = None) -> dict[str, Any]:
    """The LoRA weights, from the live transformer or from a state dict of it (gathered from shards)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer, state_dict=state_dict)


def save_lora(directory: str | Path, transformer: Any, info: dict[str, Any] | None = None,
              state_dict: dict[str, Any] | None = None) -> Path:
    """Write `directory/pytorch_lora_weights.safetensors` atomically, in diffusers' format.

    `state_dict`: the transformer's weights gathered on this process, when its own are sharded
    (FSDP, ZeRO-3); the transformer then only supplies the adapter config.
    """
    from diffusers import CogVideoXPipeline

    directory = Path(directory)
    target = directory / LORA_WEIGHTS_NAME
    state = {k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(transformer, state_dict).items()}
    adapter = transformer.peft_config["default"].to_dict()
    # diffusers keys the adapter config by component ("transformer.r", ...), as its own writer does;
    # the round-trip test (load_lora_weights gives the trained output) guards this format.
    adapter = {f"transformer.{k}": sorted(v) if isinstance(v, set) else v for k, v in adapter.items()}
    metadata = {"format": "pt", ADAPTER_METADATA_KEY: json.dumps(adapter, sort_keys=True),
                COGTUNE_METADATA_KEY: json.dumps(info or {}, sort_keys=True)}
    with atomic_path(target) as tmp:
        # diffusers names the keys (`transformer.` prefix) and hands them to our save function.
        CogVideoXPipeline.save_lora_weights(
            str(tmp.parent), transformer_lora_layers=state, weight_name=tmp.name, safe_serialization=True,
            save_function=lambda weights, filename: save_file(weights, filename, metadata=metadata),
        )
    return target


def read_lora_info(path: str | Path) -> dict[str, Any]:
    """What cogtune recorded about a LoRA file (empty for LoRAs from elsewhere)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    try:
        return json.loads(metadata.get(COGTUNE_METADATA_KEY, "{}"))
    except json.JSONDecodeError:
        return {}


def load_lora_state(transformer: Any, path: str | Path) -> None:
    """Load weights saved by `save_lora` into the transformer's existing adapter (for resuming)."""
    from peft.utils import set_peft_model_state_dict

    state = load_file(str(path))
    prefix = "transformer."
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    result = set_peft_model_state_dict(transformer, state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"unexpected LoRA keys in {path}: {unexpected[:3]}")
    # The base weights are missing by design (the file holds the LoRA only); a LoRA weight must not be:
    # its layer would silently start again from its initial value.
    missing = [key for key in getattr(result, "missing_keys", []) if ".lora_" in key]
    if missing:
        raise RuntimeError(f"{path} lacks {len(missing)} of the LoRA's weights, e.g. {missing[0]}")
