"""The model registry: everything that differs between CogVideoX variants, as data.

Each preset is a `ModelSpec`: its Hub id, the configs of its transformer, VAE, scheduler and T5
text encoder (as published in the model repositories), the dtype its weights are meant to run in,
and its default clip shape. Every behaviour that depends on the variant (positional embeddings,
frame rule, latent scaling, `ofs`, I2V channels) is a property derived from those configs, so a
local folder or an unknown Hub id gets the same treatment as a preset once its configs are read.

The `tiny*` presets are built offline by `cogtune.models.tiny`; each exercises one family's code
path (sincos, rotary, learned positions + I2V, 1.5's temporal patch, 1.5-I2V's `ofs`) at a size
that trains on a CPU in well under a second per step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal

from cogtune.errors import ModelError

Positional = Literal["sincos", "rotary"]


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One CogVideoX variant. Build from configs; ask it, never the name, about behaviour."""

    name: str
    hub_id: str | None
    transformer_config: Mapping[str, Any]
    vae_config: Mapping[str, Any]
    scheduler_config: Mapping[str, Any]
    text_encoder_config: Mapping[str, Any]
    weight_dtype: Literal["float16", "bfloat16", "float32"]
    default_frames: int
    default_height: int
    default_width: int
    fps: int
    tiny: bool = False
    scheduler_class: str = "CogVideoXDDIMScheduler"

    # --- architecture -------------------------------------------------------------------------
    @property
    def version(self) -> Literal["1.0", "1.5"]:
        return "1.5" if self.patch_size_t is not None else "1.0"

    @property
    def family(self) -> str:
        """A short name of the code path: e.g. `1.0-sincos`, `1.0-rotary-i2v`, `1.5-rotary-i2v-ofs`."""
        parts = [self.version, self.positional_embedding]
        if self.learned_positional_embeddings:
            parts.append("learned")
        if self.is_i2v:
            parts.append("i2v")
        if self.uses_ofs:
            parts.append("ofs")
        return "-".join(parts)

    @property
    def latent_channels(self) -> int:
        return int(self.transformer_config.get("out_channels") or self.vae_config.get("latent_channels", 16))

    @property
    def is_i2v(self) -> bool:
        """I2V transformers take the condition image latent concatenated on channels."""
        return int(self.transformer_config.get("in_channels", 16)) == 2 * self.latent_channels

    @property
    def positional_embedding(self) -> Positional:
        return "rotary" if self.transformer_config.get("use_rotary_positional_embeddings") else "sincos"

    @property
    def learned_positional_embeddings(self) -> bool:
        """5b-I2V adds a learned embedding sized for 49x480x720; other sizes need it dropped."""
        return bool(self.transformer_config.get("use_learned_positional_embeddings"))

    @property
    def uses_ofs(self) -> bool:
        return self.transformer_config.get("ofs_embed_dim") is not None

    @property
    def patch_size(self) -> int:
        return int(self.transformer_config.get("patch_size", 2))

    @property
    def patch_size_t(self) -> int | None:
        value = self.transformer_config.get("patch_size_t")
        return int(value) if value is not None else None

    @property
    def max_text_tokens(self) -> int:
        return int(self.transformer_config.get("max_text_seq_length", 226))

    @property
    def text_embed_dim(self) -> int:
        return int(self.transformer_config.get("text_embed_dim", 4096))

    # --- VAE and latents ----------------------------------------------------------------------
    @property
    def temporal_compression(self) -> int:
        return int(self.vae_config.get("temporal_compression_ratio", 4))

    @property
    def spatial_compression(self) -> int:
        blocks = self.vae_config.get("block_out_channels", (128, 256, 256, 512))
        return 2 ** (len(blocks) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae_config.get("scaling_factor", 1.15258426))

    @property
    def invert_scale_latents(self) -> bool:
        return bool(self.vae_config.get("invert_scale_latents", False))

    @property
    def video_latent_scale(self) -> float:
        """Factor from a VAE sample to the transformer's latent space (the pipeline decodes `x / sf`)."""
        return self.scaling_factor

    @property
    def image_latent_scale(self) -> float:
        """Factor for the I2V condition latent, as the I2V pipeline applies it.

        1.5 sets `invert_scale_latents`: its condition latent is divided by the scaling factor.
        """
        return 1.0 / self.scaling_factor if self.invert_scale_latents else self.scaling_factor

    # --- clip-shape rules ---------------------------------------------------------------------
    def latent_frames(self, frames: int) -> int:
        return (frames - 1) // self.temporal_compression + 1

    def padded_latent_frames(self, frames: int) -> int:
        """Latent frames of a `frames`-frame clip after 1.5's padding to a multiple of the temporal patch."""
        return self.padded_latent_count(self.latent_frames(frames))

    def padded_latent_count(self, latent_frames: int) -> int:
        """`latent_frames` raised to a multiple of 1.5's temporal patch (unchanged for 1.0)."""
        p_t = self.patch_size_t
        return latent_frames if p_t is None else latent_frames + (-latent_frames) % p_t

    @property
    def frame_step(self) -> int:
        """Clip lengths go in steps of twice the temporal compression.

        The VAE decodes latents in pairs: an odd latent count (its first frame alone, then pairs)
        gives back `4(n-1)+1` frames, while an even count gives `4n`. A 4k+1 clip with an even
        latent count (13, 29, ...) therefore does not round-trip, so only 8k+1 lengths are accepted.
        """
        return 2 * self.temporal_compression

    @property
    def min_frames(self) -> int:
        return self.frame_step + 1

    @property
    def frame_rule(self) -> str:
        return f"{self.frame_step}k+1 frames (e.g. {self.default_frames})"

    @property
    def resolution_multiple(self) -> int:
        return self.spatial_compression * self.patch_size

    def frame_problems(self, frames: int) -> list[str]:
        problems = []
        if frames == 1:  # a still image: one latent frame (8*0+1); 1.5 pads it to its temporal patch like a clip
            return problems
        if frames < self.min_frames:
            problems.append(f"{frames} frames is fewer than the minimum of {self.min_frames} for {self.name}")
        elif (frames - 1) % self.frame_step:
            lower = frames - (frames - 1) % self.frame_step
            problems.append(
                f"{frames} frames breaks {self.name}'s frame rule {self.frame_step}k+1 "
                f"(nearest below: {lower})"
            )
        return problems

    def resolution_problems(self, height: int, width: int) -> list[str]:
        multiple = self.resolution_multiple
        problems = []
        for label, value in (("height", height), ("width", width)):
            if value < multiple or value % multiple:
                problems.append(f"{label} {value} must be a positive multiple of {multiple} for {self.name}")
        return problems

    @property
    def max_resolution(self) -> tuple[int, int] | None:
        """(height, width) in pixels above which the model cannot place a clip, or None (no limit).

        1.5's rotary embeddings are sliced from a grid of `sample_height x sample_width` latent
        pixels (diffusers' `grid_type="slice"`); a larger clip would get too few positions, and the
        pipelines fail the same way.
        """
        if self.positional_embedding != "rotary" or self.patch_size_t is None:
            return None
        config = self.transformer_config
        return (int(config["sample_height"]) * self.spatial_compression,
                int(config["sample_width"]) * self.spatial_compression)

    def shape_problems(self, frames: int, height: int, width: int) -> list[str]:
        """Every rule a clip shape breaks: the frame rule, resolution multiples and size limits."""
        problems = self.frame_problems(frames) + self.resolution_problems(height, width)
        limit = self.max_resolution
        if limit is not None and (height > limit[0] or width > limit[1]):
            problems.append(f"{height}x{width} exceeds {self.name}'s largest size {limit[0]}x{limit[1]} "
                            f"(HxW; its rotary position grid ends there)")
        return problems

    def check_clip_shape(self, frames: int, height: int, width: int) -> None:
        problems = self.shape_problems(frames, height, width)
        if problems:
            raise ModelError("; ".join(problems))

    def check_clip_shapes(self, shapes: dict[str, tuple[int, int, int]]) -> None:
        """All named shapes (`{"bucket 49x480x720": (49, 480, 720), ...}`) at once, as one line."""
        problems = [f"{name}: {problem}" for name, shape in shapes.items() for problem in self.shape_problems(*shape)]
        if problems:
            raise ModelError("; ".join(problems))

    def transformer_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(temporal, height, width) token grid of the transformer for a clip shape."""
        latent_t = self.padded_latent_frames(frames)
        tokens_t = latent_t // (self.patch_size_t or 1)
        step = self.spatial_compression * self.patch_size
        return tokens_t, height // step, width // step

    def describe(self) -> dict[str, Any]:
        """The facts a cache manifest or a config records about the model."""
        return {
            "name": self.name,
            "hub_id": self.hub_id,
            "family": self.family,
            "version": self.version,
            "i2v": self.is_i2v,
            "positional_embedding": self.positional_embedding,
            "learned_positional_embeddings": self.learned_positional_embeddings,
            "ofs": self.uses_ofs,
            "patch_size": self.patch_size,
            "patch_size_t": self.patch_size_t,
            "latent_channels": self.latent_channels,
            "text_embed_dim": self.text_embed_dim,
            "max_text_tokens": self.max_text_tokens,
            "temporal_compression": self.temporal_compression,
            "spatial_compression": self.spatial_compression,
            "scaling_factor": self.scaling_factor,
            "invert_scale_latents": self.invert_scale_latents,
            "weight_dtype": self.weight_dtype,
        }


# --- the published configs -------------------------------------------------------------------

_TRANSFORMER_COMMON = {
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": 64,
    "dropout": 0.0,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 16,
    "max_text_seq_length": 226,
    "norm_elementwise_affine": True,
    "norm_eps": 1e-5,
    "out_channels": 16,
    "patch_size": 2,
    "sample_frames": 49,
    "sample_height": 60,
    "sample_width": 90,
    "spatial_interpolation_scale": 1.875,
    "temporal_compression_ratio": 4,
    "temporal_interpolation_scale": 1.0,
    "text_embed_dim": 4096,
    "time_embed_dim": 512,
    "timestep_activation_fn": "silu",
    "use_rotary_positional_embeddings": False,
    "use_learned_positional_embeddings": False,
}

_TRANSFORMER_2B = {**_TRANSFORMER_COMMON, "num_attention_heads": 30, "num_layers": 30}
_TRANSFORMER_5B = {
    **_TRANSFORMER_COMMON,
    "num_attention_heads": 48,
    "num_layers": 42,
    "use_rotary_positional_embeddings": True,
}
_TRANSFORMER_5B_I2V = {**_TRANSFORMER_5B, "in_channels": 32, "use_learned_positional_embeddings": True}
_TRANSFORMER_15_5B = {
    **_TRANSFORMER_5B,
    "patch_size_t": 2,
    "patch_bias": False,
    "sample_frames": 81,
    "sample_height": 300,
    "sample_width": 300,
}
_TRANSFORMER_15_5B_I2V = {**_TRANSFORMER_15_5B, "in_channels": 32, "ofs_embed_dim": 512}

_VAE_COMMON = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["CogVideoXDownBlock3D"] * 4,
    "up_block_types": ["CogVideoXUpBlock3D"] * 4,
    "block_out_channels": [128, 256, 256, 512],
    "latent_channels": 16,
    "layers_per_block": 3,
    "act_fn": "silu",
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
    "temporal_compression_ratio": 4,
    "sample_height": 480,
    "sample_width": 720,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
_VAE_2B = {**_VAE_COMMON, "scaling_factor": 1.15258426}
_VAE_5B = {**_VAE_COMMON, "scaling_factor": 0.7}
_VAE_15 = {**_VAE_COMMON, "scaling_factor": 0.7, "invert_scale_latents": True, "sample_height": 768, "sample_width": 1360}

_SCHEDULER_COMMON = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
}
_SCHEDULER_2B = {**_SCHEDULER_COMMON, "snr_shift_scale": 3.0}
_SCHEDULER_5B = {**_SCHEDULER_COMMON, "snr_shift_scale": 1.0}

# google/t5-v1_1-xxl's encoder, as shipped in every CogVideoX repository.
_T5_XXL = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": True,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
}


def _preset(name: str, hub_id: str, *, transformer: dict, vae: dict, scheduler: dict, dtype: str, frames: int,
            height: int, width: int, fps: int) -> ModelSpec:
    return ModelSpec(
        name=name,
        hub_id=hub_id,
        transformer_config=_frozen(transformer),
        vae_config=_frozen(vae),
        scheduler_config=_frozen(scheduler),
        text_encoder_config=_frozen(_T5_XXL),
        weight_dtype=dtype,  # type: ignore[arg-type]
        default_frames=frames,
        default_height=height,
        default_width=width,
        fps=fps,
    )


PRESETS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _preset("cogvideox-2b", "THUDM/CogVideoX-2b", transformer=_TRANSFORMER_2B, vae=_VAE_2B,
                scheduler=_SCHEDULER_2B, dtype="float16", frames=49, height=480, width=720, fps=8),
        _preset("cogvideox-5b", "THUDM/CogVideoX-5b", transformer=_TRANSFORMER_5B, vae=_VAE_5B,
                scheduler=_SCHEDULER_5B, dtype="bfloat16", frames=49, height=480, width=720, fps=8),
        _preset("cogvideox-5b-i2v", "THUDM/CogVideoX-5b-I2V", transformer=_TRANSFORMER_5B_I2V, vae=_VAE_5B,
                scheduler=_SCHEDULER_5B, dtype="bfloat16", frames=49, height=480, width=720, fps=8),
        _preset("cogvideox1.5-5b", "THUDM/CogVideoX1.5-5B", transformer=_TRANSFORMER_15_5B, vae=_VAE_15,
                scheduler=_SCHEDULER_5B, dtype="bfloat16", frames=81, height=768, width=1360, fps=16),
        _preset("cogvideox1.5-5b-i2v", "THUDM/CogVideoX1.5-5B-I2V", transformer=_TRANSFORMER_15_5B_I2V, vae=_VAE_15,
                scheduler=_SCHEDULER_5B, dtype="bfloat16", frames=81, height=768, width=1360, fps=16),
    )
}


# --- tiny presets: same code paths, toy sizes ------------------------------------------------

# Two heads of 16 (inner 32, divisible by 16 for the sincos embedding), text width equal to the
# tiny T5's d_model, and a VAE with the real compression ratios (8x spatial, 4x temporal).
_TINY_TRANSFORMER = {
    **_TRANSFORMER_COMMON,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 4,
    "out_channels": 4,
    "time_embed_dim": 16,
    "text_embed_dim": 32,
    "num_layers": 2,
    "sample_frames": 9,
    "sample_height": 8,
    "sample_width": 8,
    "max_text_seq_length": 32,
}
_TINY_VAE = {
    **_VAE_COMMON,
    "block_out_channels": [8, 8, 8, 8],
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 2,
    # Tiling splits frames larger than half these sizes; tiny clips (64x64) stay whole.
    "sample_height": 256,
    "sample_width": 256,
    "scaling_factor": 1.15258426,
}
_TINY_T5 = {
    "vocab_size": 512,  # the locally built tokenizer's ids are < 512
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 32,
    "dropout_rate": 0.0,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": True,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
}


def _tiny(name: str, *, transformer: dict, vae: dict, scheduler: dict, fps: int) -> ModelSpec:
    return ModelSpec(
        name=name,
        hub_id=None,
        transformer_config=_frozen(transformer),
        vae_config=_frozen(vae),
        scheduler_config=_frozen(scheduler),
        text_encoder_config=_frozen(_TINY_T5),
        weight_dtype="float32",
        default_frames=9,
        default_height=64,
        default_width=64,
        fps=fps,
        tiny=True,
    )


_TINY_ROTARY = {**_TINY_TRANSFORMER, "use_rotary_positional_embeddings": True}
_TINY_15 = {**_TINY_ROTARY, "patch_size_t": 2, "patch_bias": False, "sample_height": 16, "sample_width": 16}

TINY_PRESETS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _tiny("tiny", transformer=_TINY_TRANSFORMER, vae=_TINY_VAE, scheduler=_SCHEDULER_2B, fps=8),
        _tiny("tiny-rotary", transformer=_TINY_ROTARY, vae={**_TINY_VAE, "scaling_factor": 0.7},
              scheduler=_SCHEDULER_5B, fps=8),
        _tiny("tiny-i2v", transformer={**_TINY_ROTARY, "in_channels": 8, "use_learned_positional_embeddings": True},
              vae={**_TINY_VAE, "scaling_factor": 0.7}, scheduler=_SCHEDULER_5B, fps=8),
        _tiny("tiny-1.5", transformer=_TINY_15, vae={**_TINY_VAE, "scaling_factor": 0.7, "invert_scale_latents": True},
              scheduler=_SCHEDULER_5B, fps=16),
        _tiny("tiny-1.5-i2v", transformer={**_TINY_15, "in_channels": 8, "ofs_embed_dim": 16},
              vae={**_TINY_VAE, "scaling_factor": 0.7, "invert_scale_latents": True}, scheduler=_SCHEDULER_5B, fps=16),
    )
}

ALL_PRESETS: dict[str, ModelSpec] = {**PRESETS, **TINY_PRESETS}


def get_preset(name: str) -> ModelSpec:
    try:
        return ALL_PRESETS[name]
    except KeyError:
        known = ", ".join(ALL_PRESETS)
        raise ModelError(f"unknown preset '{name}'; known presets: {known}") from None


def preset_for_hub_id(hub_id: str) -> ModelSpec | None:
    for spec in PRESETS.values():
        if spec.hub_id is not None and spec.hub_id.lower() == hub_id.lower():
            return spec
    return None


def spec_from_configs(
    name: str,
    transformer_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    scheduler_config: Mapping[str, Any],
    text_encoder_config: Mapping[str, Any] | None = None,
    hub_id: str | None = None,
    scheduler_class: str = "CogVideoXDDIMScheduler",
) -> ModelSpec:
    """A spec for a model known only by its configs (a local folder or another Hub id).

    The dtype and default clip shape come from the preset with the same architecture when there
    is one (a fine-tune of 5b is still a 5b), else from the configs themselves.
    """
    transformer = {k: v for k, v in transformer_config.items() if not k.startswith("_")}
    vae = {k: v for k, v in vae_config.items() if not k.startswith("_")}
    scheduler = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    architecture_keys = ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "patch_size_t",
                         "ofs_embed_dim", "use_rotary_positional_embeddings", "use_learned_positional_embeddings")
    twin = None
    for spec in ALL_PRESETS.values():
        if all(spec.transformer_config.get(k) == transformer.get(k) for k in architecture_keys):
            twin = spec
            break
    if twin is not None:
        dtype, frames, height, width, fps = (twin.weight_dtype, twin.default_frames, twin.default_height,
                                             twin.default_width, twin.fps)
    else:
        spatial = 2 ** (len(vae.get("block_out_channels", (1, 1, 1, 1))) - 1)
        frames = int(transformer.get("sample_frames", 49))
        height = int(transformer.get("sample_height", 60)) * spatial
        width = int(transformer.get("sample_width", 90)) * spatial
        dtype, fps = "bfloat16", 16 if transformer.get("patch_size_t") else 8
    return ModelSpec(
        name=name,
        hub_id=hub_id,
        transformer_config=_frozen(transformer),
        vae_config=_frozen(vae),
        scheduler_config=_frozen(scheduler),
        text_encoder_config=_frozen(text_encoder_config or (twin.text_encoder_config if twin else _T5_XXL)),
        weight_dtype=dtype,  # type: ignore[arg-type]
        default_frames=frames,
        default_height=height,
        default_width=width,
        fps=fps,
        tiny=bool(twin and twin.tiny),
        scheduler_class=scheduler_class,
    )
