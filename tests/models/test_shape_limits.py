"""Clip shapes are checked up front against every limit the pipelines and the model have.

The oracle for 1.5's size limit is the diffusers pipeline: a shape cogtune accepts must sample, and
a shape it refuses must make the pipeline fail.
"""

from __future__ import annotations

import pytest
import torch

from cogtune.errors import ModelError
from cogtune.models.registry import PRESETS, TINY_PRESETS
from cogtune.models.tiny import ensure_tiny_model


@pytest.mark.parametrize(("height", "width"), [(128, 128), (64, 128), (144, 64), (64, 144), (160, 160)])
def test_size_limit_is_where_the_pipeline_fails(height, width):
    from diffusers import CogVideoXPipeline

    spec = TINY_PRESETS["tiny-1.5"]
    pipe = CogVideoXPipeline.from_pretrained(ensure_tiny_model("tiny-1.5"))
    pipe.set_progress_bar_config(disable=True)
    accepted = not spec.shape_problems(9, height, width)
    try:
        pipe(prompt="a red circle", num_frames=9, height=height, width=width, num_inference_steps=1,
             output_type="latent", max_sequence_length=spec.max_text_tokens, generator=torch.Generator().manual_seed(0))
        sampled = True
    except RuntimeError:
        sampled = False
    assert accepted == sampled


def test_real_presets_limits():
    # The published 1.5 configs: sample_height = sample_width = 300 latent pixels.
    assert PRESETS["cogvideox1.5-5b"].max_resolution == (2400, 2400)
    assert not PRESETS["cogvideox1.5-5b-i2v"].shape_problems(81, 768, 1360)
    (problem,) = PRESETS["cogvideox1.5-5b"].shape_problems(81, 2416, 768)
    assert "2416x768 exceeds cogvideox1.5-5b's largest size 2400x2400" in problem
    # 1.0 models compute their positions for any size (sincos on the fly, rotary by crop region).
    assert PRESETS["cogvideox-5b"].max_resolution is None and PRESETS["cogvideox-2b"].max_resolution is None
    assert not PRESETS["cogvideox-5b"].shape_problems(49, 1360, 768)


def test_all_shapes_are_reported_in_one_line():
    spec = TINY_PRESETS["tiny-1.5"]
    with pytest.raises(ModelError) as caught:
        spec.check_clip_shapes({"bucket 9x64x64": (9, 64, 64), "bucket 13x64x64": (13, 64, 64),
                                "validation": (9, 192, 64)})
    message = str(caught.value)
    assert "\n" not in message
    assert "bucket 13x64x64: 13 frames breaks" in message and "validation: 192x64 exceeds" in message
    assert "bucket 9x64x64" not in message


def test_encode_refuses_a_bucket_too_large(cli, synthetic_data, tmp_path):
    result = cli("encode", "--model", "tiny-1.5", "--data-root", synthetic_data, "--output-dir", tmp_path / "cache",
                 "--buckets", "9x64x64", "--buckets", "9x192x64")
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert "bucket 9x192x64: 192x64 exceeds tiny-1.5's largest size 128x128" in line
    assert not (tmp_path / "cache").exists()
