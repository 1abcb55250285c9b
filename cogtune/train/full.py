"""Full fine-tuning: float32 master weights, saved as a diffusers `transformer/` folder.

Training keeps float32 master weights (the optimizer updates them; autocast runs the matmuls in
bf16/fp16 on a GPU), because bf16 weights cannot absorb small updates: a step smaller than the
weight's bf16 rounding step is lost. The saved folder is cast to the model's own dtype (bf16 for
5b, fp16 for 2b) on the host, so that it loads like the original `transformer/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cogtune.fsutil import atomic_directory

TRANSFORMER_DIR = "transformer"


def save_full_transformer(transformer: Any, target: Path, dtype: Any, dropped_learned_positions: bool,
                          state_dict: dict[str, Any] | None = None) -> None:
    """A diffusers `transformer/` folder in `dtype`, written atomically.

    A model trained without its learned positional embeddings is saved without them (config and
    weights), so that diffusers loads it at any resolution. `state_dict`: the weights gathered on
    this process, when the transformer's own are sharded (FSDP, ZeRO-3).
    """
    from huggingface_hub import save_torch_state_dict

    source = transformer.state_dict() if state_dict is None else state_dict
    state = {name: tensor.detach().to("cpu", dtype=dtype) for name, tensor in source.items()}
    if dropped_learned_positions:
        state.pop("patch_embed.pos_embedding", None)
    with atomic_directory(target, replace=True) as tmp:
        transformer.save_config(tmp)
        if dropped_learned_positions:
            import json

            config_path = tmp / "config.json"
            config = json.loads(config_path.read_text())
            config["use_learned_positional_embeddings"] = False
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_torch_state_dict(state, tmp, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                              max_shard_size="10GB")


def load_full_transformer_into(transformer: Any, folder: Path) -> None:
    """Load a saved `transformer/` folder's weights into a live (training) transformer, in its dtype."""
    from diffusers import CogVideoXTransformer3DModel

    loaded = CogVideoXTransformer3DModel.from_pretrained(folder, torch_dtype=next(transformer.parameters()).dtype)
    missing, unexpected = transformer.load_state_dict(loaded.state_dict(), strict=False)
    bad = [k for k in missing if k != "patch_embed.pos_embedding"] + list(unexpected)
    if bad:
        raise RuntimeError(f"checkpoint {folder} does not match the model: {bad[:3]}")

