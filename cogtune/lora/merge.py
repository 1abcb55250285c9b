"""Fold a LoRA into its base transformer: a plain diffusers `transformer/` folder, for tools that take
no LoRA and for quantizing afterwards.

diffusers does the work: the LoRA (any layout, converted in memory to diffusers' with alpha
folded in) is loaded with `load_lora_adapter`, fused with `fuse_lora(lora_scale=S)`, the peft
layers removed with `unload_lora`, and the result saved in the model's dtype.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from cogtune import report
from cogtune.errors import ConfigError, ModelError
from cogtune.lora.layouts import ADAPTER_METADATA_KEY, read_lora, resolve_lora_path, trained_against, write_state


def merge_lora(model: str, lora: str | Path, output: str | Path, scale: float = 1.0) -> Path:
    """Write OUTPUT (config.json + safetensors) = MODEL's transformer + `scale` x the LoRA."""
    from cogtune.models.loading import load_transformer, resolve_model, save_transformer
    from cogtune.quiet import quiet_libraries

    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise ConfigError(f"{output} exists and is not empty; merge writes a new folder")
    if not math.isfinite(scale):
        raise ConfigError(f"--scale must be a finite number, not {scale}")
    lora_file = resolve_lora_path(lora)
    layers = read_lora(lora_file)
    resolved = resolve_model(model)
    spec = resolved.spec
    family = layers.info.get("family")
    if family and family != spec.family:
        raise ModelError(f"the LoRA {lora_file} was trained for {layers.info.get('model', 'another model')} "
                         f"({family}); {spec.name} is {spec.family}", hint="merge it into the model it was trained for")
    quiet_libraries()
    transformer = load_transformer(resolved)  # the unquantized base, in the model's dtype, whatever it trained against
    if trained_against(layers.info):
        report.info(f"merging into {spec.name}'s {str(transformer.dtype).removeprefix('torch.')} transformer; the LoRA "
                    f"was {trained_against(layers.info)}")
    state, metadata = write_state(layers, "diffusers")
    adapter = json.loads(metadata[ADAPTER_METADATA_KEY])
    try:
        transformer.load_lora_adapter(state, prefix="transformer", metadata=adapter, adapter_name="merge")
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"the LoRA {lora_file} does not fit {spec.name}: {first}",
                         hint="merge it into the model it was trained for") from exc
    transformer.fuse_lora(lora_scale=scale)
    transformer.unload_lora()
    drop = bool(layers.info.get("drop_learned_positional_embeddings"))
    # as a full fine-tune is saved: without 5b-I2V's learned positions when the LoRA was trained without
    # them, so that `cogtune sample --transformer` samples it the way it was trained
    save_transformer(transformer, output, transformer.dtype, drop)
    return output
