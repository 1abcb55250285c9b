"""The estimate explains itself: each peak in parts that sum to it, and the host RAM offloading keeps.

The host-RAM figures are checked against the trainer's own code run on the CPU with the tiny presets:
its model loader (`load_trainable_transformer`, block offloading on) and its training step under its
`activations_offloaded` context, with `save_on_cpu`'s pack hook wrapped to count the bytes it copies.
"""

from __future__ import annotations

import pytest
import torch

from cogtune.models.registry import ALL_PRESETS
from cogtune.train.sizing.estimate import BREAKDOWN_PARTS, estimate_run, rounded_parts
from tests.train.sizing.test_estimate import estimate, run


def torch_pinned_request(size: int) -> int:
    """Host bytes torch's pinned allocator takes for a request of `size` bytes: `c10::llvm::PowerOf2Ceil`
    (aten/src/ATen/core/CachingHostAllocator.h, `allocate`), written out here as the oracle."""
    power = 1
    while power < size:
        power *= 2
    return power if size else 0

CONFIGS = [
    {},
    {"full": True, "gradient_checkpointing": False},
    {"full": True, "optimizer.name": "adamw-cpu-offload"},
    {"memory.offload_blocks": True, "memory.offload_activations": True, "lora.rank": 8},
    {"optimizer.name": "adamw-8bit", "mixed_precision": "bf16", "batch_size": 2},
    {"memory.base_weights": "fp8", "gradient_checkpointing": False},
]


@pytest.mark.parametrize("settings", CONFIGS)
@pytest.mark.parametrize("validation", [None, (9, 64, 64)])
def test_the_parts_sum_to_every_moment_exactly(settings, validation):
    result = estimate(run(**settings), shape=(9, 64, 96), validation=validation)
    memory = result.memory
    assert set(result.breakdown) == {"before_training", "before_validation", "after_validation", "after_testing"}
    for moment, parts in result.breakdown.items():
        total = sum(parts.values())
        # the figures are the same bytes in GiB: the parts sum to them to the byte
        assert total / 1024**3 == getattr(memory, moment), moment
        assert all(size > 0 for kind, size in parts.items() if kind != "allocator_slack"), parts
        assert parts["allocator_slack"] >= 0
        assert set(parts) <= set(BREAKDOWN_PARTS), parts
    figures = result.as_dict()
    for moment, parts in figures["breakdown_gib"].items():  # rounded, and still summing to the rounded figure
        assert round(sum(parts.values()) * 1000) == round(figures["memory_gib"][moment] * 1000)
    training = result.breakdown["before_validation"]
    assert "workspaces" in training and training["workspaces"] >= 32 << 20  # cuBLAS's, at least
    if validation is not None:
        assert "vae_weights" in result.breakdown["after_validation"]
    else:
        assert result.breakdown["after_validation"] == training


def test_the_weights_parts_are_the_parameters():
    result = estimate(run(full=True, gradient_checkpointing=False))
    before = result.breakdown["before_training"]
    transformer = sum(4 * n for n in [result.trainable_parameters])  # float32 master weights
    # each tensor its own block, rounded up to 512 bytes
    assert transformer <= before["trainable_weights"] <= transformer + 200 * 512
    lora = estimate(run(**{"lora.rank": 8}))
    assert lora.trainable_parameters * 4 <= lora.breakdown["before_training"]["trainable_weights"]


def test_activations_grow_with_the_clip_and_the_weights_do_not():
    small = estimate(run(full=True, gradient_checkpointing=False), shape=(9, 64, 64)).breakdown["before_validation"]
    large = estimate(run(full=True, gradient_checkpointing=False), shape=(33, 256, 256)).breakdown["before_validation"]
    assert large["saved_activations"] > 10 * small["saved_activations"]
    assert large["trainable_weights"] == small["trainable_weights"]
    assert large["workspaces"] >= small["workspaces"]


@pytest.mark.parametrize("settings", [
    {"memory.offload_blocks": True, "memory.offload_activations": True, "lora.rank": 8},
    {"full": True, "optimizer.name": "adamw-cpu-offload", "gradient_checkpointing": False},
])
def test_the_fast_path_gives_the_exact_paths_parts(settings):
    config = run(**settings)
    fast = estimate_run(config, [(9, 64, 64)], (9, 64, 64))
    exact = estimate_run(config, [(9, 64, 64)], (9, 64, 64), exact=True)
    assert fast.breakdown == exact.breakdown
    assert fast.host_ram == exact.host_ram


def test_rounded_parts_sum_to_the_rounded_total():
    parts = {"frozen_weights": 1_000_000_001, "gradients": 3_333_333, "allocator_slack": 7_777_777}
    total = round(sum(parts.values()) / 1024**3, 3)
    rounded = rounded_parts(parts, total)
    assert round(sum(rounded.values()) * 1000) == round(total * 1000)
    assert list(rounded) == ["frozen_weights", "gradients", "allocator_slack"]


# --- host RAM: what the trainer copies or keeps on the CPU --------------------------------------------

def _trainer_pieces(config):
    from cogtune.models.loading import ResolvedModel, load_scheduler
    from cogtune.models.positions import needs_learned_positions_dropped
    from cogtune.train.model import load_trainable_transformer
    from cogtune.train.plan import RunPlan, drops_learned_positions

    spec = ALL_PRESETS[config.model]
    model = ResolvedModel(config.model, spec, "fake", None)
    drop = drops_learned_positions(config, spec, needs_learned_positions_dropped(spec, [(9, 64, 64)]))
    plan = RunPlan(model, None, drop, [])
    transformer, compute_dtype = load_trainable_transformer(config, plan, "cpu", "no")
    return spec, transformer, compute_dtype, load_scheduler(model)


@pytest.mark.parametrize("settings", [
    {"gradient_checkpointing": True},
    {"gradient_checkpointing": False},
    {"full": True, "gradient_checkpointing": False},
    {"lora.rank": 8, "batch_size": 2},
])
def test_host_ram_of_offloaded_activations_is_what_save_on_cpu_copies(settings, monkeypatch):
    """The trainer's step on the CPU (float32, as the tiny preset's weights, so `mixed_precision no` makes the
    estimate trace the same dtypes) under the trainer's `activations_offloaded`, counting every tensor its
    `save_on_cpu` packs: the bytes of the host copies it makes (on a GPU, pinned), all alive until backward."""
    from cogtune.train import model as train_model
    from cogtune.train.sizing.estimate import synthetic_batch
    from cogtune.train.step import StepSettings, training_step

    config = run(**{**settings, "memory.offload_activations": True, "mixed_precision": "no"})
    spec, transformer, compute_dtype, scheduler = _trainer_pieces(config)
    packed = [0]
    original = torch.autograd.graph.save_on_cpu

    class CountingSaveOnCpu(original):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(pin_memory, device_type)
            pack, unpack = self.pack_hook, self.unpack_hook

            def counting_pack(tensor):
                packed[0] += torch_pinned_request(tensor.numel() * tensor.element_size())
                return pack(tensor)

            self.pack_hook = counting_pack

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", CountingSaveOnCpu)
    batch = synthetic_batch(spec, config.batch_size, (9, 64, 64))
    empty = torch.zeros(spec.max_text_tokens, spec.text_embed_dim)
    step_settings = StepSettings(caption_dropout=config.effective_caption_dropout, image_dropout=0.0)
    generators = [torch.Generator().manual_seed(i) for i in range(config.batch_size)]
    with train_model.activations_offloaded(True, "cpu"):
        loss = training_step(transformer, scheduler, spec, batch, empty, step_settings, generators, "cpu",
                             compute_dtype)
    loss.backward()
    assert packed[0] > 0

    result = estimate(config)
    # The estimate sizes a GPU run, whose flash-attention kernel also saves its philox seed and offset for
    # backward (a uint64 pair and a uint64 scalar, 24 bytes) where the CPU's kernel saves none: 24 bytes per
    # attention call saved in the forward (none under checkpointing, which saves only the blocks' inputs).
    # Everything else matches to the byte. (Both are powers of two: the pinned allocator keeps them as they are.)
    rng_state = 0 if config.gradient_checkpointing else 24 * spec.transformer_config["num_layers"]
    assert result.host_ram["offloaded_activations"] == packed[0] + rng_state
    assert result.host_ram_gib == (packed[0] + rng_state) / 1024**3


def test_host_ram_of_offloaded_blocks_is_the_frozen_weights_the_offload_keeps_on_the_cpu():
    """The trainer's loader with block offloading keeps every frozen parameter and buffer on the CPU (on a
    GPU, diffusers' group offloading holds a pinned copy of each); the LoRA layers go to the device."""
    config = run(**{"memory.offload_blocks": True, "lora.rank": 8})
    _, transformer, _, _ = _trainer_pieces(config)
    kept = [p for p in transformer.parameters() if not p.requires_grad] + list(transformer.buffers())
    assert all(t.device.type == "cpu" for t in kept)
    on_cpu = sum(torch_pinned_request(t.numel() * t.element_size()) for t in kept)  # one pinned copy each
    result = estimate(config)
    assert result.host_ram == {"offloaded_blocks": on_cpu, "offloaded_activations": 0, "cpu_optimizer": 0,
                               "cpu_optimizer_state": 0}
    assert on_cpu > sum(t.numel() * t.element_size() for t in kept)  # the rounding is counted


def test_host_ram_of_the_cpu_offload_optimizer_is_its_host_copies_and_state():
    """torchao's CPUOffloadOptimizer: a pinned host copy of each parameter of 4096+ elements and of its
    gradient, and AdamW's two states in ordinary memory, all float32 (16 bytes a parameter before the
    pinned allocator's rounding); smaller ones stay on the device."""
    config = run(full=True, **{"optimizer.name": "adamw-cpu-offload"})
    _, transformer, _, _ = _trainer_pieces(config)
    big = [p.numel() * 4 for p in transformer.parameters() if p.requires_grad and p.numel() >= 4096]
    result = estimate(config)
    assert result.host_ram["cpu_optimizer"] == sum(2 * torch_pinned_request(size) for size in big)
    assert result.host_ram["cpu_optimizer_state"] == 2 * sum(big)
    assert result.pinned_host_gib == result.host_ram["cpu_optimizer"] / 1024**3


def test_configurations_without_offloading_need_no_host_ram():
    assert sum(estimate(run()).host_ram.values()) == 0
    assert sum(estimate(run(full=True)).host_ram.values()) == 0


def test_fitting_checks_the_host_too():
    from cogtune.train.sizing.fit import cheapest_fit, fits, fits_host

    offloading = estimate(run(**{"memory.offload_activations": True}))
    host = offloading.host_ram_gib
    assert host > 0
    assert fits(offloading, 100.0, host_budget=host) and not fits(offloading, 100.0, host_budget=host / 2)
    assert fits_host(offloading, host) and not fits_host(offloading, host / 2)
    assert fits(offloading, 100.0, host_budget=float("inf"))
    # a ladder rung that offloads more than the host holds is passed over
    plain = estimate(run(gradient_checkpointing=False))
    budget = plain.memory.after_testing - 1e-6
    suggestion = cheapest_fit(plain, budget, host_budget=1e-12)
    assert suggestion is None or sum(suggestion.estimate.host_ram.values()) == 0


def test_each_process_on_a_machine_gets_its_share_of_the_host(monkeypatch):
    """Every process a launcher starts on one machine keeps its own offloaded copies in that machine's
    RAM (torchrun and accelerate say how many in LOCAL_WORLD_SIZE)."""
    from cogtune.train.sizing import fit

    offloading = estimate(run(**{"memory.offload_activations": True}))
    host = offloading.host_ram_gib
    monkeypatch.setattr(fit, "host_memory_gib", lambda: 3 * host)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert fit.fits_host(offloading)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert fit.fits_host(offloading) and fit.fits(offloading, 100.0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert not fit.fits_host(offloading) and not fit.fits(offloading, 100.0)
    warning = fit._host_shortfall(offloading)
    assert f"{host:.1f} GiB in host memory per process ({4 * host:.1f} GiB for the 4 on this machine)" in warning


# --- autocast's weight copies under checkpointing ------------------------------------------------------------

def _allocator_bytes(size: int) -> int:
    return -(-size // 512) * 512  # the CUDA caching allocator's rounding, as the estimate's parts count bytes


def test_a_recomputed_blocks_autocast_copies_live_only_through_its_backward():
    """Checkpointing under autocast: torch.utils.checkpoint recomputes a block in an autocast region of its own,
    the outermost in backward, and leaving it drops autocast's cache; the block's float32 weights are cast again
    for the recompute, and those copies die with the block's backward. The estimate kept every block's copies
    until the next step (5b full fine-tuning: 10.3 GiB too many at its peak).

    Oracle: the trainer's step for real on the CPU (tiny, full fine-tuning, checkpointing, bf16 autocast around
    the forward as the trainer puts it; autocast's weight cache is the same on every device), every bfloat16
    copy of a parameter watched while backward runs. At the estimate's training peak (in backward, a block
    being recomputed) its copies are never more than the real backward ever held at once."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    from cogtune.train.sizing.estimate import synthetic_batch
    from cogtune.train.step import StepSettings, training_step

    config = run(full=True, gradient_checkpointing=True, mixed_precision="no")
    spec, transformer, _, scheduler = _trainer_pieces(config)
    parameters = {id(p) for p in transformer.parameters()}
    live, most = [0], [0]
    backward = [False]

    class WatchCopies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if (func is torch.ops.aten._to_copy.default and id(args[0]) in parameters
                    and out.dtype == torch.bfloat16):
                size = _allocator_bytes(out.untyped_storage().nbytes())
                live[0] += size
                weakref.finalize(out, lambda: live.__setitem__(0, live[0] - size))
            if backward[0]:
                most[0] = max(most[0], live[0])
            return out

    batch = synthetic_batch(spec, 1, (9, 64, 96))
    empty = torch.zeros(spec.max_text_tokens, spec.text_embed_dim)
    with WatchCopies():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = training_step(transformer, scheduler, spec, batch, empty, StepSettings(), [torch.Generator()],
                                 "cpu", torch.float32)
        backward[0] = True
        loss.backward()
    assert most[0] > 0  # the recomputes cast the weights again

    estimated = estimate(run(full=True, gradient_checkpointing=True, mixed_precision="bf16"), shape=(9, 64, 96))
    at_peak = estimated.breakdown["before_validation"]
    assert at_peak["recomputed_activations"] > 0  # the peak is in backward, a block being recomputed
    assert 0 < at_peak["autocast_weight_copies"] <= most[0], (at_peak, most[0])
