"""Positional inputs the transformer takes from outside: rotary embeddings and 1.5's frame padding.

Both follow diffusers' CogVideoX pipelines exactly, so that what a model sees in training is what
it sees when sampling: 1.0 rotary uses the `linspace` grid with the pipelines' resize-crop region
against the model's base size; 1.5 uses the `slice` grid over `sample_height x sample_width`
patches and counts temporal patches, not latent frames.
"""

from __future__ import annotations

from typing import Any

import torch

from cogtune.models.registry import ModelSpec


def rotary_embeddings(spec: ModelSpec, latent_frames: int, latent_height: int, latent_width: int,
                      device: Any = None) -> tuple[Any, Any] | None:
    """(cos, sin) for a latent grid, or None for sincos models. `latent_frames` is after padding."""
    if spec.positional_embedding != "rotary":
        return None
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    config = spec.transformer_config
    p = spec.patch_size
    p_t = spec.patch_size_t
    grid_height, grid_width = latent_height // p, latent_width // p
    base_height, base_width = int(config["sample_height"]) // p, int(config["sample_width"]) // p
    head_dim = int(config["attention_head_dim"])
    if p_t is None:
        crops = get_resize_crop_region_for_grid((grid_height, grid_width), base_width, base_height)
        return get_3d_rotary_pos_embed(
            embed_dim=head_dim, crops_coords=crops, grid_size=(grid_height, grid_width),
            temporal_size=latent_frames, device=device,
        )
    return get_3d_rotary_pos_embed(
        embed_dim=head_dim, crops_coords=None, grid_size=(grid_height, grid_width),
        temporal_size=(latent_frames + p_t - 1) // p_t, grid_type="slice", max_size=(base_height, base_width),
        device=device,
    )


def pad_latent_frames(spec: ModelSpec, latents: Any) -> tuple[Any, int]:
    """Pad (B, F, C, H, W) latents to a multiple of 1.5's temporal patch by repeating the first frame.

    The pipelines prepend the padding (and drop it after denoising), so training prepends too.
    Returns the padded latents and the number of frames added.
    """
    missing = spec.padded_latent_count(latents.shape[1]) - latents.shape[1]
    if missing == 0:
        return latents, 0
    first = latents[:, :1].expand(-1, missing, -1, -1, -1)
    return torch.cat([first, latents], dim=1), missing


def native_resolution(spec: ModelSpec) -> tuple[int, int]:
    """(height, width) in pixels that learned positional embeddings were made for."""
    config = spec.transformer_config
    return (int(config["sample_height"]) * spec.spatial_compression,
            int(config["sample_width"]) * spec.spatial_compression)


def needs_learned_positions_dropped(spec: ModelSpec, shapes: list[tuple[int, int, int]]) -> bool:
    """True when a model with learned positional embeddings must see another resolution (or more frames).

    diffusers refuses other resolutions outright; more latent frames than the table holds would
    read past it. Training 5b-I2V on several resolutions needs this.
    """
    if not spec.learned_positional_embeddings:
        return False
    height, width = native_resolution(spec)
    max_frames = int(spec.transformer_config["sample_frames"])
    return any((h, w) != (height, width) or f > max_frames for f, h, w in shapes)


def drop_learned_positional_embeddings(transformer: Any) -> None:
    """Stop adding 5b-I2V's learned positional embedding; the rotary embeddings still give positions.

    The table stays in the module (a LoRA on top leaves the base weights alone); it is only no
    longer added, at any resolution. A model trained this way must be sampled the same way.
    """
    transformer.patch_embed.use_learned_positional_embeddings = False
