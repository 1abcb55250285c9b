"""Video probing, decoding and writing."""

from __future__ import annotations

import numpy as np
import pytest

from cogtune.data.synthetic import render_clip
from cogtune.data.video import VideoReadError, probe_video, read_frames, write_video


def test_write_then_probe_and_read(tmp_path):
    clip = render_clip("square", "blue", "down", frames=11, height=48, width=80)
    path = write_video(tmp_path / "clip.mp4", clip, fps=12)
    info = probe_video(path)
    assert (info.frames, info.width, info.height, info.fps) == (11, 80, 48, 12.0)
    assert info.duration == pytest.approx(11 / 12)
    frames = read_frames(path, [0, 5, 10])
    assert frames.shape == (3, 48, 80, 3) and frames.dtype == np.uint8
    # lossy, but the blue square is still there
    assert np.abs(frames[0].astype(int) - clip[0].astype(int)).mean() < 8
    assert not list(tmp_path.glob(".tmp-*"))


def test_float_frames_are_accepted(tmp_path):
    path = write_video(tmp_path / "f.mp4", np.full((5, 16, 16, 3), 0.5, dtype=np.float32), fps=8)
    assert probe_video(path).frames == 5


@pytest.mark.parametrize(("content", "code"), [(b"", "empty-video"), (b"not a video at all" * 100, "unreadable-video")])
def test_broken_files_have_codes(tmp_path, content, code):
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(VideoReadError) as info:
        probe_video(path)
    assert info.value.code == code


def test_missing_file(tmp_path):
    with pytest.raises(VideoReadError) as info:
        probe_video(tmp_path / "nope.mp4")
    assert info.value.code == "missing-file"
