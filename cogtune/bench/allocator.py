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


def round_request(size: int) -> int:
    return max(MIN_BLOCK, -(-size // MIN_BLOCK) * MIN_BLOCK)


def segment_size(size: int) -> int:
    if size <= SMALL_SIZE:
        return SMALL_SEGMENT
    if size < MIN_LARGE_ALLOCATION:
        return LARGE_SEGMENT
    return -(-size // ROUND_LARGE) * ROUND_LARGE


@dataclasses.dataclass(eq=False)  # blocks are compared by identity
class _Block:
    segment: int
    offset: int
    size: int
    free: bool = True


class CachingAllocatorModel:
    """Replays allocations and frees; reports allocated and reserved bytes, current and peak."""

    def __init__(self) -> None:
        self.allocated = 0
        self.reserved = 0
        self.peak_allocated = 0
        self.peak_reserved = 0
        self._segments: list[list[_Block]] = []  # the blocks of each segment, by offset
        self._small_segment: list[bool] = []
        self._free: dict[bool, list[tuple[int, int, int]]] = {True: [], False: []}  # pool -> (size, segment, offset)
        self._live: dict[int, _Block] = {}

    def malloc(self, key: int, size: int) -> None:
        size = round_request(size)
        small = size <= SMALL_SIZE
        pool = self._free[small]
        index = bisect.bisect_left(pool, (size, -1, -1))  # best fit: the smallest free block that is big enough
        if index < len(pool):
            _, segment, offset = pool.pop(index)
            block = next(b for b in self._segments[segment] if b.offset == offset)
        else:
            total = segment_size(size)
            block = _Block(len(self._segments), 0, total)
            self._segments.append([block])
            self._small_segment.append(small)
            self.reserved += total
            self.peak_reserved = max(self.peak_reserved, self.reserved)
        remainder = block.size - size
        if remainder >= MIN_BLOCK if small else remainder > SMALL_SIZE:
            rest = _Block(block.segment, block.offset + size, remainder)
            blocks = self._segments[block.segment]
            blocks.insert(blocks.index(block) + 1, rest)
            bisect.insort(pool, (rest.size, rest.segment, rest.offset))
            block.size = size
        block.free = False
        self._live[key] = block
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)

    def free(self, key: int) -> None:
        block = self._live.pop(key, None)
        if block is None:
            return
        self.allocated -= block.size
        blocks = self._segments[block.segment]
        pool = self._free[self._small_segment[block.segment]]
        block.free = True
        for neighbour in (self._neighbour(blocks, block, +1), self._neighbour(blocks, block, -1)):
            if neighbour is not None and neighbour.free:
                pool.remove((neighbour.size, neighbour.segment, neighbour.offset))
                block.offset = min(block.offset, neighbour.offset)
                block.size += neighbour.size
                blocks.remove(neighbour)
        bisect.insort(pool, (block.size, block.segment, block.offset))

    @staticmethod
    def _neighbour(blocks: list[_Block], block: _Block, direction: int) -> _Block | None:
        position = blocks.index(block) + direction
        return blocks[position] if 0 <= position < len(blocks) else None

    def release_cached(self) -> None:
        """`torch.cuda.empty_cache()`: give back every segment with no live block."""
        for segment, blocks in enumerate(self._segments):
            if blocks and all(block.free for block in blocks):
                pool = self._free[self._small_segment[segment]]
                for block in blocks:
                    pool.remove((block.size, block.segment, block.offset))
                self.reserved -= sum(block.size for block in blocks)
                self._segments[segment] = []

    def reset_peaks(self) -> None:
        self.peak_allocated = self.allocated
        self.peak_reserved = self.reserved
