"""Settings of one `cogtune sample` run (re-exported by `cogtune.sample`).

A module of its own, importing nothing heavy, so that the command line builds `--help` from the
fields without loading the sampling engine.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from cogtune.config import MODEL_HELP, SEED_MAX, check_settings, require, setting
from cogtune.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    model: str = setting("", MODEL_HELP, flag="--model", short="-m", metavar="MODEL")
    prompts: tuple[str, ...] = setting((), "Prompt; one video each.", flag="--prompt", short="-p")
    prompts_file: str | None = setting(None, "A text file of prompts, one per line (added after `prompts`).",
                                       flag="--prompts-file", path=True)
    output: str = setting("", "Output .mp4 file (one prompt) or folder (several).", flag="--output", short="-o",
                          path=True)
    lora: str | None = setting(None, "LoRA weights: a pytorch_lora_weights.safetensors file or its folder.",
                               flag="--lora", path=True)
    # negative scales are allowed: they subtract the LoRA (still a finite number, as every float setting)
    lora_scale: float = setting(1.0, "Strength of the LoRA (0: the base model).", flag="--lora-scale")
    transformer: str | None = setting(None, "A fully fine-tuned transformer/ folder (or the run folder holding it).",
                                      flag="--transformer", path=True)
    images: tuple[str, ...] = setting((), "I2V: condition image(s), one for all prompts or one per prompt.",
                                      flag="--image", path=True)
    negative_prompt: str = setting("", "Negative prompt for classifier-free guidance.", flag="--negative-prompt")
    frames: int | None = setting(None, "Frames; default: the model's.", flag="--frames", short="-F", low=1)
    height: int | None = setting(None, "Height in pixels; default: the model's.", flag="--height", short="-H", low=1)
    width: int | None = setting(None, "Width in pixels; default: the model's.", flag="--width", short="-W", low=1)
    steps: int = setting(50, "Denoising steps.", flag="--steps", low=1)
    guidance: float = setting(6.0, "Classifier-free guidance scale (1: off).", flag="--guidance", low=0)
    dynamic_cfg: bool = setting(False, "Raise guidance over the denoising steps (CogVideoX's dynamic CFG).",
                                flag="--dynamic-cfg")
    scheduler: Literal["model", "ddim", "dpm"] = setting(
        "model", "Sampler: the model's own (DDIM), or CogVideoX's DPM solver (recommended for 5b).", flag="--scheduler")
    seed: int = setting(42, "Seed; the i-th video uses seed + i (modulo 2^64).", flag="--seed", low=0, high=SEED_MAX)
    fps: int | None = setting(None, "Frame rate of the written mp4; default: the model's.", flag="--fps", low=1)
    vae_tiling: bool = setting(False, "Decode in spatial tiles (less memory).", flag="--vae-tiling")
    vae_slicing: bool = setting(False, "Decode one video at a time.", flag="--vae-slicing")
    offload: Literal["none", "model", "sequential"] = setting(
        "none", "CPU offload (GPU only): whole components (model) or layer by layer (sequential, slowest, least memory).",
        flag="--offload")
    base_weights: Literal["bf16", "fp8", "int8", "nf4"] = setting(
        "bf16", "How the transformer's Linear weights are stored: bf16 (the model's dtype), fp8 (float8, GPU; about "
                "half the memory), int8 (torchao), nf4 (bitsandbytes 4-bit, about a quarter); compute in bf16.",
        flag="--base-weights", shorthands={"--fp8": "fp8"})
    preview: Literal["none", "gif", "png", "both"] = setting(
        "none", "Also write a GIF and/or a PNG contact sheet beside each mp4.", flag="--preview")
    random_weights: bool = setting(False, "Use the preset's architecture with random weights (no download).",
                                   flag="--random-weights")
    overwrite: bool = setting(False, "Replace existing output files.", flag="--overwrite")
    compare_base: bool = setting(False, "Also render each prompt with the LoRA switched off (same seed and noise) and "
                                        "write base | LoRA side by side, labelled, as NAME.base-vs-lora.mp4.",
                                 flag="--compare-base")

    def __post_init__(self) -> None:
        require(self, "model")
        if not self.prompts and not self.prompts_file:
            raise ConfigError("at least one prompt is required (--prompt or --prompts-file)")
        require(self, "output")
        check_settings(self)
        if self.lora and self.transformer:
            raise ConfigError("--lora and --transformer exclude each other: a LoRA goes on the base transformer")
        if self.compare_base and not self.lora:
            raise ConfigError("--compare-base compares a LoRA with its base: give --lora")
