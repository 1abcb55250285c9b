"""A non-finite loss names the cache items of its step (file, clip and dataset line) in its one-line error."""

from __future__ import annotations

from cogtune.encode import VideoLatentCache
from cogtune.train.data import BatchSchedule, describe_items, step_items


def test_describe_items_names_files_and_sources_once_each(tiny_cache):
    cache = VideoLatentCache(tiny_cache)
    text = describe_items(cache, [2, 0, 2, 1, 3], limit=3)
    assert text == ("latents/000002.safetensors (videos/clip_002.mp4, videos.txt:3), "
                    "latents/000000.safetensors (videos/clip_000.mp4, videos.txt:1), "
                    "latents/000001.safetensors (videos/clip_001.mp4, videos.txt:2), and 1 more")


def test_step_items_cover_every_micro_step_and_process():
    schedule = BatchSchedule(["9x64x64"] * 8, batch_size=1, world_size=2, seed=0)
    items = step_items(schedule, step=1, accumulation=2)
    assert items == schedule.global_batch(2) + schedule.global_batch(3) and len(items) == 4


def test_nan_loss_error_names_the_step_items(cli, tiny_cache, tmp_path):
    result = cli("train", "t2v", "--model", "tiny", "--data", tiny_cache, "--output-dir", tmp_path / "run",
                 "--steps", "6", "--lr", "1e30", "--max-grad-norm", "0")
    assert result.exit_code == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: loss became nan at step") and "; the step's items: latents/0000" in line
    assert "(videos/clip_00" in line and "videos.txt:" in line
