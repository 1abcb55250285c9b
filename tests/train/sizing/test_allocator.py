"""The caching-allocator model against the rules of PyTorch's CUDA caching allocator."""

from __future__ import annotations

from cogtune.train.sizing.allocator import (
    LARGE_SEGMENT,
    MIN_BLOCK,
    SMALL_SEGMENT,
    CachingAllocatorModel,
    round_request,
    segment_size,
)

MiB = 1 << 20


def test_rounding_and_segment_sizes():
    assert round_request(1) == MIN_BLOCK
    assert round_request(513) == 1024
    assert segment_size(100) == SMALL_SEGMENT  # small pool
    assert segment_size(3 * MiB) == LARGE_SEGMENT  # between 1 MiB and 10 MiB: a 20 MiB segment
    assert segment_size(11 * MiB) == 12 * MiB  # large: rounded up to 2 MiB
    assert segment_size(int(11.5 * MiB)) == 12 * MiB


def test_small_allocations_share_a_segment():
    model = CachingAllocatorModel()
    for key in range(4):
        model.malloc(key, 1000)
    assert model.reserved == SMALL_SEGMENT and model.allocated == 4 * 1024


def test_freed_blocks_are_reused_best_fit_and_merged():
    model = CachingAllocatorModel()
    model.malloc(1, 40 * MiB)
    model.malloc(2, 40 * MiB)
    assert model.reserved == 80 * MiB
    model.free(1)
    model.malloc(3, 30 * MiB)  # fits in the freed 40 MiB segment, split (remainder 10 MiB > 1 MiB)
    assert model.reserved == 80 * MiB and model.allocated == 70 * MiB
    model.free(3)  # merges back with its 10 MiB remainder into one 40 MiB block
    model.malloc(4, 40 * MiB)
    assert model.reserved == 80 * MiB


def test_remainders_under_one_mib_are_not_split_in_the_large_pool():
    model = CachingAllocatorModel()
    model.malloc(1, 12 * MiB)
    model.free(1)
    model.malloc(2, int(11.5 * MiB))  # 0.5 MiB would remain: the whole block is used
    assert model.allocated == 12 * MiB


def test_fragmentation_grows_reserved_and_empty_cache_releases_it():
    model = CachingAllocatorModel()
    model.malloc(1, 40 * MiB)
    model.malloc(2, 40 * MiB)
    model.free(1)
    model.free(2)
    model.malloc(3, 60 * MiB)  # neither 40 MiB segment can hold it: a new one
    assert model.reserved == 140 * MiB and model.peak_reserved == 140 * MiB
    model.release_cached()
    assert model.reserved == 60 * MiB
    model.reset_peaks()
    assert model.peak_reserved == 60 * MiB and model.peak_allocated == 60 * MiB
