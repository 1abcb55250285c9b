"""Rotary embeddings and 1.5 padding match what diffusers' pipelines feed the transformer."""

from __future__ import annotations

import pytest
import torch

from cogtune.models.positions import pad_latent_frames, rotary_embeddings
from cogtune.models.registry import PRESETS, TINY_PRESETS
from cogtune.models.tiny import ensure_tiny_model


@pytest.mark.parametrize(("name", "frames", "height", "width"), [
    ("tiny-rotary", 3, 8, 8), ("tiny-rotary", 5, 8, 12), ("tiny-1.5", 4, 8, 8), ("tiny-1.5", 2, 12, 8),
])
def test_rotary_matches_the_pipeline(name, frames, height, width):
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(ensure_tiny_model(name))
    spec = TINY_PRESETS[name]
    expected = pipe._prepare_rotary_positional_embeddings(height * 8, width * 8, frames, torch.device("cpu"))
    ours = rotary_embeddings(spec, frames, height, width)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b)


def test_sincos_models_take_no_rotary():
    assert rotary_embeddings(TINY_PRESETS["tiny"], 3, 8, 8) is None


def test_real_grid_sizes():
    cos, _ = rotary_embeddings(PRESETS["cogvideox-5b"], 13, 60, 90)
    assert cos.shape == (13 * 30 * 45, 64)
    cos, _ = rotary_embeddings(PRESETS["cogvideox1.5-5b"], 22, 96, 170)
    assert cos.shape == (11 * 48 * 85, 64)


def test_one_point_five_prepends_the_first_frame():
    latents = torch.arange(3.0).view(1, 3, 1, 1, 1).expand(2, 3, 4, 2, 2)
    padded, added = pad_latent_frames(TINY_PRESETS["tiny-1.5"], latents)
    assert added == 1 and padded.shape[1] == 4
    assert padded[0, :, 0, 0, 0].tolist() == [0.0, 0.0, 1.0, 2.0]
    same, added = pad_latent_frames(TINY_PRESETS["tiny"], latents)
    assert added == 0 and same is latents
