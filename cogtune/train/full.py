"""Full fine-tuning: float32 master weights, saved as a diffusers `transformer/` folder.

Training keeps float32 master weights (the optimizer updates them; autocast runs the matmuls in
bf16/fp16 on a GPU), because bf16 weights cannot absorb small updates: a step smaller than the
weight's bf16 rounding step is lost. The saved folder is cast to the model's own dtype (bf16 for
5b, fp16 for 2b) on the host, so that it loads like the original `transformer/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

def load_full_transformer_into(transformer: Any, folder: Path) -> None:
    """Load a saved `transformer/` folder's weights into a live (training) transformer, in its dtype."""
    from diffusers import CogVideoXTransformer3DModel

    loaded = CogVideoXTransformer3DModel.from_pretrained(folder, torch_dtype=next(transformer.parameters()).dtype)
    missing, unexpected = transformer.load_state_dict(loaded.state_dict(), strict=False)
    bad = [k for k in missing if k != "patch_embed.pos_embedding"] + list(unexpected)
    if bad:
        raise RuntimeError(f"checkpoint {folder} does not match the model: {bad[:3]}")

