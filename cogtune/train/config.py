"""Settings of one training run (`cogtune train t2v|i2v`), grouped as the TOML file groups them.

    model = "cogvideox-5b"
    data = "cache/"
    output_dir = "runs/first"
    steps = 2000

    [lora]
    rank = 64

    [optimizer]
    name = "adamw"
    lr = 1e-4
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from cogtune.config import (MODEL_HELP, QUANTIZED_BASE_WEIGHTS, SEED_MAX, check_settings, list_items,
                            replace_settings, require, section, setting)
from cogtune.errors import ConfigError
from cogtune.train.optimizers import OPTIMIZERS, default_learning_rate

# diffusers' CogVideoX LoRA training targets the attention projections of every block.
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_SAVE_FORMATS = ("diffusers", "comfyui", "kohya")  # the layouts of cogtune.lora.layouts a run writes
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    # A LoRA update has rank at most min(in, out) of its layer: 3072 at the most in CogVideoX.
    rank: int = setting(64, "LoRA rank.", flag="--rank", short="-r", low=1, high=4096)
    alpha: float | None = setting(None, "LoRA alpha (scale = alpha / rank); default: equal to the rank.",
                                  flag="--lora-alpha", low=0, low_open=True)
    dropout: float = setting(0.0, "Dropout on the LoRA branch.", low=0, high=1, high_open=True, flag="--lora-dropout")
    target_modules: tuple[str, ...] = setting(DEFAULT_LORA_TARGETS, "Module names LoRA adapts.", flag="--lora-target")
    save_format: str = setting("diffusers", "Layouts of the final LoRA, comma-separated: diffusers (always written), "
                                            "comfyui, kohya (see `cogtune lora convert`).", flag="--save-format",
                               list_of=LORA_SAVE_FORMATS)

    def __post_init__(self) -> None:
        check_settings(self, "lora.")
        if not self.target_modules:
            raise ConfigError("lora.target_modules must name at least one module")

    @property
    def save_formats(self) -> tuple[str, ...]:
        return list_items(self.save_format)

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: str = setting("adamw", f"Optimizer: {', '.join(OPTIMIZERS)}.", flag="--optimizer", choices=OPTIMIZERS,
                        metavar="NAME")
    lr: float | None = setting(None, "Peak learning rate; default 1e-4 (prodigy: 1.0, a multiplier of its own estimate); "
                                     "0 trains nothing (a dry run: the LoRA-effect warning says so).",
                               flag="--lr", aliases=("--learning-rate",), low=0)
    weight_decay: float = setting(1e-4, "Decoupled weight decay.", low=0, flag="--weight-decay", aliases=("--adam-weight-decay",))
    beta1: float = setting(0.9, "Adam beta1.", low=0, high=1, high_open=True, flag="--beta1", aliases=("--adam-beta1",))
    beta2: float = setting(0.95, "Adam beta2.", low=0, high=1, high_open=True, flag="--beta2", aliases=("--adam-beta2",))
    eps: float = setting(1e-8, "Adam epsilon.", low=0, low_open=True, flag="--eps", aliases=("--adam-epsilon",))
    max_grad_norm: float = setting(1.0, "Clip the gradient norm to this (0 turns clipping off).", flag="--max-grad-norm",
                                   low=0)
    lr_schedule: str = setting("constant_with_warmup", f"Learning-rate schedule: {', '.join(LR_SCHEDULES)}.",
                               flag="--lr-schedule", aliases=("--lr-scheduler",), choices=LR_SCHEDULES,
                               metavar="NAME")
    warmup_steps: int = setting(0, "Linear warm-up steps.", flag="--warmup-steps", aliases=("--lr-warmup-steps",), low=0)

    def __post_init__(self) -> None:
        check_settings(self, "optimizer.")

    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else default_learning_rate(self.name)


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
    prompts: tuple[str, ...] = setting((), "Validation prompts (embedded at encode time or now, if the cache lacks them); "
                                           "the model reads at most its max_text_seq_length tokens (226; tiny "
                                           "presets: 32), the rest is cut with a warning.",
                                       flag="--validation-prompt")
    images: tuple[str, ...] = setting((), "I2V: one condition image per prompt.", flag="--validation-image", path=True)
    every: int = setting(0, "Validate every N steps (0: only the final test pass).", flag="--validation-every", low=0)
    steps: int = setting(50, "Denoising steps per validation video.", flag="--validation-steps", low=1)
    guidance: float = setting(6.0, "Classifier-free guidance scale.", low=0, flag="--validation-guidance")
    seed: int = setting(42, "Seed of the validation noise.", flag="--validation-seed", low=0, high=SEED_MAX)
    frames: int | None = setting(None, "Frames of the validation video; default: the first bucket's.", low=1, flag="--validation-frames")
    height: int | None = setting(None, "Height; default: the first bucket's.", low=1, flag="--validation-height")
    width: int | None = setting(None, "Width; default: the first bucket's.", low=1, flag="--validation-width")
    final: bool = setting(True, "Run the test pass (validation prompts) after the last step.", flag="--validation-final")
    compare_base: bool = setting(True, "LoRA: also write base | LoRA side by side for each prompt and pass (the base, "
                                       "the LoRA switched off, rendered once with the same seed and noise).",
                                 flag="--validation-compare-base")

    def __post_init__(self) -> None:
        check_settings(self, "validation.")
        if self.images and len(self.images) != len(self.prompts):
            raise ConfigError(
                f"{len(self.images)} validation images for {len(self.prompts)} validation prompts; give one per prompt"
            )


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    split: float = setting(0.0, "Hold out this fraction of the cache's items (recorded in the run folder, kept on "
                                "--resume) and score the LoRA on them; 0: no held-out items.", flag="--eval-split",
                           low=0, high=1, high_open=True, metavar="FRACTION")
    data: str | None = setting(None, "Score on this other cache's items instead (held out by being elsewhere).",
                               flag="--eval-data", path=True, metavar="CACHE")
    every: int = setting(0, "Evaluate every N steps (0: 10 times over the run), at each validation and at the end.",
                         flag="--eval-steps", low=0)
    timesteps: int = setting(4, "Fixed timesteps per held-out item, spread over the schedule.", low=1, high=100)
    effect_threshold: float = setting(1e-5, "Warn when the LoRA changes the held-out predictions by less than this "
                                            "(relative) from this share of the run on.", low=0)
    effect_warn_after: float = setting(0.5, "Share of the run after which a LoRA with no effect is warned about.",
                                       low=0, high=1)
    overfit_evaluations: int = setting(3, "Warn of overfitting when the held-out loss has risen this many "
                                          "evaluations in a row while the training loss fell.", low=1)
    keep_best: bool = setting(False, "Keep the weights of the lowest held-out loss as OUTPUT_DIR/best/.",
                              flag="--keep-best")

    def __post_init__(self) -> None:
        check_settings(self, "evaluation.")
        if self.split and self.data:
            raise ConfigError("evaluation.split and evaluation.data exclude each other: hold out part of the cache, "
                              "or score on another cache")
        if self.keep_best and not self.held_out:
            raise ConfigError("--keep-best needs held-out items", hint="add --eval-split FRACTION or --eval-data CACHE")

    @property
    def held_out(self) -> bool:
        return bool(self.split or self.data)

    def every_for(self, steps: int) -> int:
        """The interval between evaluations in a run of `steps` steps."""
        return self.every or max(1, steps // 10)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = setting(250, "Save a resumable checkpoint every N steps (0: none), so that a long run can resume.",
                         flag="--checkpoint-every", aliases=("--checkpointing-steps",), low=0)
    keep: int = setting(3, "Keep only the newest N checkpoints (0: keep all).", flag="--keep-checkpoints",
                       aliases=("--checkpoints-total-limit",), low=0)

    def __post_init__(self) -> None:
        check_settings(self, "checkpointing.")


# diffusers' CogVideoX VAE tiles overlap by 1/6 of a tile's height and 1/5 of its width; the overlaps of the
# pixels and of the latents (8 times smaller) agree only for heights in 48s and widths in 40s: other tiles decode
# a video of another size (480x720 in 192x288 tiles: 480x741) and encode a width to a latent column too many.
VAE_TILE_STEPS = (48, 40)


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    base_weights: Literal["bf16", "fp8", "int8", "nf4"] = setting(
        "bf16", "LoRA: how the frozen transformer's Linear weights are stored: bf16 (the model's own dtype), fp8 "
                "(float8, cogtune's storage Linear), int8 (torchao weight-only int8), nf4 (QLoRA: 4-bit NormalFloat "
                "with double quantization, by bitsandbytes or torchao: nf4_backend); all compute in the autocast dtype.",
        flag="--base-weights", shorthands={"--fp8": "fp8"})
    nf4_backend: Literal["auto", "bitsandbytes", "torchao"] = setting(
        "auto", "With base_weights nf4: the library that holds the NF4 base: bitsandbytes (its kernels: CUDA, CPU, XPU) "
                "or torchao's NF4 tensor (plain PyTorch ops, any device); auto: bitsandbytes where it has kernels for "
                "the device, torchao elsewhere (Apple's MPS). config.toml records the one used.",
        flag="--nf4-backend")
    offload_blocks: bool = setting(
        False, "LoRA: keep the frozen weights in CPU memory and bring each layer to the GPU when it runs "
               "(prefetched on a side stream); needs gradient checkpointing.", flag="--offload-blocks")
    offload_activations: bool = setting(False, "Keep the activations saved for backward (the checkpointed block inputs) "
                                               "in pinned CPU memory.", flag="--offload-activations")
    compile: bool = setting(False, "torch.compile each transformer block (regional compilation).", flag="--compile")
    validation_vae_tiling: bool = setting(True, "Decode validation videos in tiles, so validation adds little memory.")
    validation_vae_tile: str = setting(
        "192x280", "HxW pixels of a validation decode tile (H a multiple of 48, W of 40: where diffusers' tiles meet "
                   "exactly); smaller tiles use less memory. At 192x280 a 2b run's validation stays under its training "
                   "peak (diffusers' default, half the video, does not).")
    profile: Literal["none", "auto", "12gb", "16gb", "24gb", "48gb", "80gb"] = setting(
        "none", "Pick the fastest memory options that fit this GPU size (auto: the present GPU), from the estimator.",
        flag="--memory-profile")
    check: bool = setting(True, "On a GPU, estimate the run's peak memory first and warn if it will not fit.")

    def __post_init__(self) -> None:
        check_settings(self, "memory.")
        self.validation_tile_size  # noqa: B018  # checks the HxW text
        if self.quantized_base and self.offload_blocks:
            raise ConfigError(f"memory.base_weights {self.base_weights} and memory.offload_blocks exclude each other: "
                              "a quantized base is the way to keep the weights on the GPU")

    @property
    def quantized_base(self) -> bool:
        """The frozen base is held quantized by a library (torchao int8, bitsandbytes NF4)."""
        return self.base_weights in QUANTIZED_BASE_WEIGHTS

    @property
    def validation_tile_size(self) -> tuple[int, int]:
        """(height, width) of `validation_vae_tile`."""
        match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", self.validation_vae_tile)
        sizes = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
        if not all(size > 0 and size % step == 0 for size, step in zip(sizes, VAE_TILE_STEPS)):
            raise ConfigError(f"memory.validation_vae_tile must be HxW pixels, H a multiple of {VAE_TILE_STEPS[0]} and W "
                              f"of {VAE_TILE_STEPS[1]}, got '{self.validation_vae_tile}'",
                              hint="diffusers' tiles overlap by 1/6 of their height and 1/5 of their width, in whole "
                                   "latents; other sizes decode a video of another size (720 wide in 192x288 tiles: 741)")
        return sizes


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    task: Literal["t2v", "i2v"] = setting("t2v", "Text-to-video or image-to-video (given by `cogtune train t2v|i2v`).")
    model: str = setting("", MODEL_HELP, flag="--model", short="-m",
                         aliases=("--pretrained-model-name-or-path",), metavar="MODEL")
    data: str = setting("", "The latent cache made by `cogtune encode`.", flag="--data", short="-d", path=True)
    output_dir: str = setting("", "Where the run writes its weights, checkpoints and reports.", flag="--output-dir",
                              short="-o", path=True)
    random_weights: bool = setting(False, "Use the preset's architecture with random weights (no download).",
                                   flag="--random-weights")
    full: bool = setting(False, "Full fine-tuning instead of LoRA.", flag="--full")
    steps: int = setting(1000, "Optimizer steps.", flag="--steps", aliases=("--max-train-steps",), low=1)
    batch_size: int = setting(1, "Clips per process per micro-step.", flag="--batch-size", aliases=("--train-batch-size",), low=1)
    gradient_accumulation: int = setting(1, "Micro-steps per optimizer step.", flag="--gradient-accumulation",
                                       aliases=("--gradient-accumulation-steps",), low=1)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = setting(
        "auto", "Autocast dtype; auto: the model's dtype on a GPU, none on a CPU.", flag="--mixed-precision")
    gradient_checkpointing: bool = setting(True, "Recompute block activations in the backward pass (less memory).",
                                           flag="--gradient-checkpointing")
    seed: int = setting(42, "Seed of data order, noise and timesteps.", flag="--seed", low=0, high=SEED_MAX)
    caption_dropout: float | None = setting(
        None, "Probability of training on the empty caption; default 0 (t2v), 0.05 (i2v).", flag="--caption-dropout",
        low=0, high=1)
    image_dropout: float = setting(0.05, "I2V: probability of training without the condition image (as CogVideoX did).",
                                   flag="--image-dropout", low=0, high=1)
    learned_positional_embeddings: Literal["auto", "keep", "drop"] = setting(
        "auto", "5b-I2V's learned positions: drop them to train other resolutions; auto: drop when a bucket needs it.",
        flag="--learned-positional-embeddings")
    resume: str | None = setting(None, "Resume from 'latest' or a checkpoint folder.", flag="--resume",
                                 aliases=("--resume-from-checkpoint",), metavar="latest|PATH")
    overwrite: bool = setting(False, "Start over in an output folder that holds another run: its weights, "
                                     "checkpoints and reports are deleted first (other files are kept).",
                              flag="--overwrite")
    report_to: Literal["none", "tensorboard", "wandb"] = setting(
        "none", "Experiment tracker, through accelerate: loss, lr, grad norm, s/step, GPU memory and the validation "
                "videos (tensorboard logs go to OUTPUT_DIR/logs).", flag="--report-to")
    push_to_hub: str | None = setting(
        None, "At the end, upload the weights, config.toml and the model card (README.md) to this Hub model repo "
              "(created if missing; the token comes from `hf auth login` or HF_TOKEN).", flag="--push-to-hub",
        metavar="REPO")
    hub_private: bool = setting(False, "Create the --push-to-hub repo as private (an existing repo keeps its visibility).",
                                flag="--hub-private")
    lora: LoraConfig = section(LoraConfig, "LoRA settings (ignored with full = true).")
    optimizer: OptimizerConfig = section(OptimizerConfig, "Optimizer and learning-rate schedule.")
    validation: ValidationConfig = section(ValidationConfig, "Validation during and after training.")
    checkpointing: CheckpointConfig = section(CheckpointConfig, "Resumable checkpoints.")
    memory: MemoryConfig = section(MemoryConfig, "Memory and speed options.")
    evaluation: EvaluationConfig = section(EvaluationConfig, "Held-out loss, the LoRA's measured effect, overfitting.")

    def __post_init__(self) -> None:
        require(self, "model", "data", "output_dir")
        check_settings(self)
        if self.overwrite and self.resume is not None:
            raise ConfigError("overwrite (start over) and resume (continue) exclude each other")
        if self.validation.images and self.task != "i2v":
            raise ConfigError("validation images are for i2v training only")
        if self.full and (self.memory.base_weights != "bf16" or self.memory.offload_blocks):
            raise ConfigError("memory.base_weights (other than bf16) and memory.offload_blocks are for the frozen "
                              "weights of LoRA training, not full fine-tuning")
        if self.memory.offload_blocks and not self.gradient_checkpointing:
            raise ConfigError("memory.offload_blocks needs gradient checkpointing: without it every layer's weights "
                              "stay on the GPU until backward")

    def resolved(self) -> TrainConfig:
        """This config with the defaults that depend on others written out (alpha, caption dropout, lr),
        so that the `config.toml` beside a run records every value it trained with (an NF4 base's library too;
        and not `overwrite`, an action taken before the run, which a later run from that file must not repeat)."""
        from cogtune.models.loading import default_device
        from cogtune.models.quantize import nf4_backend

        backend = nf4_backend(self.memory.nf4_backend, default_device()) if self.memory.base_weights == "nf4" else None
        return replace_settings(self, {"overwrite": False, "lora.alpha": self.lora.effective_alpha,
                                       "caption_dropout": self.effective_caption_dropout,
                                       "optimizer.lr": self.optimizer.effective_lr,
                                       "memory.nf4_backend": backend or self.memory.nf4_backend})

    @property
    def effective_caption_dropout(self) -> float:
        if self.caption_dropout is not None:
            return self.caption_dropout
        return 0.05 if self.task == "i2v" else 0.0
