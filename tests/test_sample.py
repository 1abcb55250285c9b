"""`cogtune sample`: frame count and size, seeds, LoRA scale."""

from __future__ import annotations

import numpy as np
import pytest

from cogtune.data.video import probe_video, read_all_frames
from cogtune.errors import ConfigError
from cogtune.sample import SampleConfig, run_sample


def _sample(tmp_path, name, **kwargs):
    config = SampleConfig(model="tiny", prompts=("A red circle moves left.",), output=str(tmp_path / name),
                          steps=3, frames=9, height=64, width=64, **kwargs)
    (path,) = run_sample(config)
    return path


def test_sample_has_the_asked_shape(tmp_path):
    path = _sample(tmp_path, "a.mp4")
    info = probe_video(path)
    assert (info.frames, info.height, info.width, info.fps) == (9, 64, 64, 8.0)


def test_same_seed_same_video_other_seed_other_video(tmp_path):
    a = read_all_frames(_sample(tmp_path, "a.mp4", seed=1)).astype(int)
    b = read_all_frames(_sample(tmp_path, "b.mp4", seed=1)).astype(int)
    c = read_all_frames(_sample(tmp_path, "c.mp4", seed=2)).astype(int)
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 1


def test_refuses_to_overwrite(tmp_path):
    _sample(tmp_path, "a.mp4")
    with pytest.raises(ConfigError, match="exists; pass --overwrite"):
        _sample(tmp_path, "a.mp4")
    _sample(tmp_path, "a.mp4", overwrite=True)


def test_impossible_frame_count_is_caught_before_loading(tmp_path):
    from cogtune.errors import ModelError

    with pytest.raises(ModelError, match="frame rule"):
        run_sample(SampleConfig(model="tiny", prompts=("x",), output=str(tmp_path / "x.mp4"), frames=10))
