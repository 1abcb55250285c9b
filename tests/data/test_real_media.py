"""Real-world media: many codecs, AV1 and GIF, rotation, anamorphic pixels, variable frame rate,
truncated files, unreadable files, odd folder contents.

The clips are real encoder output, made with imageio-ffmpeg's ffmpeg; what cogtune reads is judged
against what that ffmpeg decodes (`ffmpeg_frames`) or against how the clip was made.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cogtune.data.clips import Bucket, choose_bucket, frame_indices, load_clip, sampleable_frames
from cogtune.data.dataset import DatasetConfig
from cogtune.data.validate import CODES, validate_dataset
from cogtune.data.video import VideoReadError, probe_video, read_frames
from tests.conftest import run_subprocess
from tests.data.media import (
    INTERNALS,
    ffmpeg_frames,
    first_av1_encoder,
    make_clip,
    rotate,
    run_ffmpeg,
    truncate,
    write_listing,
)


def _close(ours: np.ndarray, theirs: np.ndarray, tolerance: float = 4.0) -> bool:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.abs(ours.astype(int) - theirs.astype(int)).mean()) < tolerance


def _no_internals(text: str) -> None:
    leaked = [marker for marker in INTERNALS if marker in text]
    assert not leaked, f"{leaked} in {text!r}"


@pytest.mark.parametrize(("codec", "name"), [
    ("libx264", "h264.mp4"), ("libx265", "hevc.mp4"), ("libvpx-vp9", "vp9.webm"), ("mpeg4", "mpeg4.avi"),
    ("mjpeg", "mjpeg.avi"), ("prores_ks", "prores.mov"), ("libx264", "h264.mkv"), ("libx264", "h264.ts"),
    ("gif", "anim.gif"),
])
def test_codecs_read_like_ffmpeg_reads_them(tmp_path, codec, name):
    path = make_clip(tmp_path / name, codec)
    info = probe_video(path)
    reference = ffmpeg_frames(path)
    assert (info.frames, info.width, info.height) == (len(reference), 64, 48)
    assert info.fps == pytest.approx(8, rel=0.05)
    assert _close(read_frames(path, [0, 8, 16], info), reference[[0, 8, 16]])


def test_av1_is_decoded_not_reported_as_audio(tmp_path):
    encoder = first_av1_encoder()
    path = make_clip(tmp_path / "av1.mp4", encoder)
    info = probe_video(path)
    reference = ffmpeg_frames(path)
    assert (info.frames, info.width, info.height, info.codec) == (17, 64, 48, "av1")
    assert _close(read_frames(path, [0, 16], info), reference[[0, 16]])
    pixels = load_clip(path, Bucket(9, 48, 64), info=info)
    assert pixels.shape == (9, 3, 48, 64)


@pytest.mark.parametrize(("coded", "degrees"), [("72x128", 90), ("128x72", 90), ("72x128", -90), ("72x128", 0)])
def test_rotated_and_odd_sized_clips_read_as_ffmpeg_shows_them(tmp_path, coded, degrees):
    # A 72-pixel-wide picture trips a decord bug (4 channels, then "Check failed: from_size == to_size").
    plain = make_clip(tmp_path / "plain.mp4", "libx264", size=coded)
    path = rotate(plain, tmp_path / "rotated.mp4", degrees) if degrees else plain
    reference = ffmpeg_frames(path)
    info = probe_video(path)
    assert (info.height, info.width) == reference.shape[1:3]
    assert _close(read_frames(path, [0, 5, 16], info), reference[[0, 5, 16]])
    pixels = load_clip(path, Bucket(9, *reference.shape[1:3]), info=info)
    back = ((pixels.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round()
    assert _close(back, reference[[0, 2, 4, 6, 8, 10, 12, 14, 16]])


def test_anamorphic_clip_is_cropped_as_displayed(tmp_path):
    # 64x48 stored pixels, each twice as wide as tall: shown as 128x48.
    path = make_clip(tmp_path / "sar.mp4", "libx264", extra=("-vf", "setsar=2"))
    info = probe_video(path)
    assert info.sar == pytest.approx(2.0)
    buckets = [Bucket(9, 48, 64), Bucket(9, 48, 128)]
    assert choose_bucket(info, buckets) == Bucket(9, 48, 128)  # its displayed 8:3, not the stored 4:3
    displayed = ffmpeg_frames(path, size="128:48")  # ffmpeg's own un-squeezing
    pixels = load_clip(path, Bucket(9, 48, 128), info=info)
    ours = ((pixels.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round()
    assert _close(ours, displayed[[0, 2, 4, 6, 8, 10, 12, 14, 16]])


def test_variable_frame_rate_is_sampled_by_timestamps(tmp_path):
    # 8 frames at 4 fps, then 32 at 16 fps (average 10 fps); frame n has brightness 16 + 5n.
    path = tmp_path / "vfr.mp4"
    run_ffmpeg("-f", "lavfi", "-i", "color=c=black:size=64x48:rate=16", "-frames:v", "40",
               "-vf", "geq=lum='16+N*5':cb=128:cr=128,setpts='if(lt(N,8),N*4,24+N)/16/TB'",
               "-fps_mode", "passthrough", "-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv420p", str(path))
    true_time = [n / 4 if n < 8 else 2 + (n - 8) / 16 for n in range(40)]
    reference = ffmpeg_frames(path).reshape(40, -1).mean(axis=1)  # brightness of each frame as ffmpeg decodes it

    info = probe_video(path)
    assert sampleable_frames(info, "fps", 4) == 16  # 3.94 s at 4 fps
    pixels = load_clip(path, Bucket(9, 48, 64), info=info, sampling="fps", target_fps=4)
    brightness = ((pixels.numpy() + 1) * 127.5).reshape(9, -1).mean(axis=1)
    frames = [int(np.abs(reference - b).argmin()) for b in brightness]
    gaps = np.diff([true_time[n] for n in frames])
    # At 4 fps the frames are 0.25 s apart, give or take rounding to the nearest source frame;
    # stepping by the average rate (10 fps / 4) would take every 2-3rd frame of the 16 fps part,
    # 0.125-0.19 s apart, and span 1.25 s instead of 2.
    assert np.all(np.abs(gaps - 0.25) <= 0.07), gaps
    assert gaps.sum() == pytest.approx(2.0, abs=0.07)
    assert frame_indices(info, 9, "fps", 4) == frames


def test_truncated_download_fails_validation_without_deep(tmp_path, cli):
    videos = tmp_path / "videos"
    make_clip(videos / "good.mp4", frames=33)
    whole = make_clip(tmp_path / "whole.mp4", frames=33, extra=("-movflags", "+faststart"))
    truncate(whole, videos / "cut.mp4", 0.01)
    write_listing(tmp_path, ["videos/good.mp4", "videos/cut.mp4"])
    assert len(ffmpeg_frames(videos / "cut.mp4")) < 33  # ffmpeg itself cannot decode all of it

    result = cli("dataset", "validate", str(tmp_path), "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert [(e["code"], e["path"], e["line"], e["source"]) for e in report["errors"]] == [
        ("unreadable-video", "videos/cut.mp4", 2, "videos.txt")]
    assert "truncated" in report["errors"][0]["message"]
    _no_internals(result.stdout + result.stderr)


def test_av1_gif_and_decord_bug_clips_pass_validation(tmp_path, cli):
    encoder = first_av1_encoder()
    make_clip(tmp_path / "a.mp4", encoder)
    make_clip(tmp_path / "b.gif", "gif")
    make_clip(tmp_path / "c.mp4", size="72x128")
    write_listing(tmp_path, ["a.mp4", "b.gif", "c.mp4"])
    result = cli("dataset", "validate", str(tmp_path), "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 0, report["errors"]
    assert report["stats"]["clips"] == 3 and report["stats"]["frames"]["min"] == 17


def test_broken_media_messages_hold_no_decoder_internals(tmp_path, cli):
    whole = make_clip(tmp_path / "whole.mp4", frames=33, extra=("-movflags", "+faststart"))
    truncate(whole, tmp_path / "cut_faststart.mp4", 0.05)
    truncate(make_clip(tmp_path / "whole2.mp4", frames=33), tmp_path / "cut_moov.mp4", 0.3)
    (tmp_path / "junk.mp4").write_bytes(b"\x00\x01garbage" * 300)
    run_ffmpeg("-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac", str(tmp_path / "audio.mp4"))
    names = ["cut_faststart.mp4", "cut_moov.mp4", "junk.mp4", "audio.mp4"]
    write_listing(tmp_path, names)
    # In a fresh process, so that what decord and ffmpeg write to file descriptor 2 is seen too.
    shown = run_subprocess("dataset", "validate", str(tmp_path))
    assert shown.returncode == 1 and all(name in shown.stderr for name in names)
    _no_internals(shown.stdout + shown.stderr)
    deep = cli("dataset", "validate", str(tmp_path), "--deep")
    assert deep.exit_code == 1
    _no_internals(deep.stdout + deep.stderr)
    report = json.loads(cli("dataset", "validate", str(tmp_path), "--json").stdout)
    assert [(e["path"], e["line"]) for e in report["errors"]] == [(n, i) for i, n in enumerate(names, start=1)]
    codes = {e["path"]: e["code"] for e in report["errors"]}
    assert codes["audio.mp4"] == "no-video-stream" and codes["junk.mp4"] == "unreadable-video"
    for name in names:
        with pytest.raises(VideoReadError) as info:
            read_frames(tmp_path / name, [0, 32])
        _no_internals(info.value.message)


def test_permission_denied_is_not_called_corrupt(tmp_path, monkeypatch):
    path = make_clip(tmp_path / "locked.mp4")
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: make the check see what a user would
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(path) else real_access(p, mode, **kw))
    write_listing(tmp_path, ["locked.mp4"])
    result = validate_dataset(DatasetConfig(root=str(tmp_path)))
    assert [(p.code, p.path, p.line) for p in result.errors] == [("permission-denied", "locked.mp4", 1)]
    assert "permission denied" in result.errors[0].message and "corrupt" not in result.errors[0].message
    path.chmod(0o644)


def test_folder_layout_reports_what_it_skipped(tmp_path, cli):
    make_clip(tmp_path / "good.mp4")
    (tmp_path / "good.txt").write_text("a good clip\n")
    make_clip(tmp_path / "anim.gif", "gif")
    (tmp_path / "anim.txt").write_text("a gif\n")
    (tmp_path / "gone.mp4").symlink_to(tmp_path / "deleted.mp4")
    (tmp_path / "folder.mov").mkdir()
    result = cli("dataset", "validate", str(tmp_path), "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 0 and report["items"] == 1
    skipped = {w["path"]: w["message"] for w in report["warnings"] if w["code"] == "skipped-file"}
    assert set(skipped) == {"anim.gif", "gone.mp4", "folder.mov"}
    assert "dangling symlink" in skipped["gone.mp4"] and "folder" in skipped["folder.mov"]
    assert "skipped-file" in CODES
    human = cli("dataset", "validate", str(tmp_path))
    assert "gone.mp4" in human.stderr and "anim.gif" in human.stderr


def test_listed_dangling_symlink_is_a_missing_file(tmp_path):
    (tmp_path / "gone.mp4").symlink_to(tmp_path / "deleted.mp4")
    write_listing(tmp_path, ["gone.mp4"])
    result = validate_dataset(DatasetConfig(root=str(tmp_path)))
    assert [(p.code, p.line) for p in result.errors] == [("missing-file", 1)]
    assert "dangling symlink" in result.errors[0].message
