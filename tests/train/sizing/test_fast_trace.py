"""The estimator's fast path gives exactly the full trace's figures.

`estimate_run` memoizes the meta kernels (identical blocks and tiles call the same ops on tensors of
the same metadata), replays the first training step's forward and backward in the second (their
allocations, logged), counts FLOPs in its last step instead of a step of its own under torch's
`FlopCounterMode`, builds the LoRA layers on the meta device and keeps the garbage collector to the
trace's own objects. `estimate_run(..., exact=True)` is the full trace without any of that; the two
must agree to the byte (allocated and reserved) and to the FLOP, on small real architectures (the
tiny presets' code paths, with more blocks, and a 5b transformer and VAE cut down), across settings.
"""

from __future__ import annotations

import bisect
import dataclasses
import random
from types import MappingProxyType

import pytest
import torch

import cogtune.train.sizing.estimate as estimate_module
from cogtune.config import replace_settings
from cogtune.models.registry import ALL_PRESETS
from cogtune.train.config import TrainConfig
from cogtune.train.sizing.allocator import SMALL_SIZE, CachingAllocatorModel, round_request, segment_size
from cogtune.train.sizing.estimate import estimate_run
from cogtune.train.sizing.trace import DEVICE, AllocationTracker, clear_meta_cache


def _shrunk(model: str, **transformer) -> object:
    spec = ALL_PRESETS[model]
    return dataclasses.replace(spec, transformer_config=MappingProxyType({**spec.transformer_config, **transformer}))


_SPECS = {
    "tiny-4": _shrunk("tiny", num_layers=4),
    "tiny-rotary-3": _shrunk("tiny-rotary", num_layers=3),
    "tiny-i2v-3": _shrunk("tiny-i2v", num_layers=3),
    "tiny-1.5-4": _shrunk("tiny-1.5", num_layers=4),
    "tiny-1.5-i2v-3": _shrunk("tiny-1.5-i2v", num_layers=3),
    # the 5b's transformer (rotary positions, its widths per head, text and time embeddings) with 2 heads
    # and 3 blocks, and its real VAE
    "5b-cut": _shrunk("cogvideox-5b", num_layers=3, num_attention_heads=2),
}
_BASE = {"tiny-4": "tiny", "tiny-rotary-3": "tiny-rotary", "tiny-i2v-3": "tiny-i2v", "tiny-1.5-4": "tiny-1.5",
         "tiny-1.5-i2v-3": "tiny-1.5-i2v", "5b-cut": "cogvideox-5b"}

CASES = [
    ("tiny-4", {}),
    ("tiny-4", {"full": True, "gradient_checkpointing": False}),
    ("tiny-4", {"memory.offload_blocks": True, "memory.offload_activations": True, "lora.rank": 8}),
    ("tiny-4", {"optimizer.name": "adamw-8bit", "mixed_precision": "bf16", "batch_size": 2}),
    ("tiny-rotary-3", {"memory.base_weights": "fp8"}),
    ("tiny-rotary-3", {"full": True, "optimizer.name": "adam"}),
    ("tiny-i2v-3", {"gradient_checkpointing": False, "memory.validation_vae_tile": "96x80"}),
    ("tiny-1.5-4", {"lora.target_modules": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.2")}),
    ("tiny-1.5-i2v-3", {"full": True, "memory.validation_vae_tiling": False}),
    ("5b-cut", {"mixed_precision": "bf16"}),
]


@pytest.fixture
def shrunk_specs(monkeypatch):
    real = estimate_module.model_spec
    monkeypatch.setattr(estimate_module, "model_spec", lambda reference: _SPECS.get(reference) or real(reference))


def _config(name: str, settings: dict) -> TrainConfig:
    base = ALL_PRESETS[_BASE[name]]
    task = "i2v" if base.is_i2v else "t2v"
    config = TrainConfig(task=task, model=name, data="<bench>", output_dir="<bench>", random_weights=True)
    # small tiles, so that the decode is tiled: at 128x128 (16x16 latents) 4 rows of tiles (6, 6, 6 and 1 latents
    # high) by 2 columns (10 and 8 wide), per batch of latent frames: tiles of the same shape, and edge tiles
    return replace_settings(config, {"memory.validation_vae_tile": "48x80", **settings})


@pytest.mark.parametrize(("name", "settings"), CASES)
def test_the_fast_path_gives_the_full_traces_figures(shrunk_specs, name, settings, monkeypatch):
    config = _config(name, settings)
    shape = (17, 128, 128)
    recorded = []  # the fast path replays the first step's forward and backward in the second: it did here
    record = estimate_module._record_forward_backward

    def recording(*args):
        recorded.append(record(*args))
        return recorded[-1]

    monkeypatch.setattr(estimate_module, "_record_forward_backward", recording)
    clear_meta_cache()
    cold = estimate_run(config, [shape], shape)
    warm = estimate_run(config, [shape], shape)  # every meta kernel memoized by now
    full = estimate_run(config, [shape], shape, exact=True)
    assert len(recorded) == 2 and all(recording is not None for recording in recorded)  # cold and warm, not exact
    for fast in (cold, warm):
        assert fast.memory == full.memory  # to the byte: the same allocations, replayed in the same order
        assert fast.breakdown == full.breakdown
        assert fast.teraflops_per_step == full.teraflops_per_step
        assert fast.trainable_parameters == full.trainable_parameters
        assert fast.transformer_parameters == full.transformer_parameters


def test_memoized_meta_kernels_allocate_what_the_kernels_do():
    """Functional ops are remade from their memoized description, in-place ones (`relu_`) skipped once known to
    change no metadata; views always run."""
    def trace(memoize: bool) -> list[tuple[int, int]]:
        with torch.device(DEVICE):
            layer = torch.nn.Linear(64, 256, dtype=torch.bfloat16)
        tracker = AllocationTracker(memoize=memoize)
        tracker.adopt(layer.parameters())
        seen = []
        x = torch.empty(8, 64, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
        with tracker:
            for _ in range(3):
                y = layer(x).view(8, 16, 16).transpose(1, 2).reshape(8, 256)
                y = torch.cat([y, y.relu_()], dim=1).float().sum()
                y.backward()
                seen.append((tracker.allocator.allocated, tracker.allocator.peak_reserved))
                del y
        return seen

    clear_meta_cache()
    assert trace(memoize=True) == trace(memoize=False) == trace(memoize=True)


class _ReferenceAllocator:
    """The caching-allocator model as first written (blocks in per-segment lists, found by scanning):
    the linked-block version must make exactly its decisions."""

    def __init__(self) -> None:
        self.allocated = self.reserved = self.peak_allocated = self.peak_reserved = 0
        self.segments: list[list[list]] = []  # [offset, size, free] per block
        self.small: list[bool] = []
        self.pools: dict[bool, list[tuple[int, int, int]]] = {True: [], False: []}
        self.live: dict[int, tuple[int, list]] = {}

    def malloc(self, key: int, size: int) -> None:
        size = round_request(size)
        small = size <= SMALL_SIZE
        pool = self.pools[small]
        index = bisect.bisect_left(pool, (size, -1, -1))
        if index < len(pool):
            _, segment, offset = pool.pop(index)
            block = next(b for b in self.segments[segment] if b[0] == offset)
        else:
            segment, total = len(self.segments), segment_size(size)
            block = [0, total, True]
            self.segments.append([block])
            self.small.append(small)
            self.reserved += total
            self.peak_reserved = max(self.peak_reserved, self.reserved)
        remainder = block[1] - size
        if remainder >= 512 if small else remainder > SMALL_SIZE:
            blocks = self.segments[segment]
            blocks.insert(blocks.index(block) + 1, [block[0] + size, remainder, True])
            bisect.insort(pool, (remainder, segment, block[0] + size))
            block[1] = size
        block[2] = False
        self.live[key] = (segment, block)
        self.allocated += block[1]
        self.peak_allocated = max(self.peak_allocated, self.allocated)

    def free(self, key: int) -> None:
        if key not in self.live:
            return
        segment, block = self.live.pop(key)
        self.allocated -= block[1]
        blocks, pool = self.segments[segment], self.pools[self.small[segment]]
        block[2] = True
        for direction in (+1, -1):
            position = blocks.index(block) + direction
            if 0 <= position < len(blocks) and blocks[position][2]:
                neighbour = blocks[position]
                pool.remove((neighbour[1], segment, neighbour[0]))
                block[0], block[1] = min(block[0], neighbour[0]), block[1] + neighbour[1]
                blocks.remove(neighbour)
        bisect.insort(pool, (block[1], segment, block[0]))

    def release_cached(self) -> None:
        for segment, blocks in enumerate(self.segments):
            if blocks and all(b[2] for b in blocks):
                for b in blocks:
                    self.pools[self.small[segment]].remove((b[1], segment, b[0]))
                self.reserved -= sum(b[1] for b in blocks)
                self.segments[segment] = []


@pytest.mark.parametrize("seed", range(4))
def test_the_allocator_model_decides_as_the_reference(seed):
    rng = random.Random(seed)
    sizes = [100, 512, 4000, 300_000, 1 << 20, (1 << 20) + 1, 3 << 20, 9 << 20, 11 << 20, 50 << 20]
    model, reference, live, key = CachingAllocatorModel(), _ReferenceAllocator(), [], 0
    for _ in range(4000):
        action = rng.random()
        if action < 0.5 or not live:
            size = rng.choice(sizes) + rng.randrange(0, 4096) * rng.randrange(0, 2)
            model.malloc(key, size)
            reference.malloc(key, size)
            live.append(key)
            key += 1
        elif action < 0.98:
            freed = live.pop(rng.randrange(len(live)))
            model.free(freed)
            reference.free(freed)
        else:
            model.release_cached()
            reference.release_cached()
            model.reset_peaks()
            reference.peak_allocated, reference.peak_reserved = reference.allocated, reference.reserved
        assert (model.allocated, model.reserved, model.peak_allocated, model.peak_reserved) == (
            reference.allocated, reference.reserved, reference.peak_allocated, reference.peak_reserved)


def test_the_decoders_repeated_tiles_and_the_identical_blocks_are_replayed(shrunk_specs, monkeypatch):
    """The validation decode's calls on tiles of a shape already decoded, its resnet blocks' calls alike
    within a decoder call being recorded, and the denoising step's calls of transformer blocks after the first
    alike, replay the first call's allocations (`trace.ReplayedCalls`); that the figures and parts are then
    the full trace's is the test above (the same run)."""
    from cogtune.train.sizing import trace

    replays = []
    real = trace.ReplayedCalls._replay

    def replay(self, *args):
        replays.append(type(self.function.__self__).__name__)
        return real(self, *args)

    monkeypatch.setattr(trace.ReplayedCalls, "_replay", replay)
    shape = (17, 128, 128)
    estimate_run(_config("tiny-4", {}), [shape], shape)
    assert replays.count("CogVideoXBlock") >= 2  # of the 4 blocks, those after the recorded ones
    assert {"CogVideoXDecoder3D", "AutoencoderKLCogVideoX", "CogVideoXResnetBlock3D"} <= set(replays)
