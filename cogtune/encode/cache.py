"""The latent cache: what `cogtune encode` writes and `cogtune train` reads.

Layout of a cache folder::

    manifest.json               plain JSON: what made the cache and the list of items
    config.toml                 the encode run's resolved settings
    latents/000000.safetensors  `latent_dist` (2C, F, H, W): the VAE posterior's mean and logvar,
                                as diffusers' DiagonalGaussianDistribution keeps them, so that
                                training samples a fresh latent every time; I2V adds
                                `image_latent_dist` (2C, 1, H, W) of the condition image
    text/000000.safetensors     `prompt_embeds` (L, D): T5 embeddings padded to the model's length
    text/empty.safetensors      the empty caption's embeddings (caption dropout, guidance)
    text/validation.safetensors the validation prompts' embeddings

Every file is written atomically and carries, in its safetensors metadata, the key of what it was
made from; a re-run skips files whose key still matches, so an interrupted encode resumes.
Latents are stored unscaled: the model's scaling factor is applied at train time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cogtune.errors import DataError
from cogtune.fsutil import atomic_path
from cogtune.models.registry import ModelSpec

CACHE_FORMAT = "cogtune-latent-cache"
CACHE_VERSION = 1
MANIFEST_NAME = "manifest.json"
EMPTY_PROMPT_FILE = "text/empty.safetensors"
VALIDATION_PROMPTS_FILE = "text/validation.safetensors"


def latent_file(index: int) -> str:
    return f"latents/{index:06d}.safetensors"


def text_file(index: int) -> str:
    return f"text/{index:06d}.safetensors"


def stable_hash(data: Any) -> str:
    payload = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:32]


def compatibility(spec: ModelSpec) -> dict[str, Any]:
    """What a model must share with the one that made a cache for the cache to be valid for it.

    Latents are stored unscaled, so two models whose VAEs agree in architecture, scaling factor and
    latent convention (5b and 5b-I2V, or a fine-tune and its base) can share a cache; the text side
    must agree in encoder architecture, length and width.
    """
    vae = {k: v for k, v in spec.vae_config.items() if k not in ("sample_height", "sample_width", "force_upcast")}
    return {
        "version": spec.version,
        "latent_channels": spec.latent_channels,
        "spatial_compression": spec.spatial_compression,
        "temporal_compression": spec.temporal_compression,
        "scaling_factor": spec.scaling_factor,
        "invert_scale_latents": spec.invert_scale_latents,
        "vae_architecture": stable_hash(vae),
        "text_encoder_architecture": stable_hash(dict(spec.text_encoder_config)),
        "max_text_tokens": spec.max_text_tokens,
        "text_embed_dim": spec.text_embed_dim,
    }


def write_safetensors(path: Path, tensors: Mapping[str, Any], metadata: Mapping[str, Any]) -> None:
    """Save tensors atomically with string metadata (JSON-encoded values)."""
    from safetensors.torch import save_file

    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    meta = {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_metadata(path: Path) -> dict[str, str] | None:
    """A safetensors file's metadata, or None when the file is missing or unreadable."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception:
        return None


class VideoLatentCache:
    """Read access to a finished cache folder (manifest plus safetensors files)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST_NAME
        if not manifest_path.is_file():
            if self.root.is_dir() and any(self.root.glob("latents/*.safetensors")):
                raise DataError(f"cache {self.root} is incomplete (no manifest.json): re-run `cogtune encode` to finish it")
            raise DataError(f"{self.root} is not a cogtune cache (no manifest.json); create one with `cogtune encode`")
        try:
            self.manifest: dict[str, Any] = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{manifest_path}: not valid JSON ({exc})") from None
        if self.manifest.get("format") != CACHE_FORMAT:
            raise DataError(f"{manifest_path} is not a cogtune cache manifest")
        if self.manifest.get("format_version") != CACHE_VERSION:
            raise DataError(
                f"{self.root} uses cache format {self.manifest.get('format_version')}, this cogtune reads "
                f"{CACHE_VERSION}; re-encode with `cogtune encode --overwrite`"
            )
        if not self.manifest.get("complete"):
            raise DataError(f"cache {self.root} is incomplete: re-run `cogtune encode` to finish it")
        self.items: list[dict[str, Any]] = list(self.manifest["items"])
        if not self.items:
            raise DataError(f"cache {self.root} holds no items")

    def __len__(self) -> int:
        return len(self.items)

    @property
    def buckets(self) -> list[str]:
        return list(self.manifest["buckets"])

    @property
    def has_image_latents(self) -> bool:
        return bool(self.manifest.get("i2v"))

    @property
    def validation_prompts(self) -> list[str]:
        return list(self.manifest.get("validation_prompts", []))

    def _load(self, relative: str) -> dict[str, Any]:
        from safetensors.torch import load_file

        path = self.root / relative
        try:
            return load_file(str(path))
        except FileNotFoundError:
            raise DataError(f"cache file {path} is missing; re-run `cogtune encode` on this cache") from None
        except Exception as exc:
            raise DataError(f"cache file {path} is unreadable ({exc}); re-run `cogtune encode --overwrite`") from None

    def load_item(self, index: int) -> dict[str, Any]:
        """Tensors of item `index`: latent_dist, prompt_embeds, and image_latent_dist for I2V caches."""
        item = self.items[index]
        tensors = self._load(item["latent_file"])
        tensors.update(self._load(item["text_file"]))
        return tensors

    def empty_prompt_embeds(self):
        return self._load(EMPTY_PROMPT_FILE)["prompt_embeds"]

    def validation_prompt_embeds(self):
        if not self.validation_prompts:
            return None
        return self._load(VALIDATION_PROMPTS_FILE)["prompt_embeds"]

    def check_compatible(self, spec: ModelSpec, needs_image_latents: bool = False) -> None:
        """Refuse, with the differing facts named, a cache made for an incompatible model."""
        made_for = self.manifest.get("compatibility", {})
        wanted = compatibility(spec)
        different = [key for key in wanted if made_for.get(key) != wanted[key]]
        model = self.manifest.get("model", {})
        if different:
            details = ", ".join(f"{key} {made_for.get(key)!r} vs {wanted[key]!r}" for key in different[:3])
            raise DataError(
                f"cache {self.root} was made for {model.get('name', 'another model')}, which is incompatible "
                f"with {spec.name} ({details})",
                hint="encode the dataset again for this model with `cogtune encode`",
            )
        if needs_image_latents and not self.has_image_latents:
            raise DataError(
                f"cache {self.root} has no condition-image latents, which image-to-video training needs",
                hint="encode it with `cogtune encode --i2v` (or for an I2V model)",
            )
