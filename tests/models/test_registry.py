"""The registry: each preset's architecture and the per-model rules derived from its configs."""

from __future__ import annotations

import pytest

from cogtune.errors import ModelError
from cogtune.models.loading import count_parameters
from cogtune.models.registry import ALL_PRESETS, PRESETS, TINY_PRESETS, get_preset, spec_from_configs


@pytest.mark.parametrize(("name", "expected"), [
    ("cogvideox-2b", 1.69e9),
    ("cogvideox-5b", 5.57e9),
    ("cogvideox-5b-i2v", 5.57e9),
    ("cogvideox1.5-5b", 5.57e9),
    ("cogvideox1.5-5b-i2v", 5.57e9),
])
def test_transformer_parameter_counts_on_the_meta_device(name, expected):
    count = count_parameters(PRESETS[name])
    assert abs(count - expected) / expected < 0.005, f"{name}: {count:.4g}"


@pytest.mark.parametrize(("name", "family", "dtype", "hub_id"), [
    ("cogvideox-2b", "1.0-sincos", "float16", "THUDM/CogVideoX-2b"),
    ("cogvideox-5b", "1.0-rotary", "bfloat16", "THUDM/CogVideoX-5b"),
    ("cogvideox-5b-i2v", "1.0-rotary-learned-i2v", "bfloat16", "THUDM/CogVideoX-5b-I2V"),
    ("cogvideox1.5-5b", "1.5-rotary", "bfloat16", "THUDM/CogVideoX1.5-5B"),
    ("cogvideox1.5-5b-i2v", "1.5-rotary-i2v-ofs", "bfloat16", "THUDM/CogVideoX1.5-5B-I2V"),
])
def test_each_preset_knows_its_family(name, family, dtype, hub_id):
    spec = PRESETS[name]
    assert (spec.family, spec.weight_dtype, spec.hub_id) == (family, dtype, hub_id)


def test_latent_scaling_follows_the_pipelines():
    assert PRESETS["cogvideox-2b"].video_latent_scale == pytest.approx(1.15258426)
    five = PRESETS["cogvideox-5b-i2v"]
    assert five.video_latent_scale == five.image_latent_scale == pytest.approx(0.7)
    one_five = PRESETS["cogvideox1.5-5b-i2v"]
    assert one_five.invert_scale_latents
    assert one_five.video_latent_scale == pytest.approx(0.7)
    assert one_five.image_latent_scale == pytest.approx(1 / 0.7)


def test_defaults_and_channels():
    assert (PRESETS["cogvideox-5b"].default_frames, PRESETS["cogvideox-5b"].default_height) == (49, 480)
    assert PRESETS["cogvideox1.5-5b"].default_frames == 81 and PRESETS["cogvideox1.5-5b"].fps == 16
    assert PRESETS["cogvideox-5b-i2v"].is_i2v and not PRESETS["cogvideox-5b"].is_i2v
    assert PRESETS["cogvideox-5b"].max_text_tokens == 226


def test_frame_rule():
    spec = PRESETS["cogvideox-5b"]
    assert spec.frame_problems(49) == []
    assert "8k+1" in spec.frame_problems(48)[0] and "nearest below: 41" in spec.frame_problems(48)[0]
    # 4k+1 is not enough: 13 frames encode to 4 latents, which the VAE decodes to 16 frames
    assert "nearest below: 9" in spec.frame_problems(13)[0]
    assert "fewer than the minimum" in spec.frame_problems(3)[0]
    assert spec.latent_frames(49) == 13


def test_one_point_five_pads_latent_frames_to_the_temporal_patch():
    spec = PRESETS["cogvideox1.5-5b"]
    assert spec.latent_frames(81) == 21
    assert spec.padded_latent_frames(81) == 22
    assert spec.padded_latent_frames(85) == 22
    assert spec.transformer_grid(81, 768, 1360) == (11, 48, 85)
    assert PRESETS["cogvideox-5b"].transformer_grid(49, 480, 720) == (13, 30, 45)


def test_resolution_rule():
    spec = PRESETS["cogvideox-5b"]
    assert spec.resolution_problems(480, 720) == []
    assert "multiple of 16" in spec.resolution_problems(481, 720)[0]
    with pytest.raises(ModelError, match="height 100"):
        spec.check_clip_shape(49, 100, 720)


def test_tiny_presets_cover_every_family():
    families = {spec.family for spec in TINY_PRESETS.values()}
    real = {spec.family for spec in PRESETS.values()}
    assert real - {"1.0-sincos"} <= families | {"1.0-sincos"}
    assert families == real
    assert all(spec.tiny and spec.weight_dtype == "float32" for spec in TINY_PRESETS.values())


def test_unknown_preset():
    with pytest.raises(ModelError, match="unknown preset 'cogvideox-9b'"):
        get_preset("cogvideox-9b")


def test_spec_from_configs_finds_the_architecture_twin():
    base = PRESETS["cogvideox-5b"]
    spec = spec_from_configs("my-finetune", {**base.transformer_config, "_class_name": "X"}, base.vae_config,
                             base.scheduler_config)
    assert spec.weight_dtype == "bfloat16" and spec.default_frames == 49 and spec.family == base.family
    assert "_class_name" not in spec.transformer_config


def test_all_presets_are_listed_together():
    assert set(ALL_PRESETS) == set(PRESETS) | set(TINY_PRESETS)
