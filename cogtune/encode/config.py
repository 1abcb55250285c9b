"""Settings of one `cogtune encode` run: written as `config.toml` into the cache, and reproducing it."""

from __future__ import annotations

import dataclasses

from cogtune.config import MODEL_HELP, check_settings, require, section, setting
from cogtune.data.dataset import DatasetConfig
from cogtune.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class EncodeConfig:
    model: str = setting("", MODEL_HELP, flag="--model", short="-m", metavar="MODEL")
    output_dir: str = setting("", "Cache folder to write (created; finished items are kept).", flag="--output-dir",
                              short="-o", path=True)
    data: DatasetConfig = section(DatasetConfig, "The dataset to encode.")
    dataset_config: str | None = setting(
        None, "A TOML file of [[datasets]] (root, repeats, buckets, frame_extraction, kind, ...) encoded into one "
              "cache, instead of --data-root; its tables take unset options from the dataset options.",
        flag="--dataset-config", metavar="FILE.toml", path=True)
    buckets: tuple[str, ...] = setting(
        (), "Clip shapes FxHxW; each clip takes the nearest. Default: one bucket of frames x height x width.",
        flag="--buckets", metavar="FxHxW")
    frames: int | None = setting(None, "Frames per clip when no buckets are given; default: the model's.",
                                 flag="--frames", short="-F", low=1)
    height: int | None = setting(None, "Clip height in pixels when no buckets are given; default: the model's.",
                                 flag="--height", short="-H", low=1)
    width: int | None = setting(None, "Clip width in pixels when no buckets are given; default: the model's.",
                                flag="--width", short="-W", low=1)
    batch_size: int = setting(1, "Clips per VAE call (within one bucket).", flag="--batch-size", low=1)
    i2v: bool | None = setting(None, "Also encode the condition image; default: when the model is I2V.", flag="--i2v")
    image_noise_samples: int = setting(
        4, "I2V: noisy encodes of each condition image (CogVideoX's pixel-noise augmentation); 0: clean only.",
        flag="--image-noise-samples", low=0)
    validation_prompts: tuple[str, ...] = setting((), "Prompts whose embeddings are cached for validation.",
                                                  flag="--validation-prompt")
    random_weights: bool = setting(False, "Use the preset's architecture with random weights (no download).",
                                   flag="--random-weights")
    vae_slicing: bool = setting(False, "Encode a batch one clip at a time inside the VAE.", flag="--vae-slicing")
    vae_tiling: bool = setting(False, "Encode frames in spatial tiles (less memory for large clips).",
                               flag="--vae-tiling")
    num_workers: int = setting(2, "Decoding worker processes that overlap with encoding.", flag="--num-workers", low=0)
    overwrite: bool = setting(False, "Recompute items that are already cached.", flag="--overwrite")
    skip_invalid: bool = setting(False, "Encode the entries without errors instead of stopping at the first error.",
                                 flag="--skip-invalid")
    preview: int = setting(0, "Then decode N items per bucket back to mp4 and a PNG contact sheet (in "
                              "OUTPUT_DIR/preview): see the crop, bucket and frames training gets.",
                           flag="--preview", metavar="N", low=0)

    def __post_init__(self) -> None:
        require(self, "model", "output_dir")
        if not self.data.root and not self.dataset_config:
            raise ConfigError("data.root is required (--data-root, or `root = ...` under [data] in the --config file; "
                              "or several datasets with --dataset-config)")
        if self.data.root and self.dataset_config:
            raise ConfigError("--data-root and --dataset-config exclude each other: list the root as a [[datasets]] "
                              "table in the dataset config")
        check_settings(self)
        if self.buckets and (self.frames, self.height, self.width) != (None, None, None):
            raise ConfigError("buckets and frames/height/width exclude each other: a bucket is FxHxW")
        from cogtune.data.clips import Bucket  # numpy: kept out of the command line's imports

        try:
            for bucket in self.buckets:
                Bucket.parse(bucket)
        except Exception as exc:
            raise ConfigError(str(exc)) from exc
