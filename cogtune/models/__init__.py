"""Model registry, tiny presets, and loading through diffusers/transformers."""

from cogtune.models.loading import ResolvedModel, resolve_model
from cogtune.models.registry import ALL_PRESETS, PRESETS, TINY_PRESETS, ModelSpec, get_preset

__all__ = ["ALL_PRESETS", "PRESETS", "TINY_PRESETS", "ModelSpec", "ResolvedModel", "get_preset", "resolve_model"]
