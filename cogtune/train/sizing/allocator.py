"""A model of PyTorch's CUDA caching allocator, to turn traced tensor allocations into reserved memory.

`torch.cuda.max_memory_reserved` counts the segments the allocator took from the driver, not the
bytes of live tensors. The allocator rounds every request to 512 bytes; requests up to 1 MiB share
2 MiB segments (the small pool); requests up to 10 MiB get 20 MiB segments; larger ones get a
segment of their size rounded up to 2 MiB. Freed blocks are cached and reused best-fit within their
pool, split when the remainder is worth keeping (any remainder in the small pool, more than 1 MiB in
the large one) and merged with free neighbours; segments are never returned during a run. These are
the rules of c10/cuda/CUDACachingAllocator.cpp (without `expandable_segments`).
"""

from __future__ import annotations

import bisect
import dataclasses

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20  # requests up to this go to the small pool
SMALL_SEGMENT = 2 << 20
MIN_LARGE_ALLOCATION = 10 << 20
LARGE_SEGMENT = 20 << 20
ROUND_LARGE = 2 << 20


def pinned_block(size: int) -> int:
    """Host bytes one pinned request takes: torch's CachingHostAllocator (aten/src/ATen/core/
    CachingHostAllocator.h) rounds every request up to a power of two, and page-locks all of it."""
    return 0 if size <= 0 else 1 << (size - 1).bit_length()


def round_request(size: int) -> int:
    return max(MIN_BLOCK, -(-size // MIN_BLOCK) * MIN_BLOCK)


def segment_size(size: int) -> int:
    if size <= SMALL_SIZE:
        return SMALL_SEGMENT
    if size < MIN_LARGE_ALLOCATION:
        return LARGE_SEGMENT
    return -(-size // ROUND_LARGE) * ROUND_LARGE


@dataclasses.dataclass(eq=False, slots=True)  # blocks are compared by identity
class _Block:
    segment: int
    offset: int
    size: int
    free: bool = True
    prev: _Block | None = None  # the neighbours in the segment, by offset
    next: _Block | None = None


class CachingAllocatorModel:
    """Replays allocations and frees; reports allocated and reserved bytes, current and peak."""

    def __init__(self) -> None:
        self.allocated = 0
        self.reserved = 0
        self.peak_allocated = 0
        self.peak_reserved = 0
        self._segments: list[_Block | None] = []  # the first block of each segment (None: released)
        self._small_segment: list[bool] = []
        self._free: dict[bool, list[tuple[int, int, int]]] = {True: [], False: []}  # pool -> (size, segment, offset)
        self._free_blocks: dict[tuple[int, int], _Block] = {}  # (segment, offset) -> free block
        self._live: dict[int, _Block] = {}

    def malloc(self, key: int, size: int) -> None:
        size = MIN_BLOCK if size <= MIN_BLOCK else -(-size // MIN_BLOCK) * MIN_BLOCK  # `round_request`, inlined
        small = size <= SMALL_SIZE
        pool = self._free[small]
        index = bisect.bisect_left(pool, (size, -1, -1))  # best fit: the smallest free block that is big enough
        if index < len(pool):
            _, segment, offset = pool.pop(index)
            block = self._free_blocks.pop((segment, offset))
        else:
            total = segment_size(size)
            block = _Block(len(self._segments), 0, total)
            self._segments.append(block)
            self._small_segment.append(small)
            self.reserved += total
            if self.reserved > self.peak_reserved:
                self.peak_reserved = self.reserved
        remainder = block.size - size
        if remainder >= MIN_BLOCK if small else remainder > SMALL_SIZE:
            rest = _Block(block.segment, block.offset + size, remainder, True, block, block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            bisect.insort(pool, (rest.size, rest.segment, rest.offset))
            self._free_blocks[(rest.segment, rest.offset)] = rest
            block.size = size
        block.free = False
        self._live[key] = block
        self.allocated += block.size
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated

    def free(self, key: int) -> None:
        block = self._live.pop(key, None)
        if block is None:
            return
        self.allocated -= block.size
        pool = self._free[self._small_segment[block.segment]]
        block.free = True
        following = block.next
        if following is not None and following.free:  # merge the free neighbour after
            self._unpool(pool, following)
            block.size += following.size
            block.next = following.next
            if following.next is not None:
                following.next.prev = block
        previous = block.prev
        if previous is not None and previous.free:  # and the one before
            self._unpool(pool, previous)
            previous.size += block.size
            previous.next = block.next
            if block.next is not None:
                block.next.prev = previous
            block = previous
        bisect.insort(pool, (block.size, block.segment, block.offset))
        self._free_blocks[(block.segment, block.offset)] = block

    def _unpool(self, pool: list[tuple[int, int, int]], block: _Block) -> None:
        entry = (block.size, block.segment, block.offset)
        del pool[bisect.bisect_left(pool, entry)]
        del self._free_blocks[(block.segment, block.offset)]

    def release_cached(self) -> None:
        """`torch.cuda.empty_cache()`: give back every segment with no live block."""
        for segment, head in enumerate(self._segments):
            # free neighbours merge, so a segment with no live block is one free block
            if head is not None and head.free and head.next is None:
                self._unpool(self._free[self._small_segment[segment]], head)
                self.reserved -= head.size
                self._segments[segment] = None

    def reset_peaks(self) -> None:
        self.peak_allocated = self.allocated
        self.peak_reserved = self.reserved
