"""What each process trains on at each micro-step, as a pure function of (seed, step).

Items are grouped by bucket (a batch never mixes clip shapes), shuffled per epoch, and cut into
global batches of `batch_size x world_size`; process `rank` takes its slice. Because nothing here
has state, resuming at step N needs no saved sampler: it computes batch N again. A bucket with
fewer items than a global batch is filled by cycling its items, so a tiny dataset still trains.
An item's `repeats` (its dataset's weight) puts it that many times into each epoch.
"""

from __future__ import annotations

import random
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from cogtune.encode.cache import VideoLatentCache


class BatchSchedule:
    def __init__(self, buckets: list[str], batch_size: int, world_size: int, seed: int,
                 repeats: list[int] | None = None):
        """`buckets[i]` is item i's bucket; `repeats[i]` (default 1) how often it comes in each epoch."""
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        if repeats is not None and len(repeats) != len(buckets):
            raise ValueError(f"{len(repeats)} repeats for {len(buckets)} items")
        groups: dict[str, list[int]] = defaultdict(list)
        for index, bucket in enumerate(buckets):
            groups[bucket] += [index] * (repeats[index] if repeats is not None else 1)
        self.groups = dict(sorted((bucket, items) for bucket, items in groups.items() if items))
        if not self.groups:
            raise ValueError("no item to train on")
        global_size = batch_size * world_size
        self.batches_per_epoch = sum(-(-len(items) // global_size) for items in self.groups.values())
        self._epoch_cache: tuple[int, list[list[int]]] | None = None

    def _epoch(self, epoch: int) -> list[list[int]]:
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        rng = random.Random(self.seed * 1_000_003 + epoch)
        global_size = self.batch_size * self.world_size
        batches = []
        for items in self.groups.values():
            order = items[:]
            rng.shuffle(order)
            count = -(-len(order) // global_size) * global_size
            filled = [order[i % len(order)] for i in range(count)]
            batches += [filled[i : i + global_size] for i in range(0, count, global_size)]
        rng.shuffle(batches)
        self._epoch_cache = (epoch, batches)
        return batches

    @classmethod
    def for_cache(cls, cache: VideoLatentCache, batch_size: int, world_size: int, seed: int,
                  held_out: frozenset[int] = frozenset()) -> BatchSchedule:
        """The schedule of a cache's items, weighted by the repeats its manifest records; `held_out` items
        (`--eval-split`) never come (a weight of 0: the others' schedule is the one without them)."""
        repeats = [0 if index in held_out else count for index, count in enumerate(cache.item_repeats)]
        return cls(cache.item_buckets, batch_size, world_size, seed, repeats)

    def global_batch(self, micro_step: int) -> list[int]:
        epoch, position = divmod(micro_step, self.batches_per_epoch)
        return self._epoch(epoch)[position]

    def batch(self, micro_step: int, rank: int) -> list[int]:
        batch = self.global_batch(micro_step)
        return batch[rank * self.batch_size : (rank + 1) * self.batch_size]


def load_batch(cache: VideoLatentCache, indices: list[int]) -> dict[str, Any]:
    """Stack the cached tensors of `indices` (all of one bucket)."""
    items = [cache.load_item(i) for i in indices]
    batch = {name: torch.stack([item[name] for item in items]) for name in items[0]}
    batch["indices"] = indices
    return batch


def describe_items(cache: VideoLatentCache, indices: list[int], limit: int = 3) -> str:
    """The cache files (and source clips and lines) of `indices`, once each, for a one-line message."""
    unique = list(dict.fromkeys(indices))
    named = [cache.describe_item(i) for i in unique[:limit]]
    if len(unique) > limit:
        named.append(f"and {len(unique) - limit} more")
    return ", ".join(named)


def step_items(schedule: BatchSchedule, step: int, accumulation: int) -> list[int]:
    """Every item of optimizer step `step`, over all its micro-steps and all processes."""
    return [i for micro in range(accumulation) for i in schedule.global_batch(step * accumulation + micro)]


class BatchLoader:
    """Loads the batch of step N+1 in a background thread while step N trains."""

    def __init__(self, cache: VideoLatentCache, schedule: BatchSchedule, rank: int):
        self.cache = cache
        self.schedule = schedule
        self.rank = rank
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: tuple[int, Future] | None = None

    def _submit(self, micro_step: int) -> Future:
        return self._pool.submit(load_batch, self.cache, self.schedule.batch(micro_step, self.rank))

    def get(self, micro_step: int) -> dict[str, Any]:
        if self._pending is not None and self._pending[0] == micro_step:
            future = self._pending[1]
        else:
            future = self._submit(micro_step)
        self._pending = (micro_step + 1, self._submit(micro_step + 1))
        return future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
