"""The clip loader: frame sampling, aspect-preserving resize and crop, buckets."""

from __future__ import annotations

import pytest
import torch

from cogtune.data.clips import Bucket, choose_bucket, load_clip, resize_frames, sample_frame_indices
from cogtune.data.synthetic import render_clip
from cogtune.data.video import VideoInfo, write_video
from cogtune.errors import DataError


def test_uniform_indices_cover_the_clip():
    assert sample_frame_indices(17, 9) == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    assert sample_frame_indices(5, 5) == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match="fewer than the 9"):
        sample_frame_indices(8, 9)


def test_bucket_parsing():
    assert Bucket.parse("49x480x720") == Bucket(49, 480, 720)
    assert str(Bucket(9, 64, 96)) == "9x64x96"
    with pytest.raises(DataError, match="FRAMESxHEIGHTxWIDTH"):
        Bucket.parse("480x720")
    with pytest.raises(DataError, match="FRAMESxHEIGHTxWIDTH"):
        Bucket.parse("0x480x720")


def test_bucket_choice_prefers_aspect_then_frames():
    buckets = [Bucket(49, 480, 720), Bucket(25, 480, 720), Bucket(49, 720, 480)]
    assert choose_bucket(VideoInfo(100, 8, 1280, 720), buckets) == Bucket(49, 480, 720)
    assert choose_bucket(VideoInfo(30, 8, 1280, 720), buckets) == Bucket(25, 480, 720)
    assert choose_bucket(VideoInfo(100, 8, 720, 1280), buckets) == Bucket(49, 720, 480)
    assert choose_bucket(VideoInfo(10, 8, 1280, 720), buckets) is None


def test_resize_keeps_aspect_and_center_crops():
    frames = torch.zeros(1, 40, 80, 3, dtype=torch.uint8).numpy()
    frames[:, :, 30:50] = 255  # a white band in the middle third
    out = resize_frames(frames, 32, 32)
    assert out.shape == (1, 3, 32, 32)
    assert out.min() >= -1 and out.max() <= 1
    # the crop keeps the centre: the band now spans the middle of the output
    assert out[0, 0, 16, 16] > 0.9 and out[0, 0, 16, 0] < -0.9
    stretched = resize_frames(frames, 32, 32, mode="stretch")
    assert stretched[0, 0, 16, 0] < -0.9 and stretched[0, 0, 16, 15] > 0.9


def test_load_clip_shapes(tmp_path):
    path = write_video(tmp_path / "c.mp4", render_clip("circle", "red", "left", 17, 64, 96), fps=8)
    clip = load_clip(path, Bucket(9, 32, 32))
    assert clip.shape == (9, 3, 32, 32) and clip.dtype == torch.float32


def test_fps_sampling_takes_the_middle_at_the_target_rate():
    from cogtune.data.clips import frame_indices, sampleable_frames

    info = VideoInfo(frames=100, fps=24, width=64, height=64)
    # 24 fps -> 8 fps: every 3rd frame; 5 frames span 13 source frames, centred in 100
    assert frame_indices(info, 5, "fps", 8) == [43, 46, 49, 52, 55]
    assert sampleable_frames(info, "fps", 8) == 34
    assert frame_indices(info, 5) == [0, 25, 50, 74, 99]  # uniform keeps first and last
    with pytest.raises(DataError, match="need 103"):
        frame_indices(info, 35, "fps", 8)
    with pytest.raises(DataError, match="no frame rate"):
        frame_indices(VideoInfo(100, 0, 64, 64), 5, "fps", 8)


def test_clip_loading_is_deterministic(tmp_path):
    path = write_video(tmp_path / "c.mp4", render_clip("circle", "red", "left", 17, 64, 96), fps=8)
    first = load_clip(path, Bucket(9, 32, 48), sampling="fps", target_fps=8)
    second = load_clip(path, Bucket(9, 32, 48), sampling="fps", target_fps=8)
    assert torch.equal(first, second)
