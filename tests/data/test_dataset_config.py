"""The dataset config file (`--dataset-config datasets.toml`), still images, and frame extraction windows.

Line numbers are read off the test's own TOML text; window counts and ranges are computed here,
independently of cogtune's arithmetic; decoded frames are compared with ffmpeg's own decode.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cogtune.data.dataset import DatasetConfig
from cogtune.data.dataset_config import load_dataset_sources
from cogtune.errors import ConfigError
from tests.data.media import ffmpeg_frames


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line of `text` containing `needle`."""
    return next(n for n, line in enumerate(text.split("\n"), start=1) if needle in line)


def write_images(root: Path, count: int, size: tuple[int, int] = (64, 64)) -> Path:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = (np.random.RandomState(i).rand(size[1], size[0], 3) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"still_{i}.png")
        (root / f"still_{i}.txt").write_text(f"a still photo number {i}\n")
    return root


@pytest.fixture
def roots(tmp_path):
    for name in ("walks", "runs"):
        (tmp_path / name).mkdir()
    write_images(tmp_path / "stills", 2)
    return tmp_path


def write_toml(folder: Path, text: str) -> Path:
    path = folder / "datasets.toml"
    path.write_text(text)
    return path


def test_reads_each_dataset_with_its_options_and_the_command_defaults(roots):
    path = write_toml(roots, """
[[datasets]]
root = "walks"
repeats = 1

[[datasets]]
name = "running"
root = "runs"
repeats = 3
frame_extraction = "slide"
frame_stride = 4
buckets = ["17x64x64"]

[[datasets]]
root = "stills"
kind = "images"
""")
    walks, runs, stills = load_dataset_sources(path, DatasetConfig(resize_mode="stretch"))
    assert [s.name for s in (walks, runs, stills)] == ["walks", "running", "stills"]
    assert [s.repeats for s in (walks, runs, stills)] == [1, 3, 1]
    assert Path(walks.data.root) == (roots / "walks").resolve()  # relative to the file's folder
    assert (runs.data.frame_extraction, runs.data.frame_stride, runs.buckets) == ("slide", 4, ("17x64x64",))
    assert stills.data.kind == "images"
    assert {s.data.resize_mode for s in (walks, runs, stills)} == {"stretch"}  # unset keys: the command's options
    assert runs.origin == f"{path}:{line_of(path.read_text(), 'name = ')- 1}"


@pytest.mark.parametrize(("table", "needle", "message"), [
    ('root = "walks"\nrepeat = 3\n', "repeat = 3", "unknown setting 'repeat' in [[datasets]] (did you mean 'repeats'?)"),
    ('root = "walks"\nfps = 8\nsample_fps = 8\n', "fps = 8", "'fps' and 'sample_fps' name the same setting"),
    ('root = "walks"\nframe_strid = 8\n', "frame_strid", "unknown setting 'frame_strid' in [[datasets]] (did you "
     "mean 'frame_stride'?)"),
    ('root = "walks"\nrepeats = "three"\n', "repeats =", "repeats: expected an integer, got 'three'"),
    ('root = "nowhere"\n', 'root = "nowhere"', "root 'nowhere' is not a folder"),
    ('repeats = 2\n', "[[datasets]]", "this [[datasets]] table needs a root"),
    ('root = "walks"\nframe_extraction = "slide"\n', "[[datasets]]", "frame_extraction 'slide' needs frame_stride"),
    ('root = "walks"\nrepeats = 0\n', "[[datasets]]", "repeats must be >= 1, got 0"),
    ('root = "stills"\nkind = "images"\nbuckets = ["9x64x64"]\n', "buckets =",
     "bucket 9x64x64 has several frames; a dataset of images takes 1xHxW buckets"),
])
def test_a_bad_table_is_one_line_with_file_and_line(roots, table, needle, message):
    text = '# my datasets\n\n[[datasets]]\nroot = "runs"\n\n[[datasets]]\n' + table
    path = write_toml(roots, text)
    second_table = [n for n, line in enumerate(text.split("\n"), 1) if line == "[[datasets]]"][1]
    expected_line = second_table if needle == "[[datasets]]" else line_of(text, needle)
    with pytest.raises(ConfigError) as caught:
        load_dataset_sources(path)
    assert caught.value.message.startswith(f"{path}:{expected_line}: {message}")
    assert "\n" not in caught.value.message


def test_unknown_top_level_key_and_empty_file(roots):
    path = write_toml(roots, 'datset = 1\n')
    with pytest.raises(ConfigError, match=rf"^{path}:1: unknown setting 'datset' \(did you mean 'datasets'\?\)$"):
        load_dataset_sources(path)
    path = write_toml(roots, '# nothing yet\n')
    with pytest.raises(ConfigError, match="no \\[\\[datasets\\]\\] table"):
        load_dataset_sources(path)


def test_two_datasets_giving_the_same_items_are_refused(roots):
    text = '[[datasets]]\nroot = "walks"\n\n[[datasets]]\nname = "again"\nroot = "./walks/"\n'
    path = write_toml(roots, text)
    with pytest.raises(ConfigError) as caught:
        load_dataset_sources(path)
    assert caught.value.message == (f"{path}:4: dataset 'again' gives the same items as 'walks' ({path}:1): "
                                    "same root and options")
    # Without a name both are called 'walks': still the overlap is what is reported.
    write_toml(roots, text.replace('name = "again"\n', ""))
    with pytest.raises(ConfigError, match="dataset 'walks' gives the same items as 'walks'"):
        load_dataset_sources(path)
    assert "repeats" in caught.value.hint
    # The same root read another way gives other items: accepted.
    write_toml(roots, text + 'frame_extraction = "head"\n')
    assert [s.name for s in load_dataset_sources(path)] == ["walks", "again"]


def test_two_datasets_of_one_name_are_refused(roots):
    path = write_toml(roots, '[[datasets]]\nroot = "walks"\n\n[[datasets]]\nname = "walks"\nroot = "runs"\n')
    with pytest.raises(ConfigError, match=rf"^{path}:4: dataset name 'walks' is already used \({path}:1\)"):
        load_dataset_sources(path)


def test_cli_validate_reports_each_dataset_and_refuses_a_bad_file_in_one_line(cli, tmp_path):
    from cogtune.data.synthetic import make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "clips", count=2, frames=17, height=64, width=64)
    write_images(tmp_path / "stills", 2)
    path = write_toml(tmp_path, '[[datasets]]\nroot = "clips"\nrepeats = 2\n\n[[datasets]]\nroot = "stills"\n'
                                'kind = "images"\n')
    result = cli("dataset", "validate", "--dataset-config", path, "--json")
    assert result.exit_code == 0, result.stderr
    import json

    report = json.loads(result.stdout)
    assert report["ok"] and [(d["name"], d["repeats"], d["items"]) for d in report["datasets"]] == \
        [("clips", 2, 2), ("stills", 1, 2)]
    assert report["datasets"][1]["stats"]["images"] == 2

    write_toml(tmp_path, '[[datasets]]\nroot = "clips"\nframe_extraction = "chunks"\n')
    result = cli("dataset", "validate", "--dataset-config", path)
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"{path}:3: frame_extraction: 'chunks' is not one of" in lines[0]
    assert "Traceback" not in result.stderr


# --- stills -------------------------------------------------------------------------------------------


def test_an_image_folder_and_images_in_a_listing_are_one_frame_items(tmp_path):
    from cogtune.data.validate import validate_dataset
    from cogtune.models.registry import get_preset

    folder = write_images(tmp_path / "stills", 3, size=(80, 48))
    result = validate_dataset(DatasetConfig(root=str(folder), kind="images"), model=get_preset("tiny"))
    assert result.ok, result.errors
    assert result.items == 3 and all(e.still for e in result.entries)
    assert {(i.frames, i.width, i.height, i.backend) for i in result.video_info.values()} == {(1, 80, 48, "image")}
    # The default (videos) folder layout does not pick the images up.
    videos_only = validate_dataset(DatasetConfig(root=str(folder)))
    assert [p.code for p in videos_only.errors] == ["no-dataset"]
    # A listing may name images: each is a still whatever the kind.
    (folder / "prompts.txt").write_text("one\ntwo\n")
    (folder / "videos.txt").write_text("still_0.png\nstill_1.png\n")
    listed = validate_dataset(DatasetConfig(root=str(folder)), model=get_preset("tiny"))
    assert listed.ok and [e.still for e in listed.entries] == [True, True]


def test_kind_images_refuses_a_listed_video_and_a_broken_image(tmp_path):
    from cogtune.data.validate import validate_dataset

    folder = write_images(tmp_path / "stills", 1)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    (folder / "broken.txt").write_text("broken\n")
    result = validate_dataset(DatasetConfig(root=str(folder), kind="images"))
    assert [(p.code, p.path) for p in result.errors] == [("unreadable-image", "broken.png")]
    (folder / "prompts.txt").write_text("a\nb\n")
    (folder / "videos.txt").write_text("still_0.png\nclip.mp4\n")
    listed = validate_dataset(DatasetConfig(root=str(folder), kind="images"))
    assert [(p.code, p.line) for p in listed.errors] == [("not-an-image", 2)]


def test_one_frame_obeys_the_frame_rule():
    from cogtune.models.registry import get_preset

    for name in ("cogvideox-5b", "cogvideox1.5-5b"):
        spec = get_preset(name)
        assert spec.frame_problems(1) == []
        assert spec.latent_frames(1) == 1
        assert spec.padded_latent_frames(1) == (2 if spec.patch_size_t else 1)  # 1.5 pads to its temporal patch
        assert spec.frame_problems(5)  # still no clip shorter than 8k+1


# --- frame extraction ---------------------------------------------------------------------------------


def expected_windows(available: int, length: int, mode: str, stride: int | None = None) -> list[tuple[int, int]]:
    """[start, end) ranges written out independently: head, back-to-back chunks, or a window every stride."""
    if available < length:
        return []
    if mode == "head":
        return [(0, length)]
    ranges, start = [], 0
    step = length if mode == "chunk" else stride
    while start + length <= available:
        ranges.append((start, start + length))
        start += step
    return ranges


@pytest.mark.parametrize("available", [9, 16, 17, 18, 33, 50, 100])
@pytest.mark.parametrize(("mode", "stride"), [("head", None), ("chunk", None), ("slide", 1), ("slide", 4),
                                              ("slide", 13)])
def test_windows_match_the_independent_count_and_ranges(available, mode, stride):
    from cogtune.data.clips import clip_windows
    from cogtune.data.video import VideoInfo

    info = VideoInfo(frames=available, fps=24.0, width=64, height=64)
    windows = clip_windows(info, 9, mode, stride=stride)
    assert [(w[0], w[-1] + 1) for w in windows] == expected_windows(available, 9, mode, stride)
    assert all(w == list(range(w[0], w[0] + 9)) for w in windows)  # consecutive frames


def test_windows_at_a_sample_fps_take_every_third_frame_of_a_24_fps_clip():
    from cogtune.data.clips import clip_windows
    from cogtune.data.video import VideoInfo

    info = VideoInfo(frames=60, fps=24.0, width=64, height=64)
    windows = clip_windows(info, 9, "chunk", sampling="fps", target_fps=8.0)
    # 60 frames at a third of the rate: 20 frames taken (0, 3, ..., 57), two windows of 9.
    assert windows == [[3 * i for i in range(9)], [3 * i for i in range(9, 18)]]


def test_a_chunk_item_decodes_to_the_source_frames_of_its_range(tmp_path):
    """Planned like `encode` plans it, loaded like its workers load it; ffmpeg's own decode is the judge."""
    from cogtune.data.clips import Bucket, clip_windows, load_clip
    from cogtune.data.video import probe_video, write_video

    # Each frame a flat grey of its own level, 8 levels apart: a frame off by one cannot pass.
    levels = [16 + 8 * i for i in range(27)]
    frames = np.stack([np.full((32, 48, 3), level, dtype=np.uint8) for level in levels])
    path = write_video(tmp_path / "ramp.mp4", frames, fps=8)
    info = probe_video(path)
    windows = clip_windows(info, 9, "chunk")
    assert [(w[0], w[-1] + 1) for w in windows] == [(0, 9), (9, 18), (18, 27)]
    source = ffmpeg_frames(path).astype(np.float32)  # ffmpeg's own decode, not decord's
    assert len(source) == 27
    for window in windows:
        start, end = window[0], window[-1] + 1
        pixels = load_clip(path, Bucket(9, 32, 48), info=info, indices=window).numpy()
        assert pixels.shape == (9, 3, 32, 48)
        expected = source[start:end].transpose(0, 3, 1, 2) / 127.5 - 1.0
        assert np.abs(pixels - expected).max() <= 2.5 / 127.5


def test_other_trainers_key_names_are_accepted(roots):
    """`fps`, `stride`, `num_repeats` (musubi-tuner, diffusion-pipe style) mean cogtune's settings."""
    path = write_toml(roots, '[[datasets]]\nroot = "runs"\nfps = 8\nframe_extraction = "slide"\nstride = 4\n'
                             'num_repeats = 2\n')
    (source,) = load_dataset_sources(path)
    assert (source.data.sample_fps, source.data.frame_sampling) == (8, "fps")
    assert (source.data.frame_extraction, source.data.frame_stride, source.repeats) == ("slide", 4, 2)
