"""Datasets' `repeats` as item weights in the stateless batch schedule; image buckets beside video buckets."""

from __future__ import annotations

from collections import Counter

import pytest

from cogtune.train.data import BatchSchedule


def draws(schedule: BatchSchedule, epochs: int) -> Counter:
    return Counter(i for step in range(epochs * schedule.batches_per_epoch) for i in schedule.global_batch(step))


@pytest.mark.parametrize(("batch_size", "world_size"), [(1, 1), (2, 1), (1, 2), (4, 2)])
def test_items_are_drawn_in_the_proportion_of_their_repeats(batch_size, world_size):
    # Two datasets of 4 items each, repeats 1 and 3: one bucket, 16 entries an epoch.
    repeats = [1] * 4 + [3] * 4
    schedule = BatchSchedule(["9x64x64"] * 8, batch_size, world_size, seed=7, repeats=repeats)
    counts = draws(schedule, epochs=60)
    assert {counts[i] for i in range(4)} == {60} and {counts[i] for i in range(4, 8)} == {180}


def test_the_proportion_holds_in_each_bucket_when_batches_are_filled_by_cycling():
    # 8 and 7 entries an epoch cut into batches of 3: the last batch of each bucket is filled by cycling the
    # shuffled entries, each equally likely to fill it, so within a bucket the draws keep the 1:3 proportion.
    buckets = ["9x64x64"] * 4 + ["1x64x64"] * 3
    repeats = [1, 1, 3, 3] + [1, 3, 3]
    schedule = BatchSchedule(buckets, 3, 1, seed=3, repeats=repeats)
    counts = draws(schedule, epochs=3000)
    for once, thrice in (([0, 1], [2, 3]), ([4], [5, 6])):
        ratio = (sum(counts[i] for i in thrice) / len(thrice)) / (sum(counts[i] for i in once) / len(once))
        assert ratio == pytest.approx(3, rel=0.05)


def test_a_batch_never_mixes_image_and_video_buckets():
    buckets = ["1x64x64", "9x64x64"] * 5
    schedule = BatchSchedule(buckets, 3, 1, seed=0, repeats=[2, 1] * 5)
    for step in range(3 * schedule.batches_per_epoch):
        assert len({buckets[i] for i in schedule.global_batch(step)}) == 1


def test_repeats_keep_the_schedule_a_pure_function_of_seed_and_step():
    buckets, repeats = ["9x64x64"] * 6, [1, 2, 3, 1, 2, 3]
    one = BatchSchedule(buckets, 2, 1, seed=5, repeats=repeats)
    other = BatchSchedule(buckets, 2, 1, seed=5, repeats=repeats)
    steps = [40, 3, 17, 3, 0, 39]  # any order, as a resume asks
    assert [one.global_batch(s) for s in steps] == [other.global_batch(s) for s in steps]
    assert one.global_batch(3) != BatchSchedule(buckets, 2, 1, seed=6, repeats=repeats).global_batch(3) or \
        one.global_batch(4) != BatchSchedule(buckets, 2, 1, seed=6, repeats=repeats).global_batch(4)
    # Without repeats (caches before dataset configs) the schedule is what it always was.
    plain = BatchSchedule(buckets, 2, 1, seed=5)
    assert [plain.global_batch(s) for s in range(9)] == \
        [BatchSchedule(buckets, 2, 1, seed=5, repeats=[1] * 6).global_batch(s) for s in range(9)]
    assert plain.batches_per_epoch == 3 and one.batches_per_epoch == 6


def test_the_validation_shape_is_a_video_bucket_when_images_sort_first():
    from cogtune.train.validation import first_video_bucket

    assert first_video_bucket([(1, 64, 64), (1, 32, 96), (9, 64, 64), (17, 64, 64)]) == (9, 64, 64)
    assert first_video_bucket([(1, 64, 64)]) == (1, 64, 64)  # images only: the image shape


@pytest.mark.parametrize("model", ["tiny", "tiny-1.5"])
def test_the_estimator_sizes_an_image_bucket_and_a_mixed_run_by_its_video_bucket(model):
    from cogtune.train.config import TrainConfig
    from cogtune.train.sizing.estimate import estimate_run

    config = TrainConfig(task="t2v", model=model, data="<bench>", output_dir="<bench>", random_weights=True)
    image = estimate_run(config, [(1, 64, 64)])
    video = estimate_run(config, [(9, 64, 64)])
    assert image.shape == (1, 64, 64) and 0 < image.memory.after_testing <= video.memory.after_testing
    mixed = estimate_run(config, [(1, 64, 64), (9, 64, 64)], validation_shape=(9, 64, 64))
    assert mixed.shape == (9, 64, 64)
