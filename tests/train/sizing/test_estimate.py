"""The estimator: against hand calculations, monotone where it must be, and on the real presets."""

from __future__ import annotations

import pytest
import torch

from cogtune.config import replace_settings
from cogtune.models.loading import count_parameters
from cogtune.models.registry import ALL_PRESETS, PRESETS, TINY_PRESETS
from cogtune.train.config import TrainConfig
from cogtune.train.sizing.estimate import estimate_run
from cogtune.train.sizing.trace import DEVICE, AllocationTracker

GiB = 1024**3


def run(model: str = "tiny", **settings) -> TrainConfig:
    """A run of `model` with dotted settings changed (`run(**{"lora.rank": 8})`)."""
    task = "i2v" if ALL_PRESETS[model].is_i2v else "t2v"
    base = TrainConfig(task=task, model=model, data="<bench>", output_dir="<bench>", random_weights=True)
    return replace_settings(base, settings)


def estimate(config: TrainConfig, shape=(9, 64, 64), validation=None):
    return estimate_run(config, [shape], validation)


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
    from cogtune.train.sizing.trace import CUBLAS_WORKSPACE_BYTES

    # forward: weights, hidden_out and relu's output (batch x hidden), out (batch x width), the scalar loss
    # (a 512-byte block), and cuBLAS's workspace, taken at the first matmul
    assert after_forward == 2 * weight + 2 * (batch * hidden * 2) + batch * width * 2 + 512 + CUBLAS_WORKSPACE_BYTES
    # after backward, with the activations dropped: weights, their gradients, x's gradient, the workspace
    assert tracker.allocator.allocated == 4 * weight + batch * width * 2 + CUBLAS_WORKSPACE_BYTES


def test_resident_state_of_a_tiny_full_fine_tune_matches_the_arithmetic():
    """float32 weights, then after two AdamW steps: weights + exp_avg + exp_avg_sq (gradients freed)."""
    result = estimate(run(full=True))
    parameters = count_parameters(TINY_PRESETS["tiny"])
    assert result.trainable_parameters == parameters
    weights_gib = parameters * 4 / GiB
    # every tensor is its own allocation, rounded up to 512 bytes: allow one block per tensor
    assert weights_gib <= result.memory.allocated_before_training <= weights_gib + 200 * 512 / GiB
    assert result.memory.allocated_peak_training >= 3 * weights_gib  # weights + AdamW's two states


def test_lora_parameter_count_matches_the_arithmetic():
    result = estimate(run(**{"lora.rank": 8}))
    config = TINY_PRESETS["tiny"].transformer_config
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    per_projection = 8 * inner + inner * 8  # A (rank x in) and B (out x rank), for q, k, v, out of each block
    assert result.trainable_parameters == config["num_layers"] * 4 * per_projection


@pytest.mark.parametrize(("setting", "bigger", "shape"), [
    ("lora.rank", 64, (9, 64, 64)), ("batch_size", 3, (9, 64, 64)), ("frames", None, (17, 64, 64)),
])
def test_more_never_estimates_less(setting, bigger, shape):
    small = run(**{"lora.rank": 4})
    large = small if setting == "frames" else replace_settings(small, {setting: bigger})
    a = estimate(small, validation=(9, 64, 64)).memory
    b = estimate(large, shape, validation=shape).memory
    # Reserved memory at load can dip when larger tensors fill the caching allocator's holes (as on a GPU);
    # what is live, and the peaks a run needs, never do.
    for moment in ("allocated_before_training", "allocated_peak_training", "before_validation", "after_validation",
                   "after_testing"):
        assert getattr(b, moment) >= getattr(a, moment), moment


def test_checkpointing_never_estimates_more():
    on = estimate(run("tiny-rotary"), (17, 64, 64)).memory
    off = estimate(run("tiny-rotary", gradient_checkpointing=False), (17, 64, 64)).memory
    assert on.allocated_peak_training <= off.allocated_peak_training
    assert on.before_validation <= off.before_validation


def test_memory_options_reduce_the_estimate():
    base = estimate(run("tiny-rotary"), (17, 64, 64)).memory
    fp8 = estimate(run("tiny-rotary", **{"memory.base_weights": "fp8"}), (17, 64, 64)).memory
    assert fp8.allocated_before_training < base.allocated_before_training


def test_the_largest_bucket_decides_and_is_named():
    config = run()
    both = estimate_run(config, [(9, 64, 64), (17, 64, 64), (9, 64, 96)])
    assert both.shape == (17, 64, 64)  # 5 latent frames x 4x4 patches: more tokens than 3 x 4x6
    alone = estimate_run(config, [both.shape])
    assert both.memory == alone.memory
    assert both.as_dict()["bucket"] == "17x64x64"


_BASE_VALIDATION = (9, 128, 128)


@pytest.fixture(scope="module")
def base_estimates():
    made = {}

    def get(model, settings):
        key = (model, tuple(sorted(settings.items())))
        if key not in made:
            made[key] = estimate(run(model, **settings), validation=_BASE_VALIDATION)
        return made[key]

    return get


# Each setting that changes memory, the base it is changed from, and a figure it must move (reserved
# figures move in the allocator's 2 MiB / 20 MiB steps, too coarse for the tiny model: allocated ones are
# used). Settings that cannot move any figure are in MEMORY_NEUTRAL, with the reason.
_SMALL_TILES = {"memory.validation_vae_tile": "48x40"}
MEMORY_RELEVANT = [
    ("tiny", {}, "lora.rank", 32, "allocated_before_training"),
    ("tiny", {}, "lora.target_modules", ("to_q", "to_k", "to_v", "to_out.0", "ff.net.2"), "allocated_before_training"),
    ("tiny", {}, "lora.dropout", 0.1, "allocated_peak_training"),
    ("tiny", {}, "full", True, "allocated_before_training"),
    # (rank 128: LoRA matrices of 4096 elements, which bitsandbytes keeps in 8 bits; smaller ones in float32)
    ("tiny", {"lora.rank": 128}, "optimizer.name", "adamw-8bit", "allocated_peak_training"),
    ("tiny", {}, "gradient_checkpointing", False, "allocated_peak_training"),
    ("tiny", {}, "batch_size", 2, "allocated_peak_training"),
    ("tiny", {}, "mixed_precision", "bf16", "allocated_peak_training"),
    ("tiny", {}, "memory.base_weights", "fp8", "allocated_before_training"),
    ("tiny", {}, "memory.offload_blocks", True, "allocated_before_training"),
    ("tiny", {}, "memory.offload_activations", True, "allocated_peak_training"),
    ("tiny", {}, "memory.validation_vae_tile", "48x40", "validation_decode"),
    ("tiny", _SMALL_TILES, "memory.validation_vae_tiling", False, "validation_decode"),
    ("tiny", {}, "validation.guidance", 1.0, "validation_denoise"),
    ("tiny", {}, "validation.height", 64, "validation_denoise"),
    ("tiny-i2v", {}, "image_dropout", 0.0, None),
    ("tiny", {}, "gradient_accumulation", 4, None),
    ("tiny", {}, "lora.alpha", 3.0, None),
]
MEMORY_NEUTRAL = {
    "image_dropout": "zeroes the condition latent instead of removing it: the same tensors",
    "caption_dropout": "swaps in the empty caption's embedding: the same tensors",
    "gradient_accumulation": "gradients accumulate in place; the peak is one micro-step's",
    "lora.alpha": "a scale factor, no tensor",
    "memory.compile": "compiled kernels cannot run on the meta device (said in the estimator's docstring)",
    "learned_positional_embeddings": "the table stays in the model either way; only its addition is skipped",
}


@pytest.mark.parametrize(("model", "base", "setting", "value", "figure"), MEMORY_RELEVANT)
def test_every_memory_relevant_setting_moves_the_estimate(base_estimates, model, base, setting, value, figure):
    from cogtune.train.validation import validation_shape_from

    config = run(model, **base, **{setting: value})
    # the validation shape follows the run's settings, as the trainer's does
    changed = estimate(config, validation=validation_shape_from(config, _BASE_VALIDATION))
    before = base_estimates(model, base)
    if figure is None:
        assert changed.memory == before.memory, MEMORY_NEUTRAL[setting]
    else:
        assert getattr(changed.memory, figure) != getattr(before.memory, figure)


@pytest.mark.slow
def test_cogvideox_5b_lora_estimate_on_the_real_architecture():
    """The real 5b: its weights, 1.25 PFLOP per step (6 x parameters x tokens, plus attention), a plausible peak."""
    result = estimate(run("cogvideox-5b"), (49, 480, 720), validation=(49, 480, 720))
    weights_gib = count_parameters(PRESETS["cogvideox-5b"]) * 2 / GiB
    assert weights_gib < result.memory.allocated_before_training < weights_gib + 0.5
    assert result.teraflops_per_step == pytest.approx(1250, rel=0.05)
    assert weights_gib < result.memory.before_validation < 3 * weights_gib


@pytest.mark.slow
def test_cogvideox_2b_validation_does_not_raise_the_training_peak():
    """Decoding in the default validation tiles fits in the memory training already reserved; the VAE's
    own default tile (half the video) does not, which is why cogtune sets a smaller one."""
    shape = (49, 480, 720)
    default = estimate(run("cogvideox-2b"), shape, validation=shape).memory
    assert default.after_validation == default.before_validation
    larger = estimate(run("cogvideox-2b", **{"memory.validation_vae_tile": "240x360"}), shape, validation=shape).memory
    assert larger.after_validation > default.after_validation


def test_an_i2v_validation_in_tiles_is_sized():
    """The I2V pipeline encodes its condition image in validation's tiles too; in tiles that meet exactly
    (`VAE_TILE_STEPS`) the image's latents join the video's (at 1.5-5b-I2V's 81x768x1360 the estimate failed in
    diffusers' `prepare_latents` in the old 192x288 tiles, the image a latent column too wide)."""
    config = run("tiny-1.5-i2v", **{"memory.validation_vae_tile": "48x40"})
    result = estimate(config, (9, 64, 64), validation=(9, 128, 128))
    assert result.memory.after_validation >= result.memory.before_validation > 0
