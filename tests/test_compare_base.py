"""Base | LoRA side by side: each half is what `cogtune sample` renders without the LoRA and with it.

The oracle is `sample` itself, run separately: without `--lora` (the base model, no peft layers at all)
and with `--lora` at the same seed. The halves are compared on the denoised latents the VAE decodes
(the `sampled` fixture), not on 8-bit video, to the float32 rounding bound of `tests.rounding`.
"""

from __future__ import annotations

import torch

from cogtune.data.video import read_all_frames
from cogtune.generate import LABEL_HEIGHT, comparison_path
from cogtune.models.registry import TINY_PRESETS
from cogtune.sample import SampleConfig, run_sample
from cogtune.train.run_folder import FINAL_PASS, RunFolder
from tests.rounding import denoising_tolerance

PROMPT = "A red circle moves left."  # the tiny cache's validation prompt
STEPS = 2


def test_side_by_side_halves_are_sample_without_and_with_the_lora(tiny_cache, tmp_path, sampled):
    from cogtune.train import TrainConfig, run_training
    from cogtune.train.config import LoraConfig, OptimizerConfig, ValidationConfig

    run = tmp_path / "run"
    run_training(TrainConfig(model="tiny", data=str(tiny_cache), output_dir=str(run), steps=4,
                             lora=LoraConfig(rank=4), optimizer=OptimizerConfig(lr=2e-2),
                             validation=ValidationConfig(steps=STEPS)))
    validation_lora, validation_base = sampled.latents  # the final pass: the LoRA's video, then the base's

    def sample(name, **kwargs):
        return run_sample(SampleConfig(model="tiny", prompts=(PROMPT,), output=str(tmp_path / name), steps=STEPS,
                                       frames=9, height=64, width=64, **kwargs))

    written = sample("compare.mp4", lora=str(run), compare_base=True)
    assert written == [tmp_path / "compare.mp4", comparison_path(tmp_path / "compare.mp4")]
    sample("base.mp4")
    sample("lora.mp4", lora=str(run))
    compared_lora, compared_base, base, lora = sampled.latents[2:]  # --compare-base renders the LoRA's video first

    spec = TINY_PRESETS["tiny"]
    scale = lora.abs().max().item()
    same_prompts = denoising_tolerance(spec, STEPS, 9, 64, 64) * scale
    # Validation's prompt embeddings come from the cache (T5 at encode time), sample's from T5 now.
    cached_prompts = denoising_tolerance(spec, STEPS, 9, 64, 64, text_tokens=spec.max_text_tokens) * scale
    assert (base - lora).abs().max() > 100 * cached_prompts  # the LoRA changes the latents
    torch.testing.assert_close(compared_base, base, rtol=0, atol=same_prompts)
    torch.testing.assert_close(compared_lora, lora, rtol=0, atol=same_prompts)
    torch.testing.assert_close(validation_base, base, rtol=0, atol=cached_prompts)
    torch.testing.assert_close(validation_lora, lora, rtol=0, atol=cached_prompts)

    for video in (comparison_path(tmp_path / "compare.mp4"), RunFolder(run).comparison(FINAL_PASS) / "00.mp4"):
        assert read_all_frames(video).shape == (9, 64 + LABEL_HEIGHT, 2 * 64, 3), video
