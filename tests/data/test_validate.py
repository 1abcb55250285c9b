"""`dataset validate`: planted faults reported with code, file and line; exit codes; JSON shape."""

from __future__ import annotations

import json
import shutil

import pytest

from cogtune.data.dataset import DatasetConfig
from cogtune.data.synthetic import make_synthetic_dataset
from cogtune.data.validate import CODES, validate_dataset
from cogtune.data.video import write_video
from cogtune.models.registry import TINY_PRESETS


def _audio_only(path):
    import subprocess

    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                    "sine=frequency=440:duration=1", "-c:a", "aac", str(path)], check=True)


@pytest.fixture
def broken_data(tmp_path, synthetic_data):
    """A copy of the synthetic dataset (4 clips of 17 frames) with faults on known lines."""
    root = tmp_path / "broken"
    shutil.copytree(synthetic_data, root)
    (root / "videos" / "empty.mp4").write_bytes(b"")
    (root / "videos" / "corrupt.mp4").write_bytes(b"\x00garbage" * 200)
    good = (root / "videos" / "clip_000.mp4").read_bytes()
    (root / "videos" / "truncated.mp4").write_bytes(good[: len(good) // 3])
    _audio_only(root / "videos" / "audio.mp4")
    short = make_synthetic_dataset(tmp_path / "short", count=1, frames=5, height=64, width=64)
    shutil.copy(short / "videos" / "clip_000.mp4", root / "videos" / "short.mp4")
    (root / "videos" / "folder.mp4").mkdir()
    captions = (root / "prompts.txt").read_text().splitlines()
    videos = (root / "videos.txt").read_text().splitlines()
    planted = [
        ("empty file", "videos/empty.mp4"),            # line 5
        ("corrupt file", "videos/corrupt.mp4"),        # line 6
        ("too short", "videos/short.mp4"),             # line 7
        ("missing", "videos/nope.mp4"),                # line 8
        ("", "videos/clip_001.mp4"),                   # line 9: empty caption, duplicate video
        ("escapes", "../outside.mp4"),                 # line 10
        ("absolute", "/etc/hostname"),                 # line 11
        ("audio only", "videos/audio.mp4"),            # line 12
        ("truncated", "videos/truncated.mp4"),         # line 13
        ("a folder", "videos/folder.mp4"),             # line 14
    ]
    captions += [c for c, _ in planted]
    videos += [v for _, v in planted]
    (root / "prompts.txt").write_text("\n".join(captions) + "\n")
    (root / "videos.txt").write_text("\n".join(videos) + "\n")
    return root


def test_clean_dataset_has_no_problems(synthetic_data):
    result = validate_dataset(DatasetConfig(root=str(synthetic_data)), frames=9, height=64, width=64,
                              model=TINY_PRESETS["tiny"])
    assert result.ok and result.errors == [] and result.warnings == []
    assert result.stats["clips"] == 4
    assert result.stats["frames"] == {"min": 17, "median": 17, "max": 17}
    assert result.stats["fps"] == {"8": 4} and result.stats["resolutions"] == {"64x64": 4}


def test_every_planted_fault_is_located(broken_data):
    result = validate_dataset(DatasetConfig(root=str(broken_data)), frames=9, model=TINY_PRESETS["tiny"])
    found = {(p.code, p.path, p.line) for p in result.errors}
    assert found == {
        ("empty-video", "videos/empty.mp4", 5),
        ("unreadable-video", "videos/corrupt.mp4", 6),
        ("too-few-frames", "videos/short.mp4", 7),
        ("missing-file", "videos/nope.mp4", 8),
        ("empty-caption", "prompts.txt", 9),
        ("path-outside-root", "../outside.mp4", 10),
        ("absolute-path", "/etc/hostname", 11),
        ("no-video-stream", "videos/audio.mp4", 12),
        ("unreadable-video", "videos/truncated.mp4", 13),
        ("not-a-file", "videos/folder.mp4", 14),
    }
    assert all(p.source in ("videos.txt", "prompts.txt") for p in result.errors)
    assert [(p.code, p.path, p.line) for p in result.warnings] == [("duplicate-entry", "videos/clip_001.mp4", 9)]
    assert not result.ok
    assert {p.code for p in result.errors + result.warnings} <= set(CODES)
    assert len(result.usable_entries()) == 4


def test_deep_decoding_finds_the_same_and_counts_frames(synthetic_data):
    result = validate_dataset(DatasetConfig(root=str(synthetic_data)), deep=True)
    assert result.ok and result.stats["frames"]["max"] == 17


def test_model_frame_rule(synthetic_data):
    result = validate_dataset(DatasetConfig(root=str(synthetic_data)), frames=8, model=TINY_PRESETS["tiny"])
    assert [p.code for p in result.errors] == ["frame-rule"]


def test_low_resolution_and_odd_fps_are_warnings(tmp_path):
    from cogtune.data.synthetic import render_clip

    (tmp_path / "videos").mkdir()
    write_video(tmp_path / "videos" / "slow.mp4", render_clip("circle", "red", "left", 9, 32, 32), fps=2)
    (tmp_path / "prompts.txt").write_text("slow\n")
    (tmp_path / "videos.txt").write_text("videos/slow.mp4\n")
    result = validate_dataset(DatasetConfig(root=str(tmp_path)), height=64, width=64)
    assert result.ok
    assert sorted(p.code for p in result.warnings) == ["low-resolution", "odd-fps"]


def test_fps_sampling_needs_enough_source_frames(synthetic_data):
    # 17 frames at 8 fps: 9 frames at 4 fps need 2x9-1 = 17 source frames; at 2 fps they need 33.
    ok = validate_dataset(DatasetConfig(root=str(synthetic_data), frame_sampling="fps", sample_fps=4), frames=9)
    assert ok.ok
    short = validate_dataset(DatasetConfig(root=str(synthetic_data), frame_sampling="fps", sample_fps=2), frames=9)
    assert {p.code for p in short.errors} == {"too-few-frames"} and "at 2 fps" in short.errors[0].message


def test_condition_images(tmp_path, synthetic_data):
    from PIL import Image

    root = tmp_path / "i2v"
    shutil.copytree(synthetic_data, root)
    Image.new("RGB", (64, 64)).save(root / "good.png")
    (root / "bad.png").write_bytes(b"not an image")
    (root / "images.txt").write_text("good.png\nbad.png\nmissing.png\ngood.png\n")
    result = validate_dataset(DatasetConfig(root=str(root), image_column="images.txt"))
    assert {(p.code, p.path, p.line, p.source) for p in result.errors} == {
        ("unreadable-image", "bad.png", 2, "images.txt"), ("missing-image", "missing.png", 3, "images.txt")}


def test_caption_truncation_with_the_model_tokenizer(tmp_path, synthetic_data):
    from cogtune.models.loading import load_tokenizer, resolve_model

    root = tmp_path / "long"
    shutil.copytree(synthetic_data, root)
    lines = (root / "prompts.txt").read_text().splitlines()
    lines[1] = " ".join(["a red circle"] * 20)
    (root / "prompts.txt").write_text("\n".join(lines) + "\n")
    model = resolve_model("tiny")
    result = validate_dataset(DatasetConfig(root=str(root)), model=model.spec, tokenizer=load_tokenizer(model))
    (warning,) = result.warnings
    assert (warning.code, warning.path, warning.line) == ("caption-truncated", "prompts.txt", 2)
    assert "has 61 tokens; the model reads the first 32" in warning.message


def test_cli_exit_codes_and_json(cli, synthetic_data, broken_data):
    good = cli("dataset", "validate", synthetic_data, "--frames", "9", "--json")
    assert good.exit_code == 0
    document = json.loads(good.stdout)
    assert {"ok", "items", "errors", "warnings", "stats"} <= set(document)
    assert document["ok"] is True and document["items"] == 4

    bad = cli("dataset", "validate", broken_data, "--frames", "9", "--json")
    assert bad.exit_code == 1
    document = json.loads(bad.stdout)
    assert document["ok"] is False
    assert {"code", "path", "line", "message"} <= set(document["errors"][0])
    assert "Traceback" not in bad.stderr


def test_cli_human_report_is_clean(cli, broken_data):
    result = cli("dataset", "validate", broken_data, "--frames", "9", "--model", "tiny")
    assert result.exit_code == 1
    assert "videos.txt:5: videos/empty.mp4: file is empty" in result.stderr
    assert "[empty-video]" in result.stderr
    assert "error: 10 errors in" in result.stderr
    assert "video_reader.cc" not in result.stderr  # decord's own messages are silenced


def test_cli_dataset_file_option(cli, tmp_path, synthetic_data):
    import csv

    root = tmp_path / "table"
    shutil.copytree(synthetic_data, root)
    captions = (root / "prompts.txt").read_text().splitlines()
    videos = (root / "videos.txt").read_text().splitlines()
    with open(root / "metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video", "caption"])
        writer.writerows(zip(videos, captions))
    result = cli("dataset", "validate", root, "--dataset-file", "metadata.csv", "--json")
    assert result.exit_code == 0, result.stdout
    assert json.loads(result.stdout)["items"] == 4


def test_an_image_renamed_as_a_video_is_too_short(tmp_path):
    from PIL import Image

    (tmp_path / "videos").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "videos" / "still.png")
    (tmp_path / "videos" / "still.png").rename(tmp_path / "videos" / "still.mp4")
    (tmp_path / "prompts.txt").write_text("a still\n")
    (tmp_path / "videos.txt").write_text("videos/still.mp4\n")
    result = validate_dataset(DatasetConfig(root=str(tmp_path)))
    assert [(p.code, p.path, p.line) for p in result.errors] in (
        [("too-few-frames", "videos/still.mp4", 1)], [("unreadable-video", "videos/still.mp4", 1)])
