"""Model registry, tiny presets, and loading through diffusers/transformers.

Importing the package (or its registry) stays light, so that the command line can complete model
names without loading torch; `resolve_model` and `ResolvedModel` are imported on first use.
"""

from typing import Any

from cogtune.models.registry import ALL_PRESETS, PRESETS, TINY_PRESETS, ModelSpec, get_preset

__all__ = ["ALL_PRESETS", "PRESETS", "TINY_PRESETS", "ModelSpec", "ResolvedModel", "get_preset", "resolve_model"]


def __getattr__(name: str) -> Any:
    if name in ("ResolvedModel", "resolve_model"):
        from cogtune.models import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'cogtune.models' has no attribute {name!r}")
