"""The latent cache: `encode_dataset` writes it, `VideoLatentCache` reads it.

Importing the package (or its config) stays light, so that the command line can read the settings'
fields for `--help` without loading numpy or torch; the rest is imported on first use.
"""

from typing import Any

from cogtune.encode.config import EncodeConfig

__all__ = ["EncodeConfig", "VideoLatentCache", "encode_dataset", "plan_encode"]


def __getattr__(name: str) -> Any:
    if name == "VideoLatentCache":
        from cogtune.encode.cache import VideoLatentCache

        return VideoLatentCache
    if name in ("encode_dataset", "plan_encode"):
        from cogtune.encode import run

        return getattr(run, name)
    raise AttributeError(f"module 'cogtune.encode' has no attribute {name!r}")
