"""`encode --dataset-config`: several datasets (videos, chunked videos, stills) in one cache, then trained."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cogtune.errors import ConfigError


def write_images(root: Path, count: int) -> Path:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = (np.random.RandomState(i).rand(64, 64, 3) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"still_{i}.png")
        (root / f"still_{i}.txt").write_text(f"a still photo number {i}\n")
    return root


def make_datasets(folder: Path, clips: int = 1) -> Path:
    """Two video datasets (repeats 1, and repeats 3 cut in chunks of the bucket) and a folder of stills."""
    from cogtune.data.synthetic import make_synthetic_dataset

    make_synthetic_dataset(folder / "walks", count=clips, frames=17, height=64, width=64)
    make_synthetic_dataset(folder / "runs", count=clips, frames=25, height=64, width=64)
    write_images(folder / "stills", 2)
    path = folder / "datasets.toml"
    path.write_text('[[datasets]]\nroot = "walks"\nrepeats = 1\n\n'
                    '[[datasets]]\nroot = "runs"\nrepeats = 3\nframe_extraction = "chunk"\n\n'
                    '[[datasets]]\nroot = "stills"\nkind = "images"\n')
    return path


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, cogtune_home):
    from cogtune.encode import EncodeConfig, encode_dataset

    folder = tmp_path_factory.mktemp("mixed")
    toml = make_datasets(folder)
    cache = folder / "cache"
    encode_dataset(EncodeConfig(model="tiny", output_dir=str(cache), dataset_config=str(toml), buckets=("9x64x64",),
                                num_workers=0))
    return toml, cache


def test_one_cache_records_each_items_dataset_weight_and_frame_range(mixed):
    toml, cache = mixed
    manifest = json.loads((cache / "manifest.json").read_text())
    rows = [(item["dataset"], item["repeats"], item["bucket"], item.get("frame_range"), item["video"])
            for item in manifest["items"]]
    # runs' 25-frame clip gives 25 // 9 = 2 back-to-back windows; each still is one 1-frame item.
    assert rows == [
        ("walks", 1, "9x64x64", None, "videos/clip_000.mp4"),
        ("runs", 3, "9x64x64", [0, 9], "videos/clip_000.mp4"),
        ("runs", 3, "9x64x64", [9, 18], "videos/clip_000.mp4"),
        ("stills", 1, "1x64x64", None, "still_0.png"),
        ("stills", 1, "1x64x64", None, "still_1.png"),
    ]
    assert manifest["buckets"] == ["1x64x64", "9x64x64"]
    assert [(d["name"], d["repeats"], d["items"], d["frame_extraction"], d["kind"]) for d in manifest["datasets"]] \
        == [("walks", 1, 1, "uniform", "videos"), ("runs", 3, 2, "chunk", "videos"), ("stills", 1, 2, "uniform", "images")]
    assert manifest["dataset"]["config"] == str(toml.resolve())

    from safetensors import safe_open

    with safe_open(str(cache / manifest["items"][3]["latent_file"]), framework="pt") as handle:
        assert list(handle.get_slice("latent_dist").get_shape())[1] == 1  # a still: one latent frame

    from cogtune.encode import VideoLatentCache
    from cogtune.train.data import BatchSchedule

    opened = VideoLatentCache(cache)
    assert opened.item_repeats == [1, 3, 3, 1, 1]
    schedule = BatchSchedule.for_cache(opened, batch_size=1, world_size=1, seed=0)
    assert sorted(i for step in range(schedule.batches_per_epoch) for i in schedule.global_batch(step)) == \
        [0, 1, 1, 1, 2, 2, 2, 3, 4]


def test_a_resume_keeps_finished_items_and_encodes_a_moved_window_again(mixed, tmp_path):
    from cogtune.encode import EncodeConfig
    from cogtune.encode.run import plan_encode

    toml, cache = mixed
    config = EncodeConfig(model="tiny", output_dir=str(cache), dataset_config=str(toml), buckets=("9x64x64",))
    assert plan_encode(config).pending_latents == []  # everything is cached
    # Sliding windows every 4 frames: [0, 9) is already there (same item, same file); [4, 13) is new.
    moved = tmp_path / "moved.toml"
    moved.write_text(toml.read_text().replace('"chunk"', '"slide"\nframe_stride = 4').replace(
        'root = "', f'root = "{toml.parent}/'))
    plan = plan_encode(EncodeConfig(model="tiny", output_dir=str(cache), dataset_config=str(moved),
                                    buckets=("9x64x64",)))
    ranges = [item.frame_range for item in plan.items if item.source.name == "runs"]
    assert ranges == [[start, start + 9] for start in (0, 4, 8, 12, 16)]
    pending = {item.index for item in plan.pending_latents}
    assert 0 not in pending and 1 not in pending  # walks, and runs' [0, 9): unchanged
    assert 2 in pending  # index 2 held [9, 18); now [4, 13)


def test_image_to_video_refuses_still_images_in_one_line(mixed):
    from cogtune.encode import EncodeConfig
    from cogtune.encode.run import plan_encode

    toml, _ = mixed
    with pytest.raises(ConfigError) as caught:
        plan_encode(EncodeConfig(model="tiny-i2v", output_dir=str(toml.parent / "i2v"), dataset_config=str(toml),
                                 buckets=("9x64x64",)))
    stills_table = toml.read_text().split("\n").index('root = "stills"')  # the line above it, counted from 1
    assert caught.value.message.startswith(f"{toml}:{stills_table}: 'still_0.png' is a still image, which cannot "
                                           "train image-to-video")
    assert "\n" not in caught.value.message


def test_an_image_in_a_single_roots_listing_takes_a_one_frame_bucket(tmp_path, synthetic_data):
    import shutil

    from cogtune.data.dataset import DatasetConfig
    from cogtune.encode import EncodeConfig
    from cogtune.encode.run import plan_encode

    root = tmp_path / "data"
    shutil.copytree(synthetic_data, root)
    write_images(root, 1)
    with open(root / "videos.txt", "a") as listing:
        listing.write("still_0.png\n")
    with open(root / "prompts.txt", "a") as captions:
        captions.write("a still photo\n")
    plan = plan_encode(EncodeConfig(model="tiny", output_dir=str(tmp_path / "cache"), data=DatasetConfig(root=str(root)),
                                    buckets=("9x64x64",)))
    assert [str(item.bucket) for item in plan.items] == ["9x64x64"] * 4 + ["1x64x64"]
    assert [str(b) for b in plan.buckets] == ["1x64x64", "9x64x64"]


def test_data_root_and_dataset_config_exclude_each_other(tmp_path):
    from cogtune.data.dataset import DatasetConfig
    from cogtune.encode import EncodeConfig

    with pytest.raises(ConfigError, match="--data-root and --dataset-config exclude each other"):
        EncodeConfig(model="tiny", output_dir=str(tmp_path), data=DatasetConfig(root=str(tmp_path)),
                     dataset_config=str(tmp_path / "d.toml"))


def test_two_video_datasets_and_images_validate_encode_and_train_from_the_cli(cli, tmp_path):
    from cogtune.encode import VideoLatentCache
    from cogtune.train.data import BatchSchedule

    toml = make_datasets(tmp_path)
    result = cli("dataset", "validate", "--dataset-config", toml, "--model", "tiny", "--frames", "9")
    assert result.exit_code == 0, result.stderr
    cache = tmp_path / "cache"
    result = cli("encode", "--model", "tiny", "--dataset-config", toml, "--output-dir", cache, "--buckets", "9x64x64",
                 "--num-workers", "0")
    assert result.exit_code == 0, result.stderr
    # Train until the schedule has drawn an image batch and a video batch (seed 1 gets there in a few steps).
    schedule = BatchSchedule.for_cache(VideoLatentCache(cache), batch_size=1, world_size=1, seed=1)
    shapes = [VideoLatentCache(cache).items[schedule.global_batch(step)[0]]["bucket"] for step in range(4)]
    steps = 1 + max(shapes.index("1x64x64"), shapes.index("9x64x64"))
    result = cli("train", "t2v", "--model", "tiny", "--data", cache, "--output-dir", tmp_path / "run",
                 "--steps", str(steps), "--seed", "1")
    assert result.exit_code == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "training_summary.json").read_text())
    assert len(summary["losses"]) == steps and all(np.isfinite(summary["losses"]))
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
