"""The latent cache: `encode_dataset` writes it, `VideoLatentCache` reads it."""

from cogtune.encode.cache import VideoLatentCache
from cogtune.encode.config import EncodeConfig
from cogtune.encode.run import encode_dataset, plan_encode

__all__ = ["EncodeConfig", "VideoLatentCache", "encode_dataset", "plan_encode"]
