"""The estimator: against hand calculations, monotone where it must be, and on the real presets."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cogtune.bench.cases import BenchCase
from cogtune.bench.estimate import estimate_case
from cogtune.bench.trace import DEVICE, AllocationTracker
from cogtune.models.loading import count_parameters
from cogtune.models.registry import PRESETS, TINY_PRESETS

GiB = 1024**3


def test_tracer_matches_a_hand_calculation_for_a_small_mlp():
    """Two Linear layers, no bias, bf16, on the meta device: every tensor's size is known by hand."""
    import gc

    batch, width, hidden = 64, 1024, 4096
    with torch.device(DEVICE):
        first = torch.nn.Linear(width, hidden, bias=False, dtype=torch.bfloat16)
        second = torch.nn.Linear(hidden, width, bias=False, dtype=torch.bfloat16)
    tracker = AllocationTracker()
    tracker.adopt([first.weight, second.weight])
    weight = width * hidden * 2  # 8 MiB each: a multiple of 2 MiB, so allocated exactly
    assert tracker.allocator.allocated == 2 * weight
    x = torch.empty(batch, width, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    with tracker:
        hidden_out = first(x)
        activated = torch.relu(hidden_out)
        out = second(activated)
        loss = out.sum()
        after_forward = tracker.allocator.allocated
        loss.backward()
        del hidden_out, activated, out, loss
        gc.collect()
    from cogtune.bench.trace import CUBLAS_WORKSPACE_BYTES

    # forward: weights, hidden_out and relu's output (batch x hidden), out (batch x width), the scalar loss
    # (a 512-byte block), and cuBLAS's workspace, taken at the first matmul
    assert after_forward == 2 * weight + 2 * (batch * hidden * 2) + batch * width * 2 + 512 + CUBLAS_WORKSPACE_BYTES
    # after backward, with the activations dropped: weights, their gradients, x's gradient, the workspace
    assert tracker.allocator.allocated == 4 * weight + batch * width * 2 + CUBLAS_WORKSPACE_BYTES


def test_resident_state_of_a_tiny_full_fine_tune_matches_the_arithmetic():
    """float32 weights, then after two AdamW steps: weights + exp_avg + exp_avg_sq (gradients freed)."""
    case = BenchCase("tiny", method="full", validation=False)
    estimate = estimate_case(case)
    parameters = count_parameters(TINY_PRESETS["tiny"])
    assert estimate.trainable_parameters == parameters
    weights_gib = parameters * 4 / GiB
    # every tensor is its own allocation, rounded up to 512 bytes: allow one block per tensor
    assert weights_gib <= estimate.memory.allocated_before_training <= weights_gib + 200 * 512 / GiB
    assert estimate.memory.allocated_peak_training >= 3 * weights_gib  # weights + AdamW's two states


def test_lora_parameter_count_matches_the_arithmetic():
    estimate = estimate_case(BenchCase("tiny", rank=8, validation=False))
    config = TINY_PRESETS["tiny"].transformer_config
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    per_projection = 8 * inner + inner * 8  # A (rank x in) and B (out x rank), for q, k, v, out of each block
    assert estimate.trainable_parameters == config["num_layers"] * 4 * per_projection


@pytest.mark.parametrize(("change", "field", "bigger"), [
    ("rank", "rank", 64), ("batch", "batch_size", 3), ("frames", "frames", 17),
])
def test_more_never_estimates_less(change, field, bigger):
    small = BenchCase("tiny", rank=4, frames=9)
    large = dataclasses.replace(small, **{field: bigger})
    a, b = estimate_case(small).memory, estimate_case(large).memory
    # Reserved memory at load can dip when larger tensors fill the caching allocator's holes (as on a GPU);
    # what is live, and the peaks a run needs, never do.
    for moment in ("allocated_before_training", "allocated_peak_training", "before_validation", "after_validation",
                   "after_testing"):
        assert getattr(b, moment) >= getattr(a, moment), moment


def test_checkpointing_never_estimates_more():
    on = estimate_case(BenchCase("tiny-rotary", frames=17, validation=False)).memory
    off = estimate_case(BenchCase("tiny-rotary", frames=17, gradient_checkpointing=False, validation=False)).memory
    assert on.allocated_peak_training <= off.allocated_peak_training
    assert on.before_validation <= off.before_validation


def test_memory_options_reduce_the_estimate():
    base = estimate_case(BenchCase("tiny-rotary", frames=17, validation=False)).memory
    fp8 = estimate_case(BenchCase("tiny-rotary", frames=17, fp8=True, validation=False)).memory
    assert fp8.allocated_before_training < base.allocated_before_training


@pytest.mark.slow
def test_cogvideox_5b_lora_estimate_on_the_real_architecture():
    """The real 5b, traced in seconds: weights, the issue's 1.25 PFLOP per step, a plausible peak."""
    estimate = estimate_case(BenchCase("cogvideox-5b"))
    weights_gib = count_parameters(PRESETS["cogvideox-5b"]) * 2 / GiB
    assert weights_gib < estimate.memory.allocated_before_training < weights_gib + 0.5
    assert estimate.teraflops_per_step == pytest.approx(1250, rel=0.05)
    assert weights_gib < estimate.memory.before_validation < 3 * weights_gib
    assert estimate.seconds < 60


@pytest.mark.slow
def test_cogvideox_2b_validation_does_not_raise_the_training_peak():
    """Decoding in the default validation tiles fits in the memory training already reserved; the VAE's
    own default tile (half the video) does not, which is why cogtune sets a smaller one."""
    import cogtune.bench.estimate as estimate_module

    default = estimate_case(BenchCase("cogvideox-2b")).memory
    assert default.after_validation == default.before_validation
    original = estimate_module._validation_vae
    half_video = lambda model, dtype, tile: original(model, dtype, (240, 360))  # noqa: E731
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(estimate_module, "_validation_vae", half_video)
        larger = estimate_case(BenchCase("cogvideox-2b")).memory
    assert larger.after_validation > default.after_validation
