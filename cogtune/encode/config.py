"""Settings of one `cogtune encode` run."""

from __future__ import annotations

import dataclasses
from cogtune.config import section, setting
from cogtune.data.clips import Bucket
from cogtune.data.dataset import DatasetConfig
from cogtune.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class EncodeConfig:
    model: str = setting("", "MODEL: a preset, tiny preset, Hub id or local diffusers folder.")
    output_dir: str = setting("", "Cache folder to write (created; finished items are kept).")
    data: DatasetConfig = section(DatasetConfig, "The dataset to encode.")
    buckets: tuple[str, ...] = setting((), "Clip shapes FxHxW; default: the model's default frames x height x width.")
    batch_size: int = setting(1, "Clips per VAE call (within one bucket).")
    i2v: bool | None = setting(None, "Also encode the condition image; default: when the model is I2V.")
    image_noise_samples: int = setting(
        4, "I2V: noisy encodes of each condition image (CogVideoX's pixel-noise augmentation); 0: clean only.")
    validation_prompts: tuple[str, ...] = setting((), "Prompts whose embeddings are cached for validation.")
    random_weights: bool = setting(False, "Use the preset's architecture with random weights (no download).")
    vae_slicing: bool = setting(False, "Encode a batch one clip at a time inside the VAE.")
    vae_tiling: bool = setting(False, "Encode frames in spatial tiles (less memory for large clips).")
    num_workers: int = setting(2, "Decoding worker processes that overlap with encoding.")
    overwrite: bool = setting(False, "Recompute items that are already cached.")
    skip_invalid: bool = setting(False, "Encode the entries without errors instead of stopping at the first error.")

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model is required")
        if not self.output_dir:
            raise ConfigError("output_dir is required")
        if not self.data.root:
            raise ConfigError("data.root is required")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.image_noise_samples < 0:
            raise ConfigError(f"image_noise_samples must be >= 0, got {self.image_noise_samples}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {self.num_workers}")
        try:
            for bucket in self.buckets:
                Bucket.parse(bucket)
        except Exception as exc:
            raise ConfigError(str(exc)) from None
