"""A latent cache of random tensors with the right shapes, for measuring real training runs.

Memory and speed do not depend on the values in the cache, so `bench memory --measure` trains on
random latents and embeddings of the benchmarked clip shape, written in the real cache format.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cogtune.encode.cache import (
    CACHE_FORMAT,
    CACHE_VERSION,
    EMPTY_PROMPT_FILE,
    MANIFEST_NAME,
    VALIDATION_PROMPTS_FILE,
    compatibility,
    latent_file,
    text_file,
    write_safetensors,
)
from cogtune.fsutil import atomic_write_text
from cogtune.models.registry import ModelSpec

VALIDATION_PROMPT = "A benchmark clip."


def write_synthetic_cache(spec: ModelSpec, shape: tuple[int, int, int], items: int, root: str | Path) -> Path:
    root = Path(root)
    frames, height, width = shape
    generator = torch.Generator().manual_seed(0)
    dtype = torch.float32 if spec.weight_dtype == "float32" else torch.bfloat16
    latent_shape = (2 * spec.latent_channels, spec.latent_frames(frames), height // spec.spatial_compression,
                    width // spec.spatial_compression)
    text_shape = (spec.max_text_tokens, spec.text_embed_dim)
    bucket = f"{frames}x{height}x{width}"
    manifest_items = []
    for index in range(items):
        tensors = {"latent_dist": torch.randn(latent_shape, generator=generator).to(dtype)}
        if spec.is_i2v:
            tensors["image_latent_dist"] = torch.randn((latent_shape[0], 1, *latent_shape[2:]), generator=generator).to(dtype)
        write_safetensors(root / latent_file(index), tensors, {"key": f"synthetic-{index}", "bucket": bucket})
        write_safetensors(root / text_file(index), {"prompt_embeds": torch.randn(text_shape, generator=generator).to(dtype)},
                          {"key": f"synthetic-{index}", "num_tokens": 10})
        manifest_items.append({"index": index, "latent_file": latent_file(index), "text_file": text_file(index),
                               "bucket": bucket, "caption": "synthetic", "video": None, "line": None})
    write_safetensors(root / EMPTY_PROMPT_FILE, {"prompt_embeds": torch.zeros(text_shape, dtype=dtype)}, {"key": "empty"})
    write_safetensors(root / VALIDATION_PROMPTS_FILE, {"prompt_embeds": torch.zeros((1, *text_shape), dtype=dtype)},
                      {"key": "validation", "prompts": [VALIDATION_PROMPT]})
    manifest = {
        "format": CACHE_FORMAT, "format_version": CACHE_VERSION, "complete": True, "synthetic": True,
        "model": spec.describe(), "compatibility": compatibility(spec), "buckets": [bucket], "i2v": spec.is_i2v,
        "validation_prompts": [VALIDATION_PROMPT], "empty_prompt_file": EMPTY_PROMPT_FILE, "items": manifest_items,
    }
    atomic_write_text(root / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return root
